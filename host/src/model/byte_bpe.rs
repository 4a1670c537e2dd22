//! A byte-level BPE encoder for the tokenizer configurations most models ship, used to
//! tokenize datasets: the same ids as the tokenizers library, with byte offsets, at a fraction
//! of the cost.
//!
//! It is built only when `tokenizer.json` is exactly one of the configurations it knows:
//! a BPE model over a byte-level vocabulary (no dropout, no subword prefix or suffix), no
//! normalizer (or NFC, then only for text NFC cannot change), no truncation or padding, added
//! tokens without `single_word`/`lstrip`/`rstrip`, and the pre-tokenization of GPT-2
//! (`ByteLevel` with its regex) or of Llama 3 / Qwen 2 (a `Split` on their regex followed by
//! `ByteLevel` without one). Anything else is left to the library. The two regexes are
//! scanned by hand with the Unicode classes of the regex crate; a test compares every
//! Unicode scalar value, in context, with the library's own pre-tokenization.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, MatchKind};
use rustc_hash::FxHashMap;
use serde_json::Value;

/// Llama 3's `Split` regex.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's `Split` regex: Llama 3's with one digit per piece.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Words cached per thread before the cache is cleared.
const WORD_CACHE_LIMIT: usize = 200_000;

/// How a pre-tokenization regex splits text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Splitter {
    /// GPT-2's, as `ByteLevel { use_regex: true }` applies it:
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// [`LLAMA3_PATTERN`] (`max_digits` 3) or [`QWEN2_PATTERN`] (1).
    Llama3 { max_digits: usize },
}

/// The class of a character in the pre-tokenization regexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// Unicode `\p{L}`, `\p{N}` and `\s` as sorted code point ranges.
struct Classes {
    letter: Vec<(u32, u32)>,
    number: Vec<(u32, u32)>,
    space: Vec<(u32, u32)>,
    ascii: [Class; 128],
}

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::parse(pattern).expect("valid Unicode class");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => unreachable!("{pattern} is a Unicode class"),
    }
}

fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

impl Classes {
    fn get() -> &'static Classes {
        static CLASSES: OnceLock<Classes> = OnceLock::new();
        CLASSES.get_or_init(|| {
            let mut classes = Classes {
                letter: unicode_ranges(r"\p{L}"),
                number: unicode_ranges(r"\p{N}"),
                space: unicode_ranges(r"\s"),
                ascii: [Class::Other; 128],
            };
            for b in 0..128u8 {
                classes.ascii[b as usize] = classes.slow(b as u32);
            }
            classes
        })
    }

    fn slow(&self, c: u32) -> Class {
        if in_ranges(&self.letter, c) {
            Class::Letter
        } else if in_ranges(&self.number, c) {
            Class::Number
        } else if in_ranges(&self.space, c) {
            Class::Space
        } else {
            Class::Other
        }
    }

    #[inline]
    fn of(&self, c: char) -> Class {
        match self.ascii.get(c as usize) {
            Some(class) => *class,
            None => self.slow(c as u32),
        }
    }
}

/// The character at byte `i` of `text`, with its class and length.
#[inline]
fn char_at(classes: &Classes, text: &str, i: usize) -> Option<(char, Class, usize)> {
    let c = text[i..].chars().next()?;
    Some((c, classes.of(c), c.len_utf8()))
}

/// The end of the run of characters of `class` starting at `i`, at most `limit` characters.
#[inline]
fn run_end(classes: &Classes, text: &str, mut i: usize, class: Class, limit: usize) -> usize {
    let mut n = 0;
    while n < limit {
        match char_at(classes, text, i) {
            Some((_, k, len)) if k == class => {
                i += len;
                n += 1;
            }
            _ => break,
        }
    }
    i
}

