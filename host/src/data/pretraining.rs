//! `pretraining_dataset`: rows streamed from their files and tokenized on the fly, packed into
//! bins as they come, so a corpus of any size trains without being prepared ahead. The stream
//! has no length; training needs `max_steps`.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::config::{DatasetConfig, DatasetType};
use super::error::{DataError, Result};
use super::example::{tokenize, Tokenized};
use super::packing::Batch;
use super::source::{self, Format, Row};
use super::strategy::{Strategy, StrategyContext};
use super::Location;

/// Rows read lazily: JSON lines one at a time, other formats a file at a time.
struct RowStream {
    files: VecDeque<(PathBuf, Format)>,
    current: Option<Box<dyn Iterator<Item = Result<Row>> + Send>>,
}

impl RowStream {
    fn next_row(&mut self) -> Option<Result<Row>> {
        loop {
            if let Some(rows) = &mut self.current {
                if let Some(row) = rows.next() {
                    return Some(row);
                }
            }
            let (path, format) = self.files.pop_front()?;
            self.current = Some(match format {
                Format::JsonLines => match std::fs::File::open(&path) {
                    Ok(f) => {
                        let file = Arc::new(path.clone());
                        Box::new(std::io::BufReader::new(f).lines().enumerate().filter_map(
                            move |(i, line)| {
                                let location = Location::Line(i + 1);
                                let line = match line {
                                    Ok(l) if l.trim().is_empty() => return None,
                                    Ok(l) => l,
                                    Err(e) => {
                                        return Some(Err(DataError::msg(format!(
                                            "cannot read: {e}"
                                        ))
                                        .at(file.as_path(), Some(location))))
                                    }
                                };
                                Some(match serde_json::from_str::<Value>(&line) {
                                    Ok(Value::Object(fields)) => Ok(Row {
                                        fields,
                                        file: file.clone(),
                                        location,
                                    }),
                                    Ok(_) => Err(DataError::msg("expected a JSON object")
                                        .at(file.as_path(), Some(location))),
                                    Err(e) => Err(DataError::msg(format!("malformed JSON: {e}"))
                                        .at(file.as_path(), Some(location))),
                                })
                            },
                        ))
                    }
                    Err(e) => Box::new(std::iter::once(Err(DataError::msg(format!(
                        "cannot read: {e}"
                    ))
                    .at(&path, None)))),
                },
                other => match source::read_file(&path, other) {
                    Ok(rows) => Box::new(rows.into_iter().map(Ok)),
                    Err(e) => Box::new(std::iter::once(Err(e))),
                },
            });
        }
    }
}

/// Packed batches of a streamed dataset, in file order.
pub struct PretrainingStream<'a> {
    rows: RowStream,
    strategy: Strategy,
    ctx: StrategyContext<'a>,
    capacity: usize,
    sequence_len: usize,
    pad_id: u32,
    pending: VecDeque<Tokenized>,
    label: String,
}

impl<'a> PretrainingStream<'a> {
    /// A stream over the dataset's files. Plain-text corpora (`type: pretrain` or none) train
    /// on every token; other types format rows with their prompt strategy.
    pub fn new(
        ds: &DatasetConfig,
        files: Vec<PathBuf>,
        forced: Option<Format>,
        ctx: StrategyContext<'a>,
        sequence_len: usize,
        micro_batch_size: usize,
    ) -> Result<Self> {
        let label = format!(
            "pretraining_dataset ({})",
            ds.path.as_deref().unwrap_or("no path")
        );
        let files = files
            .into_iter()
            .map(|f| {
                let format = forced.or_else(|| Format::from_path(&f)).ok_or_else(|| {
                    DataError::msg("cannot tell the file format from the extension; set ds_type")
                        .at(&f, None)
                })?;
                Ok((f, format))
            })
            .collect::<Result<_>>()
            .map_err(|e: DataError| e.in_dataset(&label))?;
        let plain_text = match &ds.kind {
            None => true,
            Some(DatasetType::Name(n)) => n == "pretrain" || n.is_empty(),
            Some(DatasetType::UserDefined(_)) => false,
        };
        let strategy = if plain_text {
            let corpus = DatasetConfig {
                kind: Some(DatasetType::Name("completion".into())),
                field: Some(ds.text_column.clone().unwrap_or_else(|| "text".into())),
                ..ds.clone()
            };
            Strategy::for_dataset(&corpus, &ctx)
        } else {
            Strategy::for_dataset(ds, &ctx)
        }
        .map_err(|e| e.in_dataset(&label))?;
        let pad_id = ctx.tokenizer.padding_id();
        let mut stream = Self {
            rows: RowStream {
                files,
                current: None,
            },
            strategy,
            ctx,
            capacity: sequence_len * micro_batch_size.max(1),
            sequence_len,
            pad_id,
            pending: VecDeque::new(),
            label,
        };
        for _ in 0..ds.skip.unwrap_or(0) {
            if stream
                .rows
                .next_row()
                .transpose()
                .map_err(|e| e.in_dataset(&stream.label))?
                .is_none()
            {
                break;
            }
        }
        Ok(stream)
    }

    fn examples_of(&self, row: &Row) -> Result<Vec<Tokenized>> {
        let mut out = Vec::new();
        for f in self.strategy.format(row, self.ctx.tokenizer)? {
            out.extend(
                tokenize(f, self.ctx.tokenizer, self.sequence_len)
                    .map_err(|e| e.at(row.file.as_path(), Some(row.location)))?,
            );
        }
        Ok(out)
    }

    /// The next packed batch, or `None` when the stream is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let mut members: Vec<Tokenized> = Vec::new();
        let mut used = 0;
        loop {
            if let Some(next) = self.pending.front() {
                if used + next.len() > self.capacity && !members.is_empty() {
                    break;
                }
                let next = self.pending.pop_front().expect("checked");
                used += next.len();
                members.push(next);
                continue;
            }
            match self.rows.next_row() {
                Some(row) => {
                    let row = row.map_err(|e| e.in_dataset(&self.label))?;
                    self.pending.extend(
                        self.examples_of(&row)
                            .map_err(|e| e.in_dataset(&self.label))?,
                    );
                }
                None => break,
            }
        }
        if members.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&Tokenized> = members.iter().collect();
        Ok(Some(Batch::packed(&refs, self.pad_id, Some(self.capacity))))
    }
}

impl std::fmt::Debug for PretrainingStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PretrainingStream")
            .field("label", &self.label)
            .field("capacity", &self.capacity)
            .finish()
    }
}
