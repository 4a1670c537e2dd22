//! An lm-evaluation-harness task file, as far as axl's harness reads it: the documents of a
//! local JSON or JSON-lines file, and how a document becomes a prompt, choices and a target.
//!
//! Read keys: `task`, `dataset_path` (`json`, or the path of a `.json`/`.jsonl` file),
//! `dataset_kwargs.data_files`, `test_split`, `validation_split`, `training_split`,
//! `fewshot_split`, `output_type` (`multiple_choice`, `generate_until`), `doc_to_text`,
//! `doc_to_target`, `doc_to_choice`, `description`, `target_delimiter`, `fewshot_delimiter`,
//! `num_fewshot`, `fewshot_config.sampler` (`first_n`, or the default seeded draw),
//! `generation_kwargs` (`until`, `max_gen_toks`, `do_sample`, `temperature`), `metric_list`
//! and `metadata.version`. Templates are Jinja, with lm-eval's rules: a bare field name is
//! that field, a rendered integer is an index when there are choices, a rendered list is
//! read as a list. Python hooks (`!function`, `process_docs`) are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A task's failure, for the user.
pub type Result<T> = std::result::Result<T, String>;

/// What a task asks of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputType {
    /// The log-likelihood of each choice after the prompt.
    MultipleChoice,
    /// Text generated after the prompt, until a stop string.
    GenerateUntil,
}

/// One entry of `metric_list`.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// `acc`, `acc_norm` or `exact_match`.
    pub name: String,
    /// Whether higher is better.
    pub higher_is_better: bool,
    /// `exact_match`: compare lowercased.
    pub ignore_case: bool,
    /// `exact_match`: drop ASCII punctuation before comparing.
    pub ignore_punctuation: bool,
    /// `exact_match`: strings removed before comparing.
    pub regexes_to_ignore: Vec<String>,
}

/// A task file, read.
#[derive(Clone, Debug)]
pub struct Task {
    /// The task's name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The file as written, for the results' `configs`.
    pub config: Value,
    /// Its kind.
    pub output_type: OutputType,
    /// The documents evaluated.
    pub docs: Vec<Value>,
    /// The documents few-shot examples are drawn from.
    pub fewshot_docs: Vec<Value>,
    /// Whether the two are the same split (the evaluated document is then never its own
    /// example).
    pub fewshot_from_eval_split: bool,
    /// `first_n` takes the first documents; otherwise a seeded draw.
    pub fewshot_first_n: bool,
    /// The default number of examples.
    pub num_fewshot: usize,
    /// `description`.
    pub description: String,
    /// `target_delimiter`.
    pub target_delimiter: String,
    /// `fewshot_delimiter`.
    pub fewshot_delimiter: String,
    doc_to_text: Value,
    doc_to_target: Value,
    doc_to_choice: Option<Value>,
    /// The metrics.
    pub metrics: Vec<Metric>,
    /// `generate_until`: the stop strings.
    pub until: Vec<String>,
    /// `generate_until`: the most tokens generated.
    pub max_gen_toks: usize,
    /// `generate_until`: the sampling temperature (0, greedy, unless `do_sample`).
    pub temperature: f64,
    /// `metadata.version`.
    pub version: Value,
    templates: Templates,
}

/// The task's Jinja templates, each compiled on first use and kept (a clone starts empty).
#[derive(Debug)]
struct Templates(std::sync::Mutex<minijinja::Environment<'static>>);

impl Default for Templates {
    fn default() -> Self {
        let mut env = minijinja::Environment::new();
        env.set_keep_trailing_newline(true);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        Self(std::sync::Mutex::new(env))
    }
}

impl Clone for Templates {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// The prompt-side value of a document: text, or an index into the choices.
#[derive(Clone, Debug, PartialEq)]
pub enum Rendered {
    /// Text.
    Text(String),
    /// An index.
    Index(usize),
    /// Several (a list target).
    List(Vec<Rendered>),
}

/// Reads a Python or JSON list literal of strings and integers, as `ast.literal_eval` would.
pub fn parse_list_literal(text: &str) -> Option<Vec<Value>> {
    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) {
        return Some(items);
    }
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        if first == '\'' || first == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '\\' => {
                        let c = chars.next()?;
                        s.push(match c {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    c if c == first => break,
                    c => s.push(c),
                }
            }
            items.push(Value::String(s));
        } else {
            let mut number = String::new();
            while chars.peek().is_some_and(|c| *c != ',') {
                number.push(chars.next()?);
            }
            items.push(Value::from(number.trim().parse::<i64>().ok()?));
        }
    }
    Some(items)
}

