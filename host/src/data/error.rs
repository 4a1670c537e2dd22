//! Errors of the data pipeline: each names the dataset, the file, the line or row, and the
//! field at fault, as far as they are known.

use std::fmt;
use std::path::PathBuf;

/// Where in a file a row came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Location {
    /// A 1-based line of a text file (JSON lines, CSV, plain text).
    Line(usize),
    /// A 0-based row of a file without lines (JSON array, parquet).
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(n) => write!(f, "line {n}"),
            Self::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// A problem with a dataset.
#[derive(Clone, Debug, Default, PartialEq, thiserror::Error)]
pub struct DataError {
    /// The dataset, as `datasets[i] (path)`.
    pub dataset: Option<String>,
    /// The file.
    pub file: Option<PathBuf>,
    /// The line or row in the file.
    pub location: Option<Location>,
    /// The field of the row.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(d) = &self.dataset {
            parts.push(d.clone());
        }
        match (&self.file, &self.location) {
            (Some(file), Some(loc)) => parts.push(format!("{} {loc}", file.display())),
            (Some(file), None) => parts.push(file.display().to_string()),
            (None, Some(loc)) => parts.push(loc.to_string()),
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            parts.push(format!("field `{field}`"));
        }
        parts.push(self.message.clone());
        write!(f, "{}", parts.join(": "))
    }
}

impl DataError {
    /// An error with only a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }

    /// Names the dataset.
    pub fn in_dataset(mut self, dataset: impl Into<String>) -> Self {
        self.dataset.get_or_insert_with(|| dataset.into());
        self
    }

    /// Names the file and location.
    pub fn at(mut self, file: impl Into<PathBuf>, location: Option<Location>) -> Self {
        self.file.get_or_insert_with(|| file.into());
        if self.location.is_none() {
            self.location = location;
        }
        self
    }

    /// Names the field.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field.get_or_insert_with(|| field.into());
        self
    }
}

/// Results of the data pipeline.
pub type Result<T> = std::result::Result<T, DataError>;
