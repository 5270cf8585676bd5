//! `afm-vl eval merge DIR...`: combine the output folders of `--shard K/N` runs into one
//! report. The shards must share the run fingerprint, be distinct, cover 0..N and be complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::journal::{read_records, ItemResult, Manifest, JOURNAL, MANIFEST};
use crate::report::{Results, Timings};

/// Merge shard folders; writes `results.json` / `results.md` into `out` and returns them.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Results> {
    if dirs.is_empty() {
        return Err(EvalError::Config(
            "eval merge: give the output folders of the shards".into(),
        ));
    }
    let mut first: Option<Manifest> = None;
    let mut shards = Vec::new();
    let mut items: BTreeMap<String, ItemResult> = BTreeMap::new();
    let mut timings = Timings::default();
    for dir in dirs {
        let m = Manifest::read(dir)?;
        let mpath = dir.join(MANIFEST);
        if let Some(f) = &first {
            if f.fingerprint != m.fingerprint {
                return Err(EvalError::journal(
                    &mpath,
                    "a different run (model, options or data differ from the first shard)",
                ));
            }
            if f.shard.count != m.shard.count {
                return Err(EvalError::journal(
                    &mpath,
                    format!("shard {} does not split like {}", m.shard, f.shard),
                ));
            }
        }
        if shards.contains(&m.shard) {
            return Err(EvalError::journal(
                &mpath,
                format!("shard {} given twice", m.shard),
            ));
        }
        let (records, _) = read_records(&dir.join(JOURNAL))?;
        if records.len() != m.items_shard {
            return Err(EvalError::journal(
                &dir.join(JOURNAL),
                format!(
                    "shard {} is incomplete: {} of {} items (finish it with --resume)",
                    m.shard,
                    records.len(),
                    m.items_shard
                ),
            ));
        }
        for (k, r) in records {
            if items.insert(k.clone(), r).is_some() {
                return Err(EvalError::journal(
                    &dir.join(JOURNAL),
                    format!("item {k} is in two shards"),
                ));
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("results.json")) {
            if let Ok(r) = serde_json::from_str::<Results>(&text) {
                timings.wall_s = timings.wall_s.max(r.timings.wall_s);
                timings.scored += r.timings.scored;
            }
        }
        shards.push(m.shard);
        first.get_or_insert(m);
    }
    let Some(manifest) = first else {
        return Err(EvalError::Config("eval merge: no shards".into()));
    };
    shards.sort();
    if shards.len() != manifest.shard.count {
        let have: Vec<String> = shards.iter().map(|s| s.to_string()).collect();
        return Err(EvalError::Config(format!(
            "eval merge: {} shards given ({}), the run was split into {}",
            shards.len(),
            have.join(", "),
            manifest.shard.count
        )));
    }
    if items.len() != manifest.items_all {
        return Err(EvalError::Config(format!(
            "eval merge: {} items merged, the run has {}",
            items.len(),
            manifest.items_all
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    let _lock = crate::lock::OutLock::acquire(out)?;
    let results = Results::build(&manifest, shards, items.into_values().collect(), timings);
    results.write(out)?;
    Ok(results)
}
