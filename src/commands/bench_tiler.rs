//! `afm-vl bench tiler`: images/s of the tiler per mode, one thread and all threads, decode
//! included, next to HF transformers' LLaVA-NeXT image processor doing the equivalent of our
//! high-res split (`vision/bench/hf_tiler.py`, run with the project's `.venv` when present).

use std::path::{Path, PathBuf};
use std::process::Command;

use afm_vision::tiler::list_images;
use afm_vision::{TileMode, Tiler, TilerConfig};
use anyhow::Context as _;

use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder of images (JPEG, PNG, WebP, GIF, BMP, TIFF).
    pub folder: PathBuf,
    /// First write N content-rich JPEGs into FOLDER (alternately 4032×3024 and 1920×1080;
    /// existing files are kept).
    #[arg(long, value_name = "N")]
    pub make_images: Option<usize>,
    /// Modes to measure, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rapid,balanced,high-res,auto"
    )]
    pub modes: Vec<String>,
    /// Threads for the "all threads" runs (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed passes per measurement; the fastest is reported (for both ours and HF's).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Skip the HF transformers reference.
    #[arg(long)]
    pub no_hf: bool,
    /// Python interpreter for the HF reference (default: <repo>/.venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug)]
struct Row {
    name: String,
    threads: usize,
    images: usize,
    seconds: f64,
    images_per_s: f64,
}

fn repo_python() -> PathBuf {
    let here = std::env::current_exe().ok();
    // target/<profile>/afm-vl → repo root, else the current directory.
    let root = here
        .as_deref()
        .and_then(|p| p.ancestors().nth(3))
        .filter(|r| r.join("vision/bench/hf_tiler.py").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    root.join(".venv/bin/python")
}

fn hf_script(python: &Path) -> PathBuf {
    // The script sits at <repo>/vision/bench; the venv at <repo>/.venv/bin/python.
    python
        .ancestors()
        .nth(3)
        .map(|r| r.join("vision/bench/hf_tiler.py"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vision/bench/hf_tiler.py"))
}

fn run_hf(python: &Path, folder: &Path, repeat: usize) -> anyhow::Result<(String, Row)> {
    let script = hf_script(python);
    let out = Command::new(python)
        .arg(&script)
        .arg(folder)
        .arg("--repeat")
        .arg(repeat.max(1).to_string())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!(
            "{} failed: {}",
            script.display(),
            err.lines().last().unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("unexpected output from {}: {line}", script.display()))?;
    let name = v["processor"].as_str().unwrap_or("HF").to_string();
    Ok((
        format!("{name}, pixel_values {}", v["pixel_values_shape"]),
        Row {
            name: format!("HF {name} (1344 grid → 4×672 + 672)"),
            threads: 1,
            images: v["images"].as_u64().unwrap_or(0) as usize,
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
            images_per_s: v["images_per_s"].as_f64().unwrap_or(f64::NAN),
        },
    ))
}

pub fn run(_ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.make_images {
        eprintln!(
            "writing {n} benchmark JPEGs into {} ...",
            args.folder.display()
        );
        afm_vision::synth::write_bench_images(&args.folder, n)?;
    }
    let paths = list_images(&args.folder)?;
    anyhow::ensure!(
        !paths.is_empty(),
        "{}: no images (use --make-images N to create some)",
        args.folder.display()
    );
    let all = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // Warm the page cache so the first mode does not pay for disk reads.
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::read(p).map(|b| b.len() as u64).unwrap_or(0))
        .sum();
    outln!(
        "tiler benchmark: {} images ({:.1} MB) in {}, decode + resize + normalise, {all} threads max",
        paths.len(),
        bytes as f64 / 1e6,
        args.folder.display()
    )?;
    let mut rows = Vec::new();
    for m in &args.modes {
        let mode: TileMode = m.parse()?;
        let tiler = Tiler::new(TilerConfig {
            mode,
            ..TilerConfig::default()
        })?;
        let mut thread_counts = vec![1];
        if all > 1 {
            thread_counts.push(all);
        }
        for threads in thread_counts {
            let mut t = afm_vision::bench::time_tiler(&tiler, &paths, threads)?;
            for _ in 1..args.repeat {
                let again = afm_vision::bench::time_tiler(&tiler, &paths, threads)?;
                if again.seconds < t.seconds {
                    t = again;
                }
            }
            tracing::info!("{mode}: {} tiles with {threads} thread(s)", t.tiles);
            rows.push(Row {
                name: format!("ours {mode}"),
                threads,
                images: t.images,
                seconds: t.seconds,
                images_per_s: t.images_per_s(),
            });
        }
    }
    let mut hf_note = None;
    if !args.no_hf {
        let python = args.python.clone().unwrap_or_else(repo_python);
        if python.exists() {
            eprintln!("running the HF reference ({}) ...", python.display());
            match run_hf(&python, &args.folder, args.repeat) {
                Ok((note, row)) => {
                    hf_note = Some(note);
                    rows.push(row);
                }
                Err(e) => eprintln!("HF reference skipped: {e:#}"),
            }
        } else {
            eprintln!(
                "HF reference skipped: {} not found (make venv)",
                python.display()
            );
        }
    }
    outln!()?;
    let nw = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    outln!(
        "| {:<nw$} | {:>7} | {:>6} | {:>8} | {:>8} |",
        "tiler",
        "threads",
        "images",
        "seconds",
        "images/s"
    )?;
    outln!(
        "|{}|{:->9}|{:->8}|{:->10}|{:->10}|",
        "-".repeat(nw + 2),
        "",
        "",
        "",
        ""
    )?;
    for r in &rows {
        outln!(
            "| {:<nw$} | {:>7} | {:>6} | {:>8.2} | {:>8.2} |",
            r.name,
            r.threads,
            r.images,
            r.seconds,
            r.images_per_s
        )?;
    }
    let hf = rows.iter().find(|r| r.name.starts_with("HF "));
    if let Some(hf) = hf {
        outln!()?;
        if let Some(note) = &hf_note {
            outln!("HF output: {note}")?;
        }
        for r in rows.iter().filter(|r| r.name == "ours high-res") {
            outln!(
                "speed-up, ours high-res ({} thread(s)) vs HF: {:.1}×",
                r.threads,
                r.images_per_s / hf.images_per_s
            )?;
        }
    }
    if let Some(path) = &args.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "threads": r.threads, "images": r.images,
                    "seconds": r.seconds, "images_per_s": r.images_per_s,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
