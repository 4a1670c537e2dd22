//! From `datasets:` to tokenized examples: read each dataset's rows, format and tokenize them
//! in parallel, apply the length policy, merge and shuffle.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::DatasetConfig;
use super::error::{DataError, Result};
use super::example::{tokenize, Tokenized};
use super::hub;
use super::source::{self, Format, Row};
use super::strategy::{PluginFormats, Strategy, StrategyContext};
use crate::model::resolve::HubSettings;
use crate::model::tokenizer::ModelTokenizer;

/// What to do with an example longer than `sequence_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExcessLength {
    /// Leave it out (and count it).
    Drop,
    /// Keep its first `sequence_len` tokens.
    Truncate,
    /// Stop with an error naming it.
    Raise,
}

/// The top-level settings that shape the prepared data.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DataSettings {
    /// Maximum tokens per example.
    pub sequence_len: usize,
    /// Train on prompts too.
    pub train_on_inputs: bool,
    /// Policy for long examples.
    pub excess_length: ExcessLength,
    /// Examples shorter than this are left out (Axolotl's default: 2).
    pub min_sample_len: usize,
    /// Shuffle the merged datasets.
    pub shuffle: bool,
    /// Seed of the shuffle.
    pub seed: u64,
    /// The top-level `chat_template`.
    pub chat_template: Option<String>,
    /// The top-level `chat_template_jinja`.
    pub chat_template_jinja: Option<String>,
    /// The top-level `eot_tokens`.
    pub eot_tokens: Option<Vec<String>>,
    /// The top-level `chat_template_kwargs`, as JSON text (kept as text so settings hash).
    pub chat_template_kwargs: Option<String>,
}

impl DataSettings {
    /// The settings a configuration gives.
    pub fn from_config(c: &crate::config::AxlConfig) -> Self {
        Self {
            sequence_len: c.sequence_len,
            train_on_inputs: c.train_on_inputs,
            excess_length: c.excess_length_strategy.unwrap_or(ExcessLength::Drop),
            min_sample_len: c.min_sample_len.unwrap_or(2),
            shuffle: c.shuffle_merged_datasets,
            seed: c.seed.unwrap_or(42),
            chat_template: c.chat_template.clone(),
            chat_template_jinja: c.chat_template_jinja.clone(),
            eot_tokens: c.eot_tokens.clone(),
            chat_template_kwargs: c
                .chat_template_kwargs
                .as_ref()
                .map(|m| serde_json::Value::Object(m.clone()).to_string()),
        }
    }
}

/// What happened to one dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetReport {
    /// `datasets[i] (path)`.
    pub label: String,
    /// Files read.
    pub files: Vec<PathBuf>,
    /// Rows read.
    pub rows: usize,
    /// Examples kept.
    pub examples: usize,
    /// Examples left out for exceeding `sequence_len`.
    pub dropped_too_long: usize,
    /// Examples cut to `sequence_len`.
    pub truncated: usize,
    /// Examples left out for being shorter than `min_sample_len`.
    pub dropped_too_short: usize,
    /// Tokens kept.
    pub tokens: usize,
    /// Trained tokens kept.
    pub trained_tokens: usize,
}

/// A dataset's files, and the format `ds_type` forces on them (if any).
pub type DatasetFiles = (Vec<PathBuf>, Option<Format>);

/// Where a dataset's files are and how to read them.
pub fn dataset_files(
    ds: &DatasetConfig,
    base_dir: &Path,
    hub_settings: &HubSettings,
) -> Result<DatasetFiles> {
    let path = ds
        .path
        .as_deref()
        .ok_or_else(|| DataError::msg("missing").field("path"))?;
    let forced = match ds.ds_type.as_deref() {
        Some(t) => Some(Format::from_ds_type(t).ok_or_else(|| {
            DataError::msg(format!(
                "`{t}` is not a supported file type (json, jsonl, csv, parquet, text)"
            ))
            .field("ds_type")
        })?),
        None => None,
    };
    let data_files = ds
        .data_files
        .as_ref()
        .map(|d| d.to_vec())
        .unwrap_or_default();
    let local = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        base_dir.join(path)
    };
    let looks_local = local.exists()
        || path.contains(['*', '?', '['])
        || path.starts_with('.')
        || path.starts_with('/');
    if looks_local {
        let files = if !data_files.is_empty() && local.is_dir() {
            let mut files = Vec::new();
            for pattern in &data_files {
                files.extend(source::expand(&local.join(pattern))?);
            }
            files
        } else {
            source::expand(&local)?
        };
        return Ok((files, forced));
    }
    let files = hub::dataset_files(
        path,
        ds.split(),
        ds.name.as_deref(),
        &data_files,
        hub_settings,
    )?;
    Ok((files, forced))
}

