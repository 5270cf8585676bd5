//! `afm-vl bench adapters`: LoRA swap latency between cached adapters and the memory an
//! unload returns, on the default model.

use std::time::Instant;

use afm_text::lora::{AdapterCache, LoraAdapter, DEFAULT_TARGETS};
use afm_text::DType;

use super::{Context, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// LoRA rank of the benchmark adapters.
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Swaps timed (the median is reported).
    #[arg(long, default_value_t = 50)]
    pub swaps: usize,
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let mut model = args.model.load(ctx)?;
    let dtype: DType = model.dtype;
    let rss_base = rss_bytes();
    let mut cache = AdapterCache::default();
    let mut names = Vec::new();
    for seed in 0..2 {
        let mut a = LoraAdapter::random(
            &mut model.decoder,
            args.rank,
            2.0 * args.rank as f64,
            DEFAULT_TARGETS,
            seed,
        )?;
        a.name = format!("adapter-{seed}");
        names.push(cache.insert(a));
    }
    let rss_loaded = rss_bytes();
    let mut times = Vec::with_capacity(args.swaps);
    for i in 0..args.swaps.max(1) {
        let t0 = Instant::now();
        cache.activate(&mut model.decoder, Some(&names[i % 2]))?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let adapter_bytes = cache.bytes() as u64 / 2;
    for n in &names {
        cache.unload(&mut model.decoder, n)?;
    }
    let rss_unloaded = rss_bytes();
    outln!(
        "model: {} ({}), adapters: rank {}, every attention and FFN linear",
        model.source.display(),
        dtype.name(),
        args.rank
    )?;
    outln!("\n| measure | value |")?;
    outln!("| --- | ---: |")?;
    outln!("| adapter size | {:.1} MiB |", mib(adapter_bytes))?;
    outln!(
        "| swap (activate the other cached adapter), median of {} | {:.3} ms |",
        times.len(),
        times[times.len() / 2] * 1e3
    )?;
    outln!("| swap, worst | {:.3} ms |", times[times.len() - 1] * 1e3)?;
    outln!("| RSS with the model | {:.1} MiB |", mib(rss_base))?;
    outln!(
        "| RSS with 2 adapters cached | {:.1} MiB (+{:.1}) |",
        mib(rss_loaded),
        mib(rss_loaded.saturating_sub(rss_base))
    )?;
    outln!(
        "| RSS after unloading both | {:.1} MiB ({:.1} MiB returned) |",
        mib(rss_unloaded),
        mib(rss_loaded.saturating_sub(rss_unloaded))
    )?;
    Ok(())
}