fn string_key(config: &Value, key: &str, default: &str) -> String {
    config
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_string()
}

/// The documents of a JSON array file or a JSON-lines file.
fn read_docs(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(Value::Array(docs)) = serde_json::from_str::<Value>(&text) {
        return Ok(docs);
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

impl Task {
    /// Reads the task file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.contains("!function") {
            return Err(format!(
                "{}: `!function` runs Python, which axl's harness does not",
                path.display()
            ));
        }
        let config: Value =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let at = |message: String| format!("{}: {message}", path.display());
        if config.get("process_docs").is_some() || config.get("include").is_some() {
            return Err(at("`process_docs` and `include` are not supported".into()));
        }
        let name = config
            .get("task")
            .and_then(Value::as_str)
            .ok_or_else(|| at("`task:` (the task's name) is missing".into()))?
            .to_string();
        let output_type = match config.get("output_type").and_then(Value::as_str) {
            Some("multiple_choice") => OutputType::MultipleChoice,
            Some("generate_until") | None => OutputType::GenerateUntil,
            Some(other) => {
                return Err(at(format!(
                    "output_type `{other}` is not supported (multiple_choice, generate_until)"
                )))
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let locate = |file: &str| {
            let here = base.join(file);
            if here.exists() {
                here
            } else {
                PathBuf::from(file)
            }
        };
        let dataset_path = string_key(&config, "dataset_path", "json");
        let data_files = config.pointer("/dataset_kwargs/data_files");
        let split_file = |split: &str| -> Option<PathBuf> {
            match data_files {
                Some(Value::String(f)) => Some(locate(f)),
                Some(Value::Object(m)) => m.get(split).and_then(Value::as_str).map(locate),
                _ if dataset_path.ends_with(".json") || dataset_path.ends_with(".jsonl") => {
                    Some(locate(&dataset_path))
                }
                _ => None,
            }
        };
        if data_files.is_none()
            && !(dataset_path.ends_with(".json") || dataset_path.ends_with(".jsonl"))
        {
            return Err(at(format!(
                "dataset_path `{dataset_path}` is not a local file: give `dataset_path: json` with `dataset_kwargs: {{data_files: ...}}`"
            )));
        }
        let split_name = |key: &str| config.get(key).and_then(Value::as_str).map(str::to_string);
        let eval_split = split_name("test_split")
            .or_else(|| split_name("validation_split"))
            .ok_or_else(|| at("needs `test_split` or `validation_split`".into()))?;
        let load_split = |split: &str| -> Result<Vec<Value>> {
            let file = split_file(split)
                .ok_or_else(|| at(format!("no data file for the split `{split}`")))?;
            read_docs(&file)
        };
        let docs = load_split(&eval_split)?;
        let fewshot_split = split_name("fewshot_split")
            .or_else(|| split_name("training_split"))
            .or_else(|| split_name("validation_split"))
            .unwrap_or_else(|| eval_split.clone());
        let fewshot_docs = if fewshot_split == eval_split {
            docs.clone()
        } else {
            load_split(&fewshot_split)?
        };
        let default_metrics: &[&str] = match output_type {
            OutputType::MultipleChoice => &["acc", "acc_norm"],
            OutputType::GenerateUntil => &["exact_match"],
        };
        let metrics = match config.get("metric_list").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .map(|m| {
                    let name = m
                        .get("metric")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let known = match output_type {
                        OutputType::MultipleChoice => ["acc", "acc_norm"].contains(&name.as_str()),
                        OutputType::GenerateUntil => name == "exact_match",
                    };
                    if !known {
                        return Err(at(format!(
                            "metric `{name}` is not supported for this output_type"
                        )));
                    }
                    let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
                    Ok(Metric {
                        higher_is_better: m
                            .get("higher_is_better")
                            .and_then(Value::as_bool)
                            .unwrap_or(true),
                        ignore_case: flag("ignore_case"),
                        ignore_punctuation: flag("ignore_punctuation"),
                        regexes_to_ignore: m
                            .get("regexes_to_ignore")
                            .and_then(Value::as_array)
                            .map(|r| {
                                r.iter()
                                    .filter_map(|v| v.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        name,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            None => default_metrics
                .iter()
                .map(|n| Metric {
                    name: n.to_string(),
                    higher_is_better: true,
                    ignore_case: false,
                    ignore_punctuation: false,
                    regexes_to_ignore: Vec::new(),
                })
                .collect(),
        };
        let fewshot_delimiter = string_key(&config, "fewshot_delimiter", "\n\n");
        let generation = config.get("generation_kwargs");
        let until = match generation.and_then(|g| g.get("until")) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![fewshot_delimiter.clone()],
        };
        let do_sample = generation
            .and_then(|g| g.get("do_sample"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let temperature = if do_sample {
            generation
                .and_then(|g| g.get("temperature"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0)
        } else {
            0.0
        };
        let doc_to_choice = config.get("doc_to_choice").cloned();
        if output_type == OutputType::MultipleChoice && doc_to_choice.is_none() {
            return Err(at("a multiple_choice task needs `doc_to_choice`".into()));
        }
        Ok(Self {
            name,
            path: path.to_path_buf(),
            output_type,
            fewshot_from_eval_split: fewshot_split == eval_split,
            fewshot_first_n: config
                .pointer("/fewshot_config/sampler")
                .and_then(Value::as_str)
                == Some("first_n"),
            num_fewshot: config
                .get("num_fewshot")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
            description: string_key(&config, "description", ""),
            target_delimiter: string_key(&config, "target_delimiter", " "),
            fewshot_delimiter,
            doc_to_text: config.get("doc_to_text").cloned().unwrap_or(Value::Null),
            doc_to_target: config.get("doc_to_target").cloned().unwrap_or(Value::Null),
            doc_to_choice,
            metrics,
            until,
            max_gen_toks: generation
                .and_then(|g| g.get("max_gen_toks"))
                .and_then(Value::as_u64)
                .unwrap_or(256) as usize,
            temperature,
            version: config
                .pointer("/metadata/version")
                .cloned()
                .unwrap_or(Value::Null),
            docs,
            fewshot_docs,
            config,
            templates: Templates::default(),
        })
    }

    /// Renders `template` with the fields of `doc` (lm-eval's `apply_template`).
    pub fn render(&self, template: &str, doc: &Value) -> Result<String> {
        let fail = |e: minijinja::Error| format!("template `{template}`: {e}");
        let mut env = self.templates.0.lock().unwrap_or_else(|e| e.into_inner());
        if env.get_template(template).is_err() {
            env.add_template_owned(template.to_string(), template.to_string())
                .map_err(fail)?;
        }
        env.get_template(template)
            .and_then(|t| t.render(doc))
            .map_err(fail)
    }

    /// A `doc_to_*` value for `doc`: a field, a rendered template, a constant.
    fn apply(&self, spec: &Value, doc: &Value, what: &str) -> Result<Rendered> {
        let choices = self.doc_to_choice.is_some();
        let from_value = |v: &Value| -> Result<Rendered> {
            match v {
                Value::String(s) => Ok(Rendered::Text(s.clone())),
                Value::Number(n) => n
                    .as_u64()
                    .map(|i| Rendered::Index(i as usize))
                    .ok_or_else(|| format!("{what}: {n} is not an index")),
                Value::Array(items) => Ok(Rendered::List(
                    items
                        .iter()
                        .map(|i| match i {
                            Value::Number(n) => {
                                Ok(Rendered::Index(n.as_u64().unwrap_or(0) as usize))
                            }
                            Value::String(s) => Ok(Rendered::Text(s.clone())),
                            other => Err(format!("{what}: unexpected {other}")),
                        })
                        .collect::<Result<Vec<_>>>()?,
                )),
                other => Err(format!("{what}: unexpected {other}")),
            }
        };
        match spec {
            Value::Number(_) => from_value(spec),
            Value::String(template) => {
                if let Some(field) = doc.get(template) {
                    return from_value(field);
                }
                let text = self.render(template, doc)?;
                if choices && !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
                    return Ok(Rendered::Index(
                        text.parse().map_err(|e| format!("{what}: {e}"))?,
                    ));
                }
                if what == "doc_to_target"
                    && text.len() >= 2
                    && text.starts_with('[')
                    && text.ends_with(']')
                {
                    if let Some(items) = parse_list_literal(&text) {
                        return from_value(&Value::Array(items));
                    }
                }
                Ok(Rendered::Text(text))
            }
            Value::Null => Err(format!("`{what}` is missing")),
            other => Err(format!("{what}: unsupported {other}")),
        }
    }

    /// The prompt of `doc`.
    pub fn doc_to_text(&self, doc: &Value) -> Result<String> {
        match self.apply(&self.doc_to_text, doc, "doc_to_text")? {
            Rendered::Text(t) => Ok(t),
            Rendered::Index(i) => {
                let choices = self.doc_to_choice(doc)?;
                choices
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("doc_to_text: index {i} outside the choices"))
            }
            Rendered::List(_) => Err("doc_to_text: a list of prompts is not supported".into()),
        }
    }

    /// The target of `doc`.
    pub fn doc_to_target(&self, doc: &Value) -> Result<Rendered> {
        self.apply(&self.doc_to_target, doc, "doc_to_target")
    }

    /// The choices of `doc`.
    pub fn doc_to_choice(&self, doc: &Value) -> Result<Vec<String>> {
        let spec = self
            .doc_to_choice
            .as_ref()
            .ok_or("the task has no doc_to_choice")?;
        let strings = |items: &[Value]| -> Vec<String> {
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        };
        match spec {
            Value::String(s) => {
                if let Some(Value::Array(items)) = doc.get(s) {
                    return Ok(strings(items));
                }
                let text = self.render(s, doc)?;
                parse_list_literal(&text)
                    .map(|items| strings(&items))
                    .ok_or_else(|| format!("doc_to_choice: `{text}` is not a list"))
            }
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(t) => self.render(t, doc),
                    other => Ok(other.to_string()),
                })
                .collect(),
            Value::Object(map) => Ok(strings(&map.values().cloned().collect::<Vec<_>>())),
            other => Err(format!("doc_to_choice: unsupported {other}")),
        }
    }

    /// The target of a few-shot example, as text.
    fn target_text(&self, doc: &Value) -> Result<String> {
        let pick = |r: Rendered| -> Result<String> {
            match r {
                Rendered::Text(t) => Ok(t),
                Rendered::Index(i) => self
                    .doc_to_choice(doc)?
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format!("doc_to_target: index {i} outside the choices")),
                Rendered::List(_) => Err("nested list target".into()),
            }
        };
        match self.doc_to_target(doc)? {
            Rendered::List(items) => items
                .into_iter()
                .next()
                .map(pick)
                .unwrap_or(Ok(String::new())),
            other => pick(other),
        }
    }

    /// The few-shot examples for the document at `index`: the first `n` (other than it), or
    /// a seeded draw.
    pub fn fewshot_examples(&self, index: usize, n: usize, seed: u64) -> Vec<&Value> {
        if n == 0 {
            return Vec::new();
        }
        let candidates: Vec<usize> = (0..self.fewshot_docs.len())
            .filter(|&i| {
                !(self.fewshot_from_eval_split && self.fewshot_docs[i] == self.docs[index])
            })
            .collect();
        let chosen: Vec<usize> = if self.fewshot_first_n {
            candidates.into_iter().take(n).collect()
        } else {
            // A seeded partial shuffle (splitmix64), one stream per document.
            let mut state = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            };
            let mut pool = candidates;
            let take = n.min(pool.len());
            for i in 0..take {
                let j = i + (next() % (pool.len() - i) as u64) as usize;
                pool.swap(i, j);
            }
            pool.truncate(take);
            pool
        };
        chosen.into_iter().map(|i| &self.fewshot_docs[i]).collect()
    }

    /// The prompt of the document at `index` with `n` examples before it (lm-eval's
    /// `fewshot_context` without a chat template).
    pub fn context(&self, index: usize, n: usize, seed: u64) -> Result<String> {
        let doc = &self.docs[index];
        let mut text = if self.description.is_empty() {
            String::new()
        } else {
            self.render(&self.description, doc)?
        };
        for example in self.fewshot_examples(index, n, seed) {
            text.push_str(&self.doc_to_text(example)?);
            let target = self.target_text(example)?;
            if !target.is_empty() {
                text.push_str(&self.target_delimiter);
                text.push_str(&target);
                text.push_str(&self.fewshot_delimiter);
            }
        }
        text.push_str(&self.doc_to_text(doc)?);
        Ok(text)
    }

    /// The chat turns of the same prompt (lm-eval with `apply_chat_template`): a system turn
    /// for the description, the examples as one user turn or, with `multiturn`, as user and
    /// assistant turns, then the document as the last user turn.
    pub fn chat_context(
        &self,
        index: usize,
        n: usize,
        seed: u64,
        multiturn: bool,
    ) -> Result<Vec<(String, String)>> {
        let doc = &self.docs[index];
        let mut turns = Vec::new();
        if !self.description.is_empty() {
            turns.push(("system".to_string(), self.render(&self.description, doc)?));
        }
        let mut pending = String::new();
        for example in self.fewshot_examples(index, n, seed) {
            let question = self.doc_to_text(example)?;
            let answer = self.target_text(example)?;
            if multiturn {
                turns.push(("user".into(), question));
                turns.push(("assistant".into(), answer));
            } else {
                pending.push_str(&question);
                pending.push_str(&self.target_delimiter);
                pending.push_str(&answer);
                pending.push_str(&self.fewshot_delimiter);
            }
        }
        pending.push_str(&self.doc_to_text(doc)?);
        turns.push(("user".into(), pending));
        Ok(turns)
    }

    /// The index of the correct choices of `doc` (several for a list target).
    pub fn gold_indices(&self, doc: &Value, choices: &[String]) -> Result<Vec<usize>> {
        let index = |r: Rendered| -> Result<usize> {
            match r {
                Rendered::Index(i) if i < choices.len() => Ok(i),
                Rendered::Index(i) => Err(format!(
                    "target index {i} outside {} choices",
                    choices.len()
                )),
                Rendered::Text(t) => choices
                    .iter()
                    .position(|c| *c == t)
                    .ok_or_else(|| format!("target `{t}` is not one of the choices")),
                Rendered::List(_) => Err("nested list target".into()),
            }
        };
        match self.doc_to_target(doc)? {
            Rendered::List(items) => items.into_iter().map(index).collect(),
            other => Ok(vec![index(other)?]),
        }
    }

    /// The reference answers of a `generate_until` document.
    pub fn references(&self, doc: &Value) -> Result<Vec<String>> {
        let text = |r: Rendered| -> Result<String> {
            match r {
                Rendered::Text(t) => Ok(t),
                Rendered::Index(i) => match &self.doc_to_choice {
                    Some(_) => self
                        .doc_to_choice(doc)?
                        .get(i)
                        .cloned()
                        .ok_or_else(|| format!("target index {i} outside the choices")),
                    None => Ok(i.to_string()),
                },
                Rendered::List(_) => Err("nested list target".into()),
            }
        };
        match self.doc_to_target(doc)? {
            Rendered::List(items) => items.into_iter().map(text).collect(),
            other => Ok(vec![text(other)?]),
        }
    }
}

/// The task files under `dirs` (searched recursively), by task name.
pub fn index_tasks(dirs: &[PathBuf]) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let name = std::fs::read_to_string(&path).ok().and_then(|text| {
                    serde_yaml::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("task").and_then(Value::as_str).map(str::to_string))
                });
                if let Some(name) = name {
                    found.entry(name).or_insert(path);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_literals_read_as_python_writes_them() {
        assert_eq!(
            parse_list_literal("['a', \"b\", 'it\\'s']").unwrap(),
            vec![json!("a"), json!("b"), json!("it's")]
        );
        assert_eq!(
            parse_list_literal("[1, 2]").unwrap(),
            vec![json!(1), json!(2)]
        );
        assert_eq!(parse_list_literal("[\"x\"]").unwrap(), vec![json!("x")]);
        assert!(parse_list_literal("a, b").is_none());
    }

    fn task(dir: &Path, yaml: &str, docs: &str) -> Task {
        std::fs::write(dir.join("docs.jsonl"), docs).unwrap();
        std::fs::write(dir.join("t.yaml"), yaml).unwrap();
        Task::load(&dir.join("t.yaml")).unwrap()
    }

    #[test]
    fn prompts_choices_and_targets_follow_lm_evals_rules() {
        let dir = std::env::temp_dir().join(format!("axl-lm-eval-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let docs = "{\"q\": \"2+2\", \"options\": [\"3\", \"4\"], \"answer\": 1}\n{\"q\": \"1+2\", \"options\": [\"3\", \"5\"], \"answer\": 0}\n";
        let t = task(
            &dir,
            "task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\ntest_split: test\noutput_type: multiple_choice\ndescription: \"Sums.\\n\\n\"\ndoc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_choice: options\ndoc_to_target: \"{{answer}}\"\nfewshot_config:\n  sampler: first_n\n",
            docs,
        );
        assert_eq!(t.doc_to_choice(&t.docs[0]).unwrap(), vec!["3", "4"]);
        assert_eq!(
            t.gold_indices(&t.docs[0], &["3".into(), "4".into()])
                .unwrap(),
            vec![1]
        );
        assert_eq!(t.context(0, 0, 0).unwrap(), "Sums.\n\nQ: 2+2\nA:");
        // The first document other than the evaluated one, its answer after the delimiter.
        assert_eq!(
            t.context(0, 1, 0).unwrap(),
            "Sums.\n\nQ: 1+2\nA: 3\n\nQ: 2+2\nA:"
        );
        let chat = t.chat_context(1, 1, 0, true).unwrap();
        assert_eq!(chat[1], ("user".to_string(), "Q: 2+2\nA:".to_string()));
        assert_eq!(chat[2], ("assistant".to_string(), "4".to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
