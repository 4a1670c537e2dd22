//! Reads dataset files into rows: JSON lines, JSON (an array of records, one record, or a
//! dict of columns), CSV, parquet and plain text, from single files, directories and globs.
//! Every row remembers its file and line (or row), so later errors can point at it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

pub use axl_plugin_api::payload::kind_of;

use super::error::{DataError, Location, Result};

/// A file format of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON document: an array of records, or a dict of equally long columns.
    Json,
    /// One JSON record per line.
    JsonLines,
    /// Comma-separated values with a header line.
    Csv,
    /// Apache Parquet.
    Parquet,
    /// One `text` record per line.
    Text,
}

impl Format {
    /// The format a file name implies.
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        Some(match name.rsplit('.').next()? {
            "jsonl" | "ndjson" => Self::JsonLines,
            "json" => Self::Json,
            "csv" => Self::Csv,
            "parquet" => Self::Parquet,
            "txt" | "text" => Self::Text,
            _ => return None,
        })
    }

    /// The format an Axolotl `ds_type` names.
    pub fn from_ds_type(ds_type: &str) -> Option<Self> {
        Some(match ds_type {
            "json" => Self::Json,
            "jsonl" => Self::JsonLines,
            "csv" => Self::Csv,
            "parquet" => Self::Parquet,
            "text" => Self::Text,
            _ => return None,
        })
    }
}

/// One record of a dataset with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The record's fields.
    pub fields: Map<String, Value>,
    /// The file.
    pub file: Arc<PathBuf>,
    /// The line or row in the file.
    pub location: Location,
}

impl Row {
    /// An error about this row.
    pub fn error(&self, message: impl Into<String>) -> DataError {
        DataError::msg(message).at(self.file.as_path(), Some(self.location))
    }

    /// An error about a field of this row.
    pub fn field_error(&self, field: &str, message: impl Into<String>) -> DataError {
        self.error(message).field(field)
    }
}

/// The files a dataset path names: the file itself, the data files of a directory (sorted),
/// or the matches of a glob.
pub fn expand(path: &Path) -> Result<Vec<PathBuf>> {
    let text = path.to_string_lossy();
    if text.contains(['*', '?', '[']) {
        let mut files: Vec<PathBuf> = glob::glob(&text)
            .map_err(|e| DataError::msg(format!("invalid glob `{text}`: {e}")))?
            .filter_map(|entry| entry.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::msg(format!("no file matches `{text}`")));
        }
        return Ok(files);
    }
    if path.is_dir() {
        let mut files = Vec::new();
        collect_data_files(path, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(DataError::msg(
                "no .jsonl, .json, .csv, .parquet or .txt file in this directory",
            )
            .at(path, None));
        }
        return Ok(files);
    }
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    Err(DataError::msg("no such file or directory").at(path, None))
}

fn collect_data_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| DataError::msg(e.to_string()).at(dir, None))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_data_files(&path, out)?;
        } else if Format::from_path(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads every row of a file.
pub fn read_file(path: &Path, format: Format) -> Result<Vec<Row>> {
    let file = Arc::new(path.to_path_buf());
    let error =
        |message: String, location: Option<Location>| DataError::msg(message).at(path, location);
    match format {
        Format::Parquet => read_parquet(path, &file),
        Format::Csv => read_csv(path, &file),
        Format::JsonLines | Format::Json | Format::Text => {
            let bytes =
                std::fs::read(path).map_err(|e| error(format!("cannot read: {e}"), None))?;
            let bytes = if path.extension().is_some_and(|e| e == "gz") {
                gunzip(&bytes).map_err(|e| error(e, None))?
            } else {
                bytes
            };
            let text =
                String::from_utf8(bytes).map_err(|e| error(format!("not UTF-8: {e}"), None))?;
            match format {
                Format::Text => Ok(text
                    .lines()
                    .enumerate()
                    .map(|(i, line)| Row {
                        fields: Map::from_iter([(
                            "text".to_string(),
                            Value::String(line.to_string()),
                        )]),
                        file: file.clone(),
                        location: Location::Line(i + 1),
                    })
                    .collect()),
                Format::Json if looks_like_one_document(&text) => {
                    read_json_document(&text, path, &file)
                }
                _ => read_json_lines(&text, path, &file),
            }
        }
    }
}

fn gunzip(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("not a valid gzip file: {e}"))?;
    Ok(out)
}