impl Splitter {
    /// The end of the regex match that starts at byte `i` (the patterns match every
    /// character, so pieces tile the text).
    fn piece_end(self, classes: &Classes, text: &str, i: usize) -> usize {
        let (c, class, len) = char_at(classes, text, i).expect("i is inside the text");
        let next = char_at(classes, text, i + len);
        if c == '\'' {
            if let Some(end) = self.contraction(text, i + 1) {
                return end;
            }
        }
        match self {
            Splitter::Gpt2 => {
                let run = match (c, class, next) {
                    (' ', _, Some((_, k, _))) if k != Class::Space => Some((i + 1, k)),
                    (_, k, _) if k != Class::Space => Some((i, k)),
                    _ => None,
                };
                if let Some((start, k)) = run {
                    return run_end(classes, text, start, k, usize::MAX);
                }
            }
            Splitter::Llama3 { max_digits } => {
                if class == Class::Letter {
                    return run_end(classes, text, i, Class::Letter, usize::MAX);
                }
                if c != '\r' && c != '\n' && class != Class::Number {
                    if let Some((_, Class::Letter, _)) = next {
                        return run_end(classes, text, i + len, Class::Letter, usize::MAX);
                    }
                }
                if class == Class::Number {
                    return run_end(classes, text, i, Class::Number, max_digits);
                }
                let other_from = match (c, class, next) {
                    (' ', _, Some((_, Class::Other, _))) => Some(i + 1),
                    (_, Class::Other, _) => Some(i),
                    _ => None,
                };
                if let Some(start) = other_from {
                    let mut end = run_end(classes, text, start, Class::Other, usize::MAX);
                    while matches!(text.as_bytes().get(end), Some(b'\r' | b'\n')) {
                        end += 1;
                    }
                    return end;
                }
                let spaces = run_end(classes, text, i, Class::Space, usize::MAX);
                if let Some(last_newline) = text.as_bytes()[i..spaces]
                    .iter()
                    .rposition(|&b| b == b'\r' || b == b'\n')
                {
                    return i + last_newline + 1;
                }
                return whitespace_end(text, i, spaces);
            }
        }
        whitespace_end(text, i, run_end(classes, text, i, Class::Space, usize::MAX))
    }

    /// The end of the contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`) whose
    /// apostrophe ends at `i`, case-insensitive for Llama 3.
    fn contraction(self, text: &str, i: usize) -> Option<usize> {
        let fold = |c: char| match self {
            Splitter::Gpt2 => c,
            Splitter::Llama3 { .. } if c == '\u{17F}' => 's',
            Splitter::Llama3 { .. } => c.to_ascii_lowercase(),
        };
        let mut chars = text[i..].chars();
        let first = chars.next()?;
        let second_wanted = match fold(first) {
            's' | 't' | 'm' | 'd' => return Some(i + first.len_utf8()),
            'r' | 'v' => 'e',
            'l' => 'l',
            _ => return None,
        };
        let second = chars.next().filter(|c| fold(*c) == second_wanted)?;
        Some(i + first.len_utf8() + second.len_utf8())
    }
}

/// `\s+(?!\S)|\s+` at `i`, where the whitespace run ends at `spaces`: the run without its last
/// character when a non-space follows and more than one character remains, else the run.
fn whitespace_end(text: &str, i: usize, spaces: usize) -> usize {
    if spaces == text.len() {
        return spaces;
    }
    let last = text[..spaces]
        .char_indices()
        .next_back()
        .map_or(spaces, |(at, _)| at);
    if last > i {
        last
    } else {
        spaces
    }
}

/// Token ids of one encoding, with the byte range of the text each stands for and whether a
/// post-processor added it (then its range is empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByteEncoding {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Byte range of each token in the text.
    pub offsets: Vec<(usize, usize)>,
    /// 1 for a token the post-processor added, as the library's special-tokens mask.
    pub special: Vec<u32>,
}

