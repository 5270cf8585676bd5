//! An exclusive lock on an output folder, held for a whole run.
//!
//! Two runs writing one `--out` would mix their manifests, journals and reports (and two
//! resumes would score the same items twice). [`OutLock::acquire`] takes an OS file lock on
//! `DIR/.lock` (released by the OS when the process ends, however it ends) and writes the
//! holder's pid into it, so a refused second run can say who holds the folder.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};

pub const LOCK_FILE: &str = ".lock";

/// The held lock; dropping it releases the folder.
#[derive(Debug)]
pub struct OutLock {
    _file: File,
    pub path: PathBuf,
}

impl OutLock {
    /// Lock `dir` (which must exist) or fail with a message naming it and the holder's pid.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| EvalError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "another process".into(),
                };
                return Err(EvalError::journal(
                    dir,
                    format!(
                        "the folder is in use by another afm-vl run ({holder}); wait for it to finish or use another --out"
                    ),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(EvalError::io(&path, e)),
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|_| file.flush())
            .map_err(|e| EvalError::io(&path, e))?;
        Ok(OutLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_a_folder_is_refused_with_the_pid_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutLock::acquire(dir.path()).unwrap();
        let err = OutLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(first);
        OutLock::acquire(dir.path()).unwrap();
    }
}
