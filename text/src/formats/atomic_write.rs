//! Output files that appear whole or not at all.
//!
//! Every command that writes a model, adapter, tensor file or report writes each file to a
//! temporary name in the destination's own directory, fsyncs it and renames it over the
//! destination. A failed or interrupted write (full disk, kill, bad input found half-way)
//! leaves any previous file intact and no partial file under the real name. Renaming also
//! keeps hard links safe: a destination hard-linked to a source gets a new inode, the source is
//! never written through.
//!
//! [`check_output_dir`] refuses an output directory that is the input directory (same path,
//! symlink, bind mount) or lies inside it, before anything is written.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, TextError};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary name beside `path`: `.NAME.PID.N.partial` in the same directory (so the
/// final rename stays on one file system).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.partial", std::process::id()))
}

/// Removes the temporary file unless the write was committed.
struct TempGuard {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Write `path` through `write`, which gets a temporary path beside it and must create that
/// file. On success the temporary file is fsynced and renamed over `path`; on failure it is
/// removed and `path` is left as it was.
pub fn write_atomic_with<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<TextError>,
{
    let tmp = temp_path(path);
    let mut guard = TempGuard {
        path: tmp.clone(),
        committed: false,
    };
    write(&tmp)?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| TextError::io(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TextError::io(path, e))?;
    guard.committed = true;
    sync_parent(path);
    Ok(())
}

/// Write `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| TextError::io(path, e))?;
        f.write_all(bytes).map_err(|e| TextError::io(path, e))?;
        f.flush().map_err(|e| TextError::io(path, e))
    })
}

/// Copy `src` to `dst` atomically. A `dst` that is a hard link (or symlink) of `src` is
/// replaced by the rename, so the source is never truncated.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    write_atomic_with(dst, |tmp| {
        std::fs::copy(src, tmp)
            .map(|_| ())
            .map_err(|e| TextError::io(src, e))
    })
}

/// Whether two paths name the same existing file (device and inode on Unix: symlinks and hard
/// links included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => same_inode(&ma, &mb),
        _ => false,
    }
}

#[cfg(unix)]
fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_inode(_a: &std::fs::Metadata, _b: &std::fs::Metadata) -> bool {
    false
}

/// `path` made absolute with symlinks resolved, also when its last components do not exist yet
/// (the nearest existing ancestor is canonicalised and the rest appended).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                if part == ".." {
                    out.pop();
                } else if part != "." {
                    out.push(part);
                }
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuse an output directory that is the input directory or lies inside it (compared after
/// resolving symlinks, and by inode for an existing output, so bind mounts and symlinked
/// folders count too). `what` names the command in the message.
pub fn check_output_dir(input: &Path, output: &Path, what: &str) -> Result<()> {
    let (rin, rout) = (resolve(input), resolve(output));
    if rin == rout || same_file(input, output) {
        return Err(TextError::InvalidArgument(format!(
            "{}: the output directory is the input directory; {what} would overwrite its source (choose another OUT)",
            output.display()
        )));
    }
    let inside = rout.starts_with(&rin)
        || rout
            .ancestors()
            .skip(1)
            .any(|a| a.exists() && same_file(a, input));
    if inside {
        return Err(TextError::InvalidArgument(format!(
            "{}: the output directory lies inside the input directory {}; {what} would write into its source (choose a directory outside it)",
            output.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Best effort: fsync the directory holding `path` so the rename itself is durable.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(f) = File::open(dir) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        write_atomic(&p, b"old").unwrap();
        let r: Result<()> = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(TextError::InvalidArgument("disk full".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("report.json")]);
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn copy_onto_a_hard_link_of_itself_keeps_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"source").unwrap();
        std::fs::hard_link(&a, &b).unwrap();
        // std::fs::copy(a, b) would truncate the shared inode to 0 bytes first.
        copy_atomic(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"source");
        assert_eq!(std::fs::read(&b).unwrap(), b"source");
        assert!(!same_file(&a, &b), "the rename replaced the link");
        // Writing the link's name replaces the link, never the source's bytes.
        write_atomic(&b, b"other").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"source");
    }

    #[test]
    fn output_dir_checks() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        let link = dir.path().join("link");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &link).unwrap();
        assert!(check_output_dir(&input, &input, "quantize").is_err());
        assert!(check_output_dir(&input, &input.join("."), "quantize").is_err());
        assert!(check_output_dir(&input, &input.join("sub/deeper"), "quantize").is_err());
        #[cfg(unix)]
        {
            assert!(check_output_dir(&input, &link, "quantize").is_err());
            assert!(check_output_dir(&input, &link.join("x"), "quantize").is_err());
        }
        assert!(check_output_dir(&input, &dir.path().join("out"), "quantize").is_ok());
        assert!(check_output_dir(&input, &dir.path().join("in2"), "quantize").is_ok());
        let e = check_output_dir(&input, &input, "quantize")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the input directory"), "{e}");
    }
}