/// One pass over the added tokens: leftmost-longest matching, as the library does.
struct AddedPass {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

/// A byte-level BPE encoder (see the module documentation for when one exists).
pub struct ByteLevelBpe {
    /// Distinguishes encoders in the per-thread word cache.
    key: u64,
    splitter: Splitter,
    nfc: bool,
    ignore_merges: bool,
    byte_ids: [u32; 256],
    token_len: Vec<u32>,
    vocab: FxHashMap<Vec<u8>, u32>,
    merges: FxHashMap<(u32, u32), (u32, u32)>,
    added: Vec<AddedPass>,
    template: Option<(Vec<u32>, Vec<u32>)>,
}

/// GPT-2's byte-to-character table of byte-level vocabularies, inverted.
pub(crate) fn byte_level_decoding_table() -> HashMap<char, u8> {
    let mut table = HashMap::with_capacity(256);
    let mut next = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            next += 1;
            255 + next
        };
        table.insert(char::from_u32(c).expect("valid code point"), b as u8);
    }
    table
}

fn is_null(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null))
}

fn pre_tokenizer_splitter(v: &Value) -> Option<Splitter> {
    let byte_level = |v: &Value, regex: bool| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == regex
    };
    if byte_level(v, true) {
        return Some(Splitter::Gpt2);
    }
    if v.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    let [split, bytes] = v.get("pretokenizers")?.as_array()?.as_slice() else {
        return None;
    };
    if !byte_level(bytes, false)
        || split.get("type")?.as_str()? != "Split"
        || split.get("behavior")?.as_str()? != "Isolated"
        || split.get("invert")?.as_bool()?
    {
        return None;
    }
    match split.get("pattern")?.get("Regex")?.as_str()? {
        LLAMA3_PATTERN => Some(Splitter::Llama3 { max_digits: 3 }),
        QWEN2_PATTERN => Some(Splitter::Llama3 { max_digits: 1 }),
        _ => None,
    }
}

/// Special ids before and after the text, from a post-processor the encoder understands.
fn template(v: Option<&Value>) -> Option<(Vec<u32>, Vec<u32>)> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Some((vec![], vec![]));
    };
    match v.get("type")?.as_str()? {
        "ByteLevel" => Some((vec![], vec![])),
        "Sequence" => {
            let mut out = (vec![], vec![]);
            for p in v.get("processors")?.as_array()? {
                let (before, after) = template(Some(p))?;
                if !(before.is_empty() && after.is_empty()) {
                    if !(out.0.is_empty() && out.1.is_empty()) {
                        return None;
                    }
                    out = (before, after);
                }
            }
            Some(out)
        }
        "TemplateProcessing" => {
            let specials = v.get("special_tokens")?;
            let (mut before, mut after, mut seen_text) = (vec![], vec![], false);
            for piece in v.get("single")?.as_array()? {
                if let Some(seq) = piece.get("Sequence") {
                    if seq.get("id")?.as_str()? != "A" || seen_text {
                        return None;
                    }
                    seen_text = true;
                } else {
                    let name = piece.get("SpecialToken")?.get("id")?.as_str()?;
                    let ids = specials.get(name)?.get("ids")?.as_array()?;
                    let side = if seen_text { &mut after } else { &mut before };
                    for id in ids {
                        side.push(u32::try_from(id.as_u64()?).ok()?);
                    }
                }
            }
            seen_text.then_some((before, after))
        }
        _ => None,
    }
}

fn merge_pair(m: &Value) -> Option<(String, String)> {
    match m {
        Value::String(s) => {
            let (a, b) = s.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        }
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
            _ => None,
        },
        _ => None,
    }
}

