//! `afm-vl bench text --preset NAME` for a PT-MoE preset (or `--model DIR` for a PT-MoE
//! directory): prefill and decode tokens/s with the tracks of each block running concurrently
//! vs one after the other, same run, same weights.

use std::time::Instant;

use anyhow::Context as _;

use afm_text::generation::{generate_lm, ids_tensor};
use afm_text::ptmoe::parse_track_devices;
use afm_text::ptmoe_config::{is_ptmoe_preset, ptmoe_preset};
use afm_text::sampling::SamplingConfig;
use afm_text::{GenerateOptions, Logits, PtMoe, TrackExec};
use tch::Kind;

use super::Context;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// One greedy generation: (prefill tok/s, decode tok/s).
fn measure(m: &PtMoe, prompt: &[u32], tokens: usize) -> anyhow::Result<(f64, f64)> {
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        sampling: SamplingConfig::greedy(),
        stop_strings: Vec::new(),
        stop_on_eos: false,
    };
    let g = generate_lm(m, None, prompt, &opts, &mut |_| {})?;
    Ok((g.stats.prefill_tok_s(), g.stats.decode_tok_s()))
}

/// What the bench runs: a PT-MoE preset with random weights, or a PT-MoE model directory
/// (ours or a tamm folder).
pub enum Source<'a> {
    Preset(&'a str),
    Dir(&'a std::path::Path),
}

pub fn run(
    ctx: &Context,
    source: Source<'_>,
    track_devices: Option<&str>,
    prompt_len: usize,
    tokens: usize,
    repeats: usize,
) -> anyhow::Result<()> {
    let device = ctx.device()?;
    let devices = match track_devices {
        Some(s) => parse_track_devices(s)?,
        None => Vec::new(),
    };
    let t0 = Instant::now();
    let (mut m, name, weights) = match source {
        Source::Preset(name) => {
            if !is_ptmoe_preset(name) {
                anyhow::bail!(
                    "bench text --preset takes a PT-MoE preset (see inspect --list-presets), not '{name}'"
                );
            }
            let cfg = ptmoe_preset(name)?;
            let m = PtMoe::random(&cfg, 0, device, Kind::Float, &devices)?;
            (m, name.to_string(), "random weights")
        }
        Source::Dir(dir) => (
            PtMoe::load(dir, device, Kind::Float, &devices)
                .with_context(|| format!("loading {}", dir.display()))?,
            dir.display().to_string(),
            "loaded",
        ),
    };
    let cfg = m.cfg.clone();
    let build = t0.elapsed().as_secs_f64();
    let prompt: Vec<u32> = (0..prompt_len.max(1) as u32)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect();
    // Both modes give the same logits (checked here, not just in the tests).
    {
        let _g = tch::no_grad_guard();
        let x = ids_tensor(&prompt)?;
        let mut outs = Vec::new();
        for exec in [TrackExec::Concurrent, TrackExec::Sequential] {
            m.set_exec(exec);
            let mut c = m.new_cache(1);
            outs.push(m.forward(&x, None, &mut c, Logits::Last)?);
        }
        let diff = (&outs[0] - &outs[1]).abs().max().double_value(&[]);
        anyhow::ensure!(
            diff <= 1e-4,
            "concurrent and sequential tracks differ by {diff}"
        );
    }
    let dev_names: Vec<String> = m.blocks[0]
        .iter()
        .map(|t| format!("{:?}", t.device()))
        .collect();
    outln!(
        "\nPT-MoE {name} ({weights}, fp32, built in {build:.1}s): {} tracks × {} blocks × {} layers, width {}, {} experts top-{}, window {}",
        cfg.num_tracks,
        cfg.num_track_blocks,
        cfg.track_block_depth,
        cfg.hidden_size,
        cfg.num_local_experts,
        cfg.num_experts_per_tok,
        cfg.sliding_window
    )?;
    outln!(
        "track devices: {}; libtorch threads: {}; {}-token prompt, {} new tokens (greedy), median of {repeats}",
        dev_names.join(", "),
        tch::get_num_threads(),
        prompt.len(),
        tokens
    )?;
    // Alternate the modes so that drift in machine load hits them alike. The third mode
    // (sequential with one intra-op thread) separates the gain of running tracks side by side
    // from the cost of libtorch's own intra-op threading on small ops.
    let threads = tch::get_num_threads();
    let modes: [(&str, TrackExec, i32); 3] = [
        (
            "concurrent (one thread per track)",
            TrackExec::Concurrent,
            threads,
        ),
        ("sequential", TrackExec::Sequential, threads),
        ("sequential, 1 intra-op thread", TrackExec::Sequential, 1),
    ];
    let mut runs: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); modes.len()];
    for (_, exec, t) in &modes {
        tch::set_num_threads(*t);
        m.set_exec(*exec);
        let _ = measure(&m, &prompt, tokens.min(8))?; // warm-up
    }
    for _ in 0..repeats.max(1) {
        for ((_, exec, t), run) in modes.iter().zip(runs.iter_mut()) {
            tch::set_num_threads(*t);
            m.set_exec(*exec);
            let (p, d) = measure(&m, &prompt, tokens)?;
            run.0.push(p);
            run.1.push(d);
        }
    }
    tch::set_num_threads(threads);
    let rows: Vec<(&str, f64, f64)> = modes
        .iter()
        .zip(runs)
        .map(|((n, _, _), (p, d))| (*n, median(p), median(d)))
        .collect();
    outln!("\n| tracks | prefill tok/s | decode tok/s |")?;
    outln!("| --- | ---: | ---: |")?;
    for (n, p, d) in &rows {
        outln!("| {n} | {p:.1} | {d:.1} |")?;
    }
    outln!(
        "\nconcurrent / sequential: prefill {:.2}×, decode {:.2}×; concurrent / sequential with 1 intra-op thread: prefill {:.2}×, decode {:.2}×",
        rows[0].1 / rows[1].1,
        rows[0].2 / rows[1].2,
        rows[0].1 / rows[2].1,
        rows[0].2 / rows[2].2
    )?;
    Ok(())
}