fn read_rows(files: &[PathBuf], forced: Option<Format>) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for file in files {
        let format = match forced.or_else(|| Format::from_path(file)) {
            Some(f) => f,
            None => {
                return Err(DataError::msg(
                    "cannot tell the file format from the extension; set ds_type",
                )
                .at(file.as_path(), None))
            }
        };
        rows.extend(source::read_file(file, format)?);
    }
    Ok(rows)
}

/// Formats and tokenizes rows in parallel, in order. Each worker thread has its own copy of
/// the tokenizer: its word cache is then private, not a lock every token contends for.
fn tokenize_rows(
    rows: &[Row],
    strategy: &Strategy,
    tokenizer: &ModelTokenizer,
    sequence_len: usize,
) -> Result<Vec<Vec<Tokenized>>> {
    let one = |tok: &ModelTokenizer, row: &Row| -> Result<Vec<Tokenized>> {
        let mut out = Vec::new();
        for formatted in strategy.format(row, tok)? {
            out.extend(
                tokenize(formatted, tok, sequence_len)
                    .map_err(|e| e.at(row.file.as_path(), Some(row.location)))?,
            );
        }
        Ok(out)
    };
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || rows.len() < 64 {
        return rows.iter().map(|r| one(tokenizer, r)).collect();
    }
    // Small chunks handed out in order keep both workers busy to the end.
    let chunks: Vec<&[Row]> = rows.chunks(rows.len().div_ceil(threads * 16)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<Result<Vec<Vec<Tokenized>>>>>;
    let slots: Vec<Slot> = chunks.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let tok = tokenizer.clone();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(part) = chunks.get(i) else { break };
                    let result = part.iter().map(|r| one(&tok, r)).collect();
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(rows.len());
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(part) => out.extend(part?),
            None => return Err(DataError::msg("a tokenization worker stopped early")),
        }
    }
    Ok(out)
}

/// The label of a dataset in messages.
pub fn dataset_label(index: usize, ds: &DatasetConfig) -> String {
    format!(
        "datasets[{index}] ({})",
        ds.path.as_deref().unwrap_or("no path")
    )
}

/// What strategies need, from the settings: `plugins` are the run's dataset types, axl's
/// built-in ones alone when `None`.
pub fn strategy_context<'a>(
    settings: &'a DataSettings,
    tokenizer: &'a ModelTokenizer,
    base_dir: &'a Path,
    plugins: Option<&PluginFormats>,
) -> Result<StrategyContext<'a>> {
    let plugins = match plugins {
        Some(p) => p.clone(),
        None => PluginFormats::builtin(settings.train_on_inputs)?,
    };
    Ok(StrategyContext {
        train_on_inputs: settings.train_on_inputs,
        chat_template: settings.chat_template.as_deref(),
        chat_template_jinja: settings.chat_template_jinja.as_deref(),
        eot_tokens: settings.eot_tokens.as_deref(),
        chat_template_kwargs: settings
            .chat_template_kwargs
            .as_deref()
            .and_then(|t| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok()
            })
            .unwrap_or_default(),
        base_dir,
        tokenizer,
        plugins,
    })
}