impl ByteLevelBpe {
    /// The encoder for a tokenizer's JSON form, if its configuration is one this encoder
    /// reproduces exactly.
    pub fn from_json(json: &Value) -> Option<Self> {
        let nfc = match json.get("normalizer") {
            None | Some(Value::Null) => false,
            Some(n) if n.get("type")?.as_str()? == "NFC" => true,
            Some(_) => return None,
        };
        if !is_null(json.get("truncation")) || !is_null(json.get("padding")) {
            return None;
        }
        let splitter = pre_tokenizer_splitter(json.get("pre_tokenizer")?)?;
        let template = template(json.get("post_processor"));
        let model = json.get("model")?;
        if model.get("type")?.as_str()? != "BPE"
            || !is_null(model.get("dropout"))
            || !is_null(model.get("continuing_subword_prefix"))
            || !is_null(model.get("end_of_word_suffix"))
            || model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
        {
            return None;
        }
        let ignore_merges = model
            .get("ignore_merges")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let byte_of = byte_level_decoding_table();
        let spelled = |token: &str| -> Option<Vec<u8>> {
            token.chars().map(|c| byte_of.get(&c).copied()).collect()
        };
        let mut vocab = FxHashMap::default();
        let mut by_string: HashMap<&str, u32> = HashMap::new();
        let mut token_len = Vec::new();
        for (token, id) in model.get("vocab")?.as_object()? {
            let id = u32::try_from(id.as_u64()?).ok()?;
            let bytes = spelled(token)?;
            if token_len.len() <= id as usize {
                token_len.resize(id as usize + 1, 0);
            }
            token_len[id as usize] = bytes.len() as u32;
            vocab.insert(bytes, id);
            by_string.insert(token.as_str(), id);
        }
        let mut byte_ids = [0u32; 256];
        for (c, b) in &byte_of {
            byte_ids[*b as usize] = *by_string.get(c.to_string().as_str())?;
        }
        let mut merges = FxHashMap::default();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = merge_pair(m)?;
            let joined = format!("{a}{b}");
            let (a, b, new) = (
                by_string.get(a.as_str())?,
                by_string.get(b.as_str())?,
                by_string.get(joined.as_str())?,
            );
            merges.entry((*a, *b)).or_insert((rank as u32, *new));
        }
        let mut passes: [Vec<(String, u32)>; 2] = [vec![], vec![]];
        for t in json.get("added_tokens")?.as_array()? {
            let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
            if flag("single_word") || flag("lstrip") || flag("rstrip") {
                return None;
            }
            let id = u32::try_from(t.get("id")?.as_u64()?).ok()?;
            let content = t.get("content")?.as_str()?.to_string();
            if token_len.len() <= id as usize {
                token_len.resize(id as usize + 1, 0);
            }
            token_len[id as usize] = content.len() as u32;
            passes[usize::from(flag("normalized"))].push((content, id));
        }
        let mut added = Vec::new();
        for pass in passes {
            if pass.is_empty() {
                continue;
            }
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(pass.iter().map(|(content, _)| content))
                .ok()?;
            added.push(AddedPass {
                matcher,
                ids: pass.iter().map(|(_, id)| *id).collect(),
            });
        }
        static NEXT_KEY: AtomicU64 = AtomicU64::new(0);
        Some(Self {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            splitter,
            nfc,
            ignore_merges,
            byte_ids,
            token_len,
            vocab,
            merges,
            added,
            template,
        })
    }

    /// The encoding of `text`, or `None` where this encoder cannot promise the library's
    /// result (NFC text that normalization could change; special tokens requested from a
    /// post-processor it does not know).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Option<ByteEncoding> {
        if self.nfc && text.chars().any(|c| c >= '\u{300}') {
            return None;
        }
        let (before, after) = match (&self.template, add_special_tokens) {
            (_, false) => (&[][..], &[][..]),
            (Some((before, after)), true) => (before.as_slice(), after.as_slice()),
            (None, true) => return None,
        };
        let mut out = ByteEncoding::default();
        for &id in before {
            out.ids.push(id);
            out.offsets.push((0, 0));
            out.special.push(1);
        }
        let mut segments = vec![(0..text.len(), None)];
        for pass in &self.added {
            let mut next = Vec::with_capacity(segments.len());
            for (range, id) in segments {
                if id.is_some() {
                    next.push((range, id));
                    continue;
                }
                let mut at = range.start;
                for m in pass.matcher.find_iter(&text[range.clone()]) {
                    let (start, end) = (range.start + m.start(), range.start + m.end());
                    if start > at {
                        next.push((at..start, None));
                    }
                    next.push((start..end, Some(pass.ids[m.pattern().as_usize()])));
                    at = end;
                }
                if at < range.end {
                    next.push((at..range.end, None));
                }
            }
            segments = next;
        }
        let classes = Classes::get();
        WORD_CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != self.key || cache.1.len() > WORD_CACHE_LIMIT {
                *cache = (self.key, FxHashMap::default());
            }
            for (range, id) in segments {
                if let Some(id) = id {
                    out.ids.push(id);
                    out.offsets.push((range.start, range.end));
                    out.special.push(0);
                    continue;
                }
                let mut at = range.start;
                let piece_text = &text[..range.end];
                while at < range.end {
                    let end = self.splitter.piece_end(classes, piece_text, at);
                    let word = &text.as_bytes()[at..end];
                    let ids = match cache.1.get(word) {
                        Some(ids) => ids,
                        None => {
                            let ids = self.word_ids(word).into_boxed_slice();
                            cache.1.entry(word.into()).or_insert(ids)
                        }
                    };
                    let mut start = at;
                    for &id in ids.iter() {
                        let len = self.token_len[id as usize] as usize;
                        out.ids.push(id);
                        out.offsets.push((start, start + len));
                        out.special.push(0);
                        start += len;
                    }
                    at = end;
                }
            }
        });
        let end = text.len();
        for &id in after {
            out.ids.push(id);
            out.offsets.push((end, end));
            out.special.push(1);
        }
        Some(out)
    }

    /// The BPE ids of one pre-tokenized word: lowest-ranked adjacent pair merged first,
    /// leftmost first among equals.
    fn word_ids(&self, word: &[u8]) -> Vec<u32> {
        if self.ignore_merges {
            if let Some(id) = self.vocab.get(word) {
                return vec![*id];
            }
        }
        let mut ids: Vec<u32> = word.iter().map(|b| self.byte_ids[*b as usize]).collect();
        if ids.len() < 2 {
            return ids;
        }
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, u32)>>,
                    ids: &[u32],
                    left: usize,
                    right: usize| {
            if let Some(&(rank, new)) = self.merges.get(&(ids[left], ids[right])) {
                heap.push(std::cmp::Reverse((rank, left, new)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &ids, i, i + 1);
        }
        while let Some(std::cmp::Reverse((rank, left, new))) = heap.pop() {
            let right = next[left];
            if !alive[left] || right >= n {
                continue;
            }
            if self.merges.get(&(ids[left], ids[right])) != Some(&(rank, new)) {
                continue;
            }
            ids[left] = new;
            alive[right] = false;
            next[left] = next[right];
            if next[left] < n {
                prev[next[left]] = left;
            }
            if prev[left] < n {
                push(&mut heap, &ids, prev[left], left);
            }
            if next[left] < n {
                push(&mut heap, &ids, left, next[left]);
            }
        }
        (0..n).filter(|i| alive[*i]).map(|i| ids[i]).collect()
    }
}

