//! The error type of the vision crate. Every message names the file (when there is one) and the
//! problem, so a one-line CLI error is enough to act on.

use std::path::PathBuf;

/// Everything that can go wrong in image loading, tiling and the vision encoders.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: is a directory, not an image file")]
    IsDirectory { path: PathBuf },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: empty file (0 bytes)")]
    EmptyFile { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a recognised image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: image is {width}×{height} px; the limit is {max_side} px a side")]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_side: u32,
    },
    #[error("{path}: decoding needs {bytes} bytes; the limit is {max_bytes} bytes")]
    TooManyBytes {
        path: PathBuf,
        bytes: u64,
        max_bytes: u64,
    },
    #[error("{path}: image has zero width or height ({width}×{height})")]
    ZeroSized {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path}: cannot decode {format}: {message}")]
    Decode {
        path: PathBuf,
        format: String,
        message: String,
    },
    #[error("resize failed: {0}")]
    Resize(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, VisionError>;
