//! Errors of the evaluation runner. Every data error names the file and the line
//! (`path:line: problem`), so a bad row can be found and fixed.

use std::path::{Path, PathBuf};

/// An error of `afm-vl eval`.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A malformed row or field in a benchmark file.
    #[error("{}:{line}: {problem}", path.display())]
    Data {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    /// A problem with a whole file or folder (no line to point at).
    #[error("{}: {problem}", path.display())]
    Source { path: PathBuf, problem: String },
    /// An I/O error on a path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad command-line option or run configuration.
    #[error("{0}")]
    Config(String),
    /// The journal of an interrupted run does not match this run.
    #[error("{}: {problem}", path.display())]
    Journal { path: PathBuf, problem: String },
    /// The model backend failed.
    #[error("backend: {0}")]
    Backend(String),
}

impl EvalError {
    pub fn data(path: &Path, line: usize, problem: impl Into<String>) -> Self {
        EvalError::Data {
            path: path.to_path_buf(),
            line,
            problem: problem.into(),
        }
    }

    pub fn source(path: &Path, problem: impl Into<String>) -> Self {
        EvalError::Source {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn journal(path: &Path, problem: impl Into<String>) -> Self {
        EvalError::Journal {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
