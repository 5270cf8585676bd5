//! Rust errors → Python exceptions, with the CLI's messages (`context: cause`).
//!
//! A missing file is `FileNotFoundError` (the message names the path), an image the decoders
//! reject or a bad argument is `ValueError`, anything else `RuntimeError`.

use afm_eval::EvalError;
use afm_fusion::FusionError;
use afm_text::TextError;
use afm_vision::VisionError;
use pyo3::exceptions::{
    PyFileNotFoundError, PyIsADirectoryError, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::PyErr;

fn join(context: Option<&str>, msg: String) -> String {
    match context {
        Some(c) => format!("{c}: {msg}"),
        None => msg,
    }
}

fn io_exc(kind: std::io::ErrorKind, msg: String) -> PyErr {
    match kind {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(msg),
        _ => PyOSError::new_err(msg),
    }
}

/// A text-crate error, prefixed with `context` as the CLI does.
pub fn text(e: TextError, context: Option<&str>) -> PyErr {
    let msg = join(context, e.to_string());
    match &e {
        TextError::Io { source, .. } => io_exc(source.kind(), msg),
        TextError::Checkpoint { path, .. } if !path.exists() => PyFileNotFoundError::new_err(msg),
        TextError::Checkpoint { .. }
        | TextError::Gguf { .. }
        | TextError::Config { .. }
        | TextError::ContextOverflow { .. }
        | TextError::InvalidArgument(_)
        | TextError::UnknownPreset { .. } => PyValueError::new_err(msg),
        TextError::Tokenizer(_) | TextError::Torch(_) | TextError::CudaStream(_) => {
            PyRuntimeError::new_err(msg)
        }
    }
}

/// A vision-crate error (its messages already name the file).
pub fn vision(e: VisionError) -> PyErr {
    vision_with(e, |m| m)
}

/// [`vision`] with the message rewritten by `f`.
pub fn vision_with(e: VisionError, f: impl FnOnce(String) -> String) -> PyErr {
    let msg = f(e.to_string());
    match &e {
        VisionError::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        VisionError::IsDirectory { .. } => PyIsADirectoryError::new_err(msg),
        VisionError::Io { source, .. } => io_exc(source.kind(), msg),
        VisionError::Resize(_) | VisionError::Torch(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// An eval-crate error, prefixed with `context`.
pub fn eval(e: EvalError, context: Option<&str>) -> PyErr {
    let msg = join(context, e.to_string());
    match &e {
        EvalError::Io { source, .. } => io_exc(source.kind(), msg),
        EvalError::Source { path, .. } if !path.exists() => PyFileNotFoundError::new_err(msg),
        EvalError::Backend(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// A fusion-crate error (loading a VLM, describe), prefixed with `context`.
pub fn fusion(e: FusionError, context: Option<&str>) -> PyErr {
    match e {
        FusionError::Text(t) => text(t, context),
        FusionError::Vision(v) => match context {
            Some(c) => vision_with(v, |m| format!("{c}: {m}")),
            None => vision(v),
        },
        e => {
            let msg = join(context, e.to_string());
            match &e {
                FusionError::Io { source, .. } => io_exc(source.kind(), msg),
                FusionError::Checkpoint { path, .. } if !path.exists() => {
                    PyFileNotFoundError::new_err(msg)
                }
                FusionError::Torch(_) => PyRuntimeError::new_err(msg),
                _ => PyValueError::new_err(msg),
            }
        }
    }
}
