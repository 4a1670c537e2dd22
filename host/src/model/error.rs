//! Errors of the model runtime: each names the file and the key or tensor at fault.

use std::path::PathBuf;

/// An error while resolving, loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read, parsed or written.
    #[error("{path}: {message}")]
    File {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A key of a JSON configuration file is missing or has the wrong type or value.
    #[error("{path}: key `{key}`: {message}")]
    Key {
        /// The file holding the key.
        path: PathBuf,
        /// The key, as a dotted path.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// A tensor of a weights file is missing, has the wrong shape or cannot be decoded.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        /// The weights file (or directory, when the tensor is missing from all of them).
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What went wrong.
        message: String,
    },
    /// `model_type` names an architecture axl does not implement.
    #[error("{path}: model_type `{found}` is not supported; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// The config.json at fault.
        path: PathBuf,
        /// The model_type found.
        found: String,
        /// The model types axl supports.
        supported: Vec<&'static str>,
    },
    /// `base_model` (or another model reference) could not be found anywhere.
    #[error("model `{reference}` not found; looked in:\n{}", looked_in.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n"))]
    NotFound {
        /// What the user asked for.
        reference: String,
        /// Every place searched, in order.
        looked_in: Vec<String>,
    },
    /// A request that is not valid for this model (wrong input shape, bad option).
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// An error about a file.
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// An error about a key of a configuration file.
    pub fn key(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Self::Key {
            path: path.into(),
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// An error about a tensor of a weights file.
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Self::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.to_string(),
        }
    }
}

/// Results of the model runtime.
pub type Result<T> = std::result::Result<T, ModelError>;
