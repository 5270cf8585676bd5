//! Errors of the fusion crate. Every variant that concerns a file names it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FusionError {
    #[error(transparent)]
    Vision(#[from] afm_vision::VisionError),
    #[error(transparent)]
    Text(#[from] afm_text::TextError),
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: bad config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl FusionError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FusionError>;