/// A `.json` file is one document when it is an array, or an object spanning several lines
/// whose values are columns; otherwise it is read as JSON lines, as `datasets` does.
fn looks_like_one_document(text: &str) -> bool {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return true;
    }
    if !trimmed.starts_with('{') {
        return false;
    }
    let mut lines = trimmed.lines().filter(|l| !l.trim().is_empty());
    let first_is_whole = lines
        .next()
        .is_some_and(|l| serde_json::from_str::<Value>(l).is_ok());
    !first_is_whole || lines.next().is_none()
}

fn read_json_lines(text: &str, path: &Path, file: &Arc<PathBuf>) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = Location::Line(i + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| DataError::msg(format!("malformed JSON: {e}")).at(path, Some(location)))?;
        let Value::Object(fields) = value else {
            return Err(DataError::msg("expected a JSON object").at(path, Some(location)));
        };
        rows.push(Row {
            fields,
            file: file.clone(),
            location,
        });
    }
    Ok(rows)
}

fn read_json_document(text: &str, path: &Path, file: &Arc<PathBuf>) -> Result<Vec<Row>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        DataError::msg(format!("malformed JSON: {e}")).at(path, Some(Location::Line(e.line())))
    })?;
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(fields) => Ok(Row {
                    fields,
                    file: file.clone(),
                    location: Location::Row(i),
                }),
                _ => Err(DataError::msg("expected a JSON object").at(path, Some(Location::Row(i)))),
            })
            .collect(),
        Value::Object(columns) if columns.values().all(Value::is_array) && !columns.is_empty() => {
            let len = columns
                .values()
                .next()
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if let Some((name, _)) = columns
                .iter()
                .find(|(_, v)| v.as_array().map_or(0, Vec::len) != len)
            {
                return Err(DataError::msg(format!(
                    "column `{name}` has a different length than the others"
                ))
                .at(path, None));
            }
            Ok((0..len)
                .map(|i| Row {
                    fields: columns
                        .iter()
                        .map(|(k, v)| (k.clone(), v[i].clone()))
                        .collect(),
                    file: file.clone(),
                    location: Location::Row(i),
                })
                .collect())
        }
        Value::Object(fields) => Ok(vec![Row {
            fields,
            file: file.clone(),
            location: Location::Row(0),
        }]),
        _ => Err(DataError::msg("expected an array of objects, or an object").at(path, None)),
    }
}

fn read_csv(path: &Path, file: &Arc<PathBuf>) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| DataError::msg(format!("cannot read: {e}")).at(path, None))?;
    let headers = reader
        .headers()
        .map_err(|e| {
            DataError::msg(format!("malformed CSV header: {e}")).at(path, Some(Location::Line(1)))
        })?
        .clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            DataError::msg(format!("malformed CSV: {e}")).at(path, line.map(Location::Line))
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let fields = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Row {
            fields,
            file: file.clone(),
            location: Location::Line(line),
        });
    }
    Ok(rows)
}

fn read_parquet(path: &Path, file: &Arc<PathBuf>) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let error = |m: String| DataError::msg(m).at(path, None);
    let handle = std::fs::File::open(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(handle)
        .map_err(|e| error(format!("not a valid parquet file: {e}")))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| error(format!("cannot read rows: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| {
            DataError::msg(format!("cannot decode: {e}")).at(path, Some(Location::Row(i)))
        })?;
        let Value::Object(fields) = row.to_json_value() else {
            return Err(DataError::msg("row is not a record").at(path, Some(Location::Row(i))));
        };
        rows.push(Row {
            fields,
            file: file.clone(),
            location: Location::Row(i),
        });
    }
    Ok(rows)
}

/// Keeps shard `index` of `count` contiguous shards, as `datasets`' `Dataset.shard(count, index,
/// contiguous=True)` does.
pub fn shard(rows: Vec<Row>, count: usize, index: usize) -> Result<Vec<Row>> {
    if count == 0 || index >= count {
        return Err(DataError::msg(format!(
            "shards_idx {index} is not below shards {count}"
        )));
    }
    let len = rows.len();
    let (base, extra) = (len / count, len % count);
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    Ok(rows.into_iter().skip(start).take(size).collect())
}
