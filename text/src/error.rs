//! Errors of the text crate. Every variant that concerns a file names it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: GGUF: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("{path}: bad config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt of {tokens} tokens plus {requested} new tokens exceeds the context of {context} tokens")]
    ContextOverflow {
        tokens: usize,
        requested: usize,
        context: usize,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("unknown preset '{name}' (known: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("CUDA stream: {0}")]
    CudaStream(String),
}

impl TextError {
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
    pub fn gguf(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Gguf {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = TextError> = std::result::Result<T, E>;
