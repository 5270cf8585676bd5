//! `--shard K/N`: split the work deterministically across machines (Slurm array task K of N,
//! Ray task K…). Items are taken in canonical order (task, subset, index) after filtering and
//! cut into N contiguous, near-equal ranges; shard K (0-based) takes range K. Contiguity keeps
//! most subjects on one shard, so their few-shot prefix is computed once.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || EvalError::Config(format!("--shard {s:?}: expected K/N with 0 <= K < N"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The positions (in canonical order) of this shard's items among `total`.
    pub fn range(&self, total: usize) -> Range<usize> {
        let (k, n) = (self.index, self.count);
        (total * k / n)..(total * (k + 1) / n)
    }
}
