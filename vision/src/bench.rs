//! Throughput measurement of the tiler (used by `afm-vl bench tiler`).

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Result, VisionError};
use crate::tiler::Tiler;

/// One timed pass.
#[derive(Debug, Clone, Copy)]
pub struct TilerTiming {
    pub images: usize,
    pub tiles: usize,
    pub seconds: f64,
}

impl TilerTiming {
    pub fn images_per_s(&self) -> f64 {
        self.images as f64 / self.seconds
    }
}

/// Decodes and tiles every path on a fresh pool of `threads` threads, dropping the outputs as
/// they are made (bounded memory); the first error is returned.
pub fn time_tiler(tiler: &Tiler, paths: &[PathBuf], threads: usize) -> Result<TilerTiming> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| VisionError::Config(format!("cannot start {threads} threads: {e}")))?;
    let t0 = Instant::now();
    let results: Vec<Result<usize>> = pool.install(|| {
        paths
            .par_iter()
            .map(|p| tiler.tile_path(p).map(|t| t.num_tiles()))
            .collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let mut tiles = 0;
    for r in results {
        tiles += r?;
    }
    Ok(TilerTiming {
        images: paths.len(),
        tiles,
        seconds,
    })
}
