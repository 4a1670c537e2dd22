//! The prepared-dataset cache: tokenized examples stored under a key that covers everything
//! that shapes them — the settings and dataset entries, the **contents** of every data file,
//! the tokenizer files, and the version of the code that formats rows — so a cached result is
//! never stale: editing one row of a file gives a new key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::config::DatasetConfig;
use super::error::{DataError, Result};
use super::example::Tokenized;
use super::pipeline::{DataSettings, DatasetReport};
use crate::fsio;
use crate::model::ops::IGNORE_INDEX;

const MAGIC: &[u8; 8] = b"AXLDATA3";
/// Bumped whenever formatting or tokenization changes what a row becomes.
const FORMAT_VERSION: &str = "2";
/// Files of a tokenizer directory that shape tokenization and templates.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Incrementally computes a cache key.
pub struct CacheKey(Sha256);

impl CacheKey {
    /// A key covering the settings and the dataset entries.
    pub fn new(settings: &DataSettings, datasets: &[DatasetConfig]) -> Self {
        let mut h = Sha256::new();
        h.update(format!(
            "axl {} data format {FORMAT_VERSION}\n",
            env!("CARGO_PKG_VERSION")
        ));
        h.update(serde_json::to_string(settings).unwrap_or_default());
        h.update(serde_json::to_string(datasets).unwrap_or_default());
        Self(h)
    }

    /// Adds a file's name and contents.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| DataError::msg(format!("cannot read: {e}")).at(path, None))?;
        self.0.update(path.to_string_lossy().as_bytes());
        self.0.update([0]);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| DataError::msg(format!("cannot read: {e}")).at(path, None))?;
            if n == 0 {
                break;
            }
            self.0.update(&buf[..n]);
        }
        self.0.update([0]);
        Ok(())
    }

    /// Adds the tokenizer files of a directory.
    pub fn add_tokenizer(&mut self, dir: &Path) -> Result<()> {
        for name in TOKENIZER_FILES {
            let path = dir.join(name);
            if path.is_file() {
                self.add_file(&path)?;
            }
        }
        Ok(())
    }

    /// Adds other identifying bytes (e.g. a plugin's content hash).
    pub fn add_bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The key, as hex.
    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A prepared dataset as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// The examples.
    pub examples: Vec<Tokenized>,
    /// What happened to each dataset.
    pub reports: Vec<DatasetReport>,
}

fn examples_file(dir: &Path) -> PathBuf {
    dir.join("examples.bin")
}

fn report_file(dir: &Path) -> PathBuf {
    dir.join("report.json")
}

/// How an example's labels are stored.
const LABELS_FROM_MASK: u8 = 0;
const LABELS_EXPLICIT: u8 = 1;
/// Set on the label encoding when the example's plugin fields follow its labels (a `u32`
/// length and JSON).
const WITH_FIELDS: u8 = 0x80;

fn encode_example(e: &Tokenized, out: &mut Vec<u8>) {
    out.extend_from_slice(&(e.len() as u32).to_le_bytes());
    for id in &e.input_ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    // Labels are almost always "the id where trained, -100 elsewhere": one bit per token.
    let from_mask = e
        .input_ids
        .iter()
        .zip(&e.labels)
        .all(|(id, l)| *l == IGNORE_INDEX || *l == *id as i64);
    let with_fields = if e.fields.is_some() { WITH_FIELDS } else { 0 };
    if from_mask {
        out.push(LABELS_FROM_MASK | with_fields);
        let mut bits = vec![0u8; e.len().div_ceil(8)];
        for (i, l) in e.labels.iter().enumerate() {
            if *l != IGNORE_INDEX {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bits);
    } else {
        out.push(LABELS_EXPLICIT | with_fields);
        for label in &e.labels {
            out.extend_from_slice(&(*label as i32).to_le_bytes());
        }
    }
    if let Some(fields) = &e.fields {
        let json = serde_json::to_vec(fields).expect("a JSON map serializes");
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
    }
}

/// Stores a prepared dataset in `dir` (atomically: the examples first, the report last, and a
/// reader only trusts a directory whose report exists).
pub fn store(dir: &Path, prepared: &Prepared) -> Result<()> {
    let path = examples_file(dir);
    fsio::write_atomic_with(&path, |file| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&(prepared.examples.len() as u64).to_le_bytes())?;
        let mut buf = Vec::new();
        for e in &prepared.examples {
            buf.clear();
            encode_example(e, &mut buf);
            out.write_all(&buf)?;
        }
        out.flush()
    })
    .map_err(|e| DataError::msg(format!("cannot write: {e}")).at(&path, None))?;
    let report = report_file(dir);
    let json =
        serde_json::to_value(&prepared.reports).map_err(|e| DataError::msg(e.to_string()))?;
    fsio::write_json_atomic(&report, &json)
        .map_err(|e| DataError::msg(format!("cannot write: {e}")).at(&report, None))
}

/// Loads a prepared dataset from `dir`, if a complete one is there.
pub fn load(dir: &Path) -> Result<Option<Prepared>> {
    let report = report_file(dir);
    let path = examples_file(dir);
    if !report.is_file() || !path.is_file() {
        return Ok(None);
    }
    let corrupt = |m: &str| {
        DataError::msg(format!(
            "corrupt prepared dataset ({m}); delete it to rebuild"
        ))
        .at(&path, None)
    };
    let reports: Vec<DatasetReport> = serde_json::from_str(
        &std::fs::read_to_string(&report)
            .map_err(|e| DataError::msg(e.to_string()).at(&report, None))?,
    )
    .map_err(|_| corrupt("report.json"))?;
    let bytes = std::fs::read(&path)
        .map_err(|e| DataError::msg(format!("cannot read: {e}")).at(&path, None))?;
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let mut at = 8;
    let mut take = |n: usize| -> Result<&[u8]> {
        let slice = bytes.get(at..at + n).ok_or_else(|| corrupt("truncated"))?;
        at += n;
        Ok(slice)
    };
    let count = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
    let mut examples = Vec::with_capacity(count.min(1 << 24));
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let input_ids: Vec<u32> = take(4 * len)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let encoding = take(1)?[0];
        let labels = match encoding & !WITH_FIELDS {
            LABELS_FROM_MASK => {
                let bits = take(len.div_ceil(8))?;
                input_ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        if bits[i / 8] & (1 << (i % 8)) != 0 {
                            *id as i64
                        } else {
                            IGNORE_INDEX
                        }
                    })
                    .collect()
            }
            LABELS_EXPLICIT => take(4 * len)?
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            _ => return Err(corrupt("bad label encoding")),
        };
        let fields = if encoding & WITH_FIELDS != 0 {
            let n = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            let fields =
                serde_json::from_slice(take(n)?).map_err(|_| corrupt("bad example fields"))?;
            Some(std::sync::Arc::new(fields))
        } else {
            None
        };
        examples.push(Tokenized {
            input_ids,
            labels,
            fields,
        });
    }
    Ok(Some(Prepared { examples, reports }))
}

/// Writes examples as JSON lines (`text`, `input_ids`, `labels`) for scripts.
pub fn write_json_lines(
    out: &mut dyn Write,
    examples: &[Tokenized],
    decode: &dyn Fn(&[u32]) -> String,
) -> std::io::Result<()> {
    for e in examples {
        let line = serde_json::json!({"text": decode(&e.input_ids), "input_ids": e.input_ids, "labels": e.labels});
        writeln!(out, "{line}")?;
    }
    Ok(())
}
