//! Reading benchmark files: bytes with a checksum, UTF-8 checks with line numbers, and the
//! `--skip-bad` policy for malformed rows.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};
use crate::item::Skipped;

/// A data file that fed the run, with its SHA-256 (reported in `results.json`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DataFile {
    pub path: String,
    pub sha256: String,
}

/// The raw bytes of a file and its checksum.
pub struct RawFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl RawFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
        let sha256 = sha256_hex(&bytes);
        Ok(RawFile {
            path: path.to_path_buf(),
            bytes,
            sha256,
        })
    }

    pub fn data_file(&self) -> DataFile {
        DataFile {
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
        }
    }

    /// Lines (without `\n` / `\r\n`) with their 1-based numbers; a final empty line is dropped.
    /// Lines are bytes: call [`utf8_line`] on each so a bad line can be skipped alone.
    pub fn lines(&self) -> Vec<(usize, &[u8])> {
        let mut out: Vec<(usize, &[u8])> = self
            .bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
            .collect();
        if out.last().is_some_and(|(_, l)| l.is_empty()) {
            out.pop();
        }
        out
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decode one line or field as UTF-8, naming the file and line on failure.
pub fn utf8<'a>(path: &Path, line: usize, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        EvalError::data(
            path,
            line,
            format!("invalid UTF-8 (byte {} of the field)", e.valid_up_to() + 1),
        )
    })
}

/// What to do with a malformed row: fail (default) or record it and go on (`--skip-bad`).
#[derive(Debug, Default)]
pub struct BadRows {
    pub skip: bool,
    pub skipped: Vec<Skipped>,
}

impl BadRows {
    pub fn new(skip: bool) -> Self {
        BadRows {
            skip,
            skipped: Vec::new(),
        }
    }

    /// Either returns the error or records it as skipped.
    pub fn handle(&mut self, err: EvalError) -> Result<()> {
        if !self.skip {
            return Err(err);
        }
        tracing::warn!("skipped: {err}");
        let (path, line, problem) = match &err {
            EvalError::Data {
                path,
                line,
                problem,
            } => (path.display().to_string(), *line, problem.clone()),
            EvalError::Source { path, problem } => (path.display().to_string(), 0, problem.clone()),
            other => (String::new(), 0, other.to_string()),
        };
        self.skipped.push(Skipped {
            path,
            line,
            problem,
        });
        Ok(())
    }
}

/// One CSV record: its 1-based starting line and its fields (UTF-8 checked).
pub type CsvRow = (usize, Vec<String>);

/// Parse CSV bytes with a real CSV parser (quoted fields with commas and newlines, CRLF or
/// LF). Rows may have any number of fields; the caller checks the count. A row that is not
/// UTF-8 or that the parser rejects is an `Err` naming its line, so it can be skipped alone.
pub fn csv_rows(raw: &RawFile) -> Vec<Result<CsvRow>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(raw.bytes.as_slice());
    // The reader's own line numbers lag by one after a record terminator, so the line of a
    // record is computed from its byte offset: skip terminator bytes, count newlines before.
    let bytes = &raw.bytes;
    let mut counted = (0usize, 1usize); // (offset, line at offset)
    let mut line_at = |offset: u64| {
        let mut b = (offset as usize).min(bytes.len());
        while b < bytes.len() && (bytes[b] == b'\n' || bytes[b] == b'\r') {
            b += 1;
        }
        if b < counted.0 {
            counted = (0, 1);
        }
        counted.1 += bytes[counted.0..b].iter().filter(|&&c| c == b'\n').count();
        counted.0 = b;
        counted.1
    };
    let mut out = Vec::new();
    for rec in reader.byte_records() {
        match rec {
            Ok(rec) => {
                let line = rec.position().map_or(0, |p| line_at(p.byte()));
                let fields: Result<Vec<String>> = rec
                    .iter()
                    .map(|f| utf8(&raw.path, line, f).map(str::to_owned))
                    .collect();
                out.push(fields.map(|f| (line, f)));
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(p.byte()));
                out.push(Err(EvalError::data(&raw.path, line, format!("CSV: {e}"))));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<usize> {
        let raw = RawFile {
            path: PathBuf::from("t.csv"),
            bytes: text.as_bytes().to_vec(),
            sha256: String::new(),
        };
        csv_rows(&raw).into_iter().map(|r| r.unwrap().0).collect()
    }

    #[test]
    fn csv_lines_lf_and_crlf() {
        assert_eq!(rows("a,b\nc,d\n\"e\nf\",g\nh,i\n"), [1, 2, 3, 5]);
        assert_eq!(rows("a,b\r\nc,d\r\n\"e\nf\",g\r\nh,i\r\n"), [1, 2, 3, 5]);
        assert_eq!(rows("a,b\n\nc,d\n\n\ne"), [1, 3, 6]);
    }
}