type WordCache = (u64, FxHashMap<Box<[u8]>, Box<[u32]>>);

thread_local! {
    static WORD_CACHE: RefCell<WordCache> = RefCell::new((u64::MAX, FxHashMap::default()));
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{
        OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
    };

    use super::*;

    const GPT2_PATTERN: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    fn pieces(splitter: Splitter, text: &str) -> Vec<(usize, usize)> {
        let classes = Classes::get();
        let mut out = vec![];
        let mut at = 0;
        while at < text.len() {
            let end = splitter.piece_end(classes, text, at);
            assert!(end > at, "no progress at {at} in {text:?}");
            out.push((at, end));
            at = end;
        }
        out
    }

    fn library_pieces(pre: &dyn PreTokenizer, text: &str) -> Vec<(usize, usize)> {
        let mut pts = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut pts).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, offsets, _)| offsets)
            .collect()
    }

    fn library_splitters() -> Vec<(Splitter, Box<dyn PreTokenizer>)> {
        let split = |pattern: &str| -> Box<dyn PreTokenizer> {
            Box::new(
                Split::new(
                    SplitPattern::Regex(pattern.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap(),
            )
        };
        vec![
            (Splitter::Gpt2, split(GPT2_PATTERN)),
            (Splitter::Llama3 { max_digits: 3 }, split(LLAMA3_PATTERN)),
            (Splitter::Llama3 { max_digits: 1 }, split(QWEN2_PATTERN)),
        ]
    }

    #[test]
    fn splitters_tile_text_into_the_regex_pieces() {
        let text = |t: &str, p: &[(usize, usize)]| -> Vec<String> {
            p.iter().map(|(a, b)| t[*a..*b].to_string()).collect()
        };
        let gpt2 = "I'm  here, 12345 times!\n\n x";
        assert_eq!(
            text(gpt2, &pieces(Splitter::Gpt2, gpt2)),
            ["I", "'m", " ", " here", ",", " 12345", " times", "!", "\n\n", " x"]
        );
        let llama3 = "I'M  here, 12345 (times)!\n\n x  ";
        assert_eq!(
            text(llama3, &pieces(Splitter::Llama3 { max_digits: 3 }, llama3)),
            ["I", "'M", " ", " here", ",", " ", "123", "45", " (", "times", ")!\n\n", " x", "  "]
        );
    }

    /// Every assigned Unicode scalar value (planes 0 to 3 and 14; a sample of the unassigned
    /// and private-use planes), in contexts that exercise each branch of the regexes, splits as
    /// the library's regex engine splits it.
    #[test]
    fn every_character_splits_as_the_library_splits_it() {
        let contexts = ["a{}{}1", " {}.", "'{}", "'r{}", "'l{}", "\n{}"];
        let chars: Vec<char> = (0u32..=0x10FFFF)
            .filter(|c| *c < 0x40000 || (0xE0000..0xF0000).contains(c) || c % 97 == 0)
            .filter_map(char::from_u32)
            .collect();
        for (splitter, library) in library_splitters().into_iter().take(2) {
            for chunk in chars.chunks(4096) {
                let mut text = String::new();
                for c in chunk {
                    for context in contexts {
                        text.push_str(&context.replace("{}", &c.to_string()));
                        text.push('x');
                    }
                }
                let ours = pieces(splitter, &text);
                let theirs = library_pieces(library.as_ref(), &text);
                if ours != theirs {
                    let at = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap();
                    let from = ours[at].0.saturating_sub(16);
                    let from = (0..=from)
                        .rev()
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap();
                    panic!(
                        "{splitter:?}: ours {:?}, library {:?}, near {:?}",
                        &ours[at..(at + 3).min(ours.len())],
                        &theirs[at..(at + 3).min(theirs.len())],
                        &text[from..(from + 40).min(text.len())]
                    );
                }
            }
        }
    }

    /// Widens a byte range to whole characters, as the library reports a token holding part
    /// of a character.
    pub(crate) fn widen(text: &str, (mut start, mut end): (usize, usize)) -> (usize, usize) {
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        while !text.is_char_boundary(end) {
            end += 1;
        }
        (start, end)
    }

    fn random_text(rng: &mut impl Rng) -> String {
        const FRAGMENTS: &[&str] = &[
            "the",
            " quick",
            " brown",
            "Fox",
            " jumps",
            "over",
            " lazy",
            "dog",
            "The",
            "I",
            "'s",
            "'T",
            "'re",
            "'VE",
            "'m",
            "'ll",
            "'D",
            "'",
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            "\r\n",
            "\t",
            " \n ",
            "0",
            "12",
            "345",
            "6789",
            "2024",
            ".",
            ",",
            "!?",
            "...",
            "(",
            ")",
            "\"",
            "[x]",
            "{}",
            "#",
            "$5.00",
            "--",
            "—",
            "“",
            "”",
            "é",
            "ü",
            "ñ",
            "Ω",
            "ß",
            "ſ",
            "e\u{301}",
            "\u{300}",
            "日本語",
            "中文",
            "한국어",
            "🚀",
            "👍🏽",
            "\u{a0}",
            "\u{3000}",
            "\u{2028}",
            "١٢٣",
            "Ⅻ",
            "½",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|im",
            "|>",
            "<tool>",
            "user",
            "assistant",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ];
        let n = rng.random_range(0..40);
        (0..n)
            .map(|_| FRAGMENTS[rng.random_range(0..FRAGMENTS.len())])
            .collect()
    }

    /// The fixture tokenizer reconfigured as GPT-2, Llama 3 and Qwen 2 configure theirs.
    fn tokenizer_variants() -> Vec<(&'static str, tokenizers::Tokenizer)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
        let base: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let split_then_bytes = |pattern: &str| {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]})
        };
        let vocab_size = base["model"]["vocab"].as_object().unwrap().len();
        let mut llama3 = base.clone();
        llama3["pre_tokenizer"] = split_then_bytes(LLAMA3_PATTERN);
        llama3["model"]["ignore_merges"] = true.into();
        llama3["post_processor"] = serde_json::json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
        ]});
        llama3["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": vocab_size + 7, "content": "<tool>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": true, "special": false
            }));
        let mut qwen2 = base.clone();
        qwen2["pre_tokenizer"] = split_then_bytes(QWEN2_PATTERN);
        qwen2["normalizer"] = serde_json::json!({"type": "NFC"});
        [("gpt2", base), ("llama3", llama3), ("qwen2", qwen2)]
            .into_iter()
            .map(|(name, json)| {
                (
                    name,
                    tokenizers::Tokenizer::from_bytes(json.to_string()).unwrap(),
                )
            })
            .collect()
    }

    /// Ids, special-token masks and offsets equal the library's on random text mixing
    /// scripts, whitespace, digits, contractions and added tokens, with and without special
    /// tokens; with the cache cold and warm.
    #[test]
    fn encodings_equal_the_library_encodings() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let texts: Vec<String> = (0..1500).map(|_| random_text(&mut rng)).collect();
        for (name, library) in tokenizer_variants() {
            let ours = ByteLevelBpe::from_json(&serde_json::to_value(&library).unwrap())
                .unwrap_or_else(|| panic!("{name}: no fast encoder"));
            let mut compared = 0;
            for pass in 0..2 {
                for text in &texts {
                    for add_special in [false, true] {
                        let expected = library.encode(text.as_str(), add_special).unwrap();
                        let Some(got) = ours.encode(text, add_special) else {
                            assert!(name == "qwen2" && text.chars().any(|c| c >= '\u{300}'));
                            continue;
                        };
                        compared += 1;
                        let context =
                            format!("{name}, pass {pass}, special {add_special}: {text:?}");
                        assert_eq!(got.ids, expected.get_ids(), "{context}");
                        assert_eq!(got.special, expected.get_special_tokens_mask(), "{context}");
                        for (i, offsets) in got.offsets.iter().enumerate() {
                            if got.special[i] == 0 {
                                assert_eq!(
                                    widen(text, *offsets),
                                    expected.get_offsets()[i],
                                    "{context}"
                                );
                            }
                        }
                    }
                }
            }
            assert!(compared > 500, "{name}: only {compared} compared");
        }
    }
}