/// Prepares every dataset and merges them. Errors name the dataset, file, line and field.
pub fn prepare(
    datasets: &[DatasetConfig],
    settings: &DataSettings,
    tokenizer: &ModelTokenizer,
    hub_settings: &HubSettings,
    base_dir: &Path,
) -> Result<(Vec<Tokenized>, Vec<DatasetReport>)> {
    let files = resolve_files(datasets, base_dir, hub_settings)?;
    prepare_files(datasets, &files, settings, tokenizer, base_dir, None)
}

/// The files of every dataset (see [`dataset_files`]), errors naming the dataset.
pub fn resolve_files(
    datasets: &[DatasetConfig],
    base_dir: &Path,
    hub_settings: &HubSettings,
) -> Result<Vec<DatasetFiles>> {
    datasets
        .iter()
        .enumerate()
        .map(|(i, ds)| {
            dataset_files(ds, base_dir, hub_settings)
                .map_err(|e| e.in_dataset(dataset_label(i, ds)))
        })
        .collect()
}

/// Prepares every dataset from its already resolved files and merges them.
pub fn prepare_files(
    datasets: &[DatasetConfig],
    files: &[DatasetFiles],
    settings: &DataSettings,
    tokenizer: &ModelTokenizer,
    base_dir: &Path,
    plugins: Option<&PluginFormats>,
) -> Result<(Vec<Tokenized>, Vec<DatasetReport>)> {
    let ctx = strategy_context(settings, tokenizer, base_dir, plugins)?;
    let mut merged = Vec::new();
    let mut reports = Vec::new();
    for (index, (ds, files)) in datasets.iter().zip(files).enumerate() {
        let label = dataset_label(index, ds);
        let (examples, report) =
            prepare_one(ds, files, &label, settings, &ctx).map_err(|e| e.in_dataset(&label))?;
        merged.extend(examples);
        reports.push(report);
    }
    if merged.is_empty() {
        let detail: Vec<String> = reports
            .iter()
            .map(|r| {
                format!(
                    "{}: {} rows, {} too long, {} too short",
                    r.label, r.rows, r.dropped_too_long, r.dropped_too_short
                )
            })
            .collect();
        return Err(DataError::msg(format!(
            "no training example is left ({})",
            detail.join("; ")
        )));
    }
    if settings.shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed);
        merged.shuffle(&mut rng);
    }
    Ok((merged, reports))
}

fn prepare_one(
    ds: &DatasetConfig,
    (files, forced): &DatasetFiles,
    label: &str,
    settings: &DataSettings,
    ctx: &StrategyContext,
) -> Result<(Vec<Tokenized>, DatasetReport)> {
    let strategy = Strategy::for_dataset(ds, ctx)?;
    let mut rows = read_rows(files, *forced)?;
    if let Some(count) = ds.shards {
        rows = source::shard(rows, count, ds.shards_idx.unwrap_or(0))
            .map_err(|e| e.field("shards_idx"))?;
    }
    let row_count = rows.len();
    let tokenized = tokenize_rows(&rows, &strategy, ctx.tokenizer, settings.sequence_len)?;
    let mut report = DatasetReport {
        label: label.to_string(),
        files: files.clone(),
        rows: row_count,
        ..DatasetReport::default()
    };
    let mut kept = Vec::with_capacity(tokenized.len());
    for (row, examples) in rows.iter().zip(tokenized) {
        for mut example in examples {
            if example.len() < settings.min_sample_len {
                report.dropped_too_short += 1;
                continue;
            }
            if example.len() > settings.sequence_len {
                match settings.excess_length {
                    ExcessLength::Drop => {
                        report.dropped_too_long += 1;
                        continue;
                    }
                    ExcessLength::Truncate => {
                        example.input_ids.truncate(settings.sequence_len);
                        example.labels.truncate(settings.sequence_len);
                        report.truncated += 1;
                    }
                    ExcessLength::Raise => {
                        return Err(row.error(format!(
                            "example of {} tokens exceeds sequence_len {} (excess_length_strategy: raise)",
                            example.len(),
                            settings.sequence_len
                        )));
                    }
                }
            }
            report.tokens += example.len();
            report.trained_tokens += example.trained();
            kept.push(example);
        }
    }
    report.examples = kept.len();
    Ok((kept, report))
}
