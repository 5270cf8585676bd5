//! `afm-vl describe IMAGE...`: describe images with a vision-language checkpoint.
//!
//! Arguments may be files, directories (their images) or glob patterns (quoted, so the shell
//! leaves them alone). Images are decoded and tiled in parallel, then described one by one.
//! A file that cannot be read or decoded gets an `error:` line on stderr and the others are still
//! described; the exit code is then 1.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use afm_fusion::VisionLanguageModel;
use afm_text::DType;
use afm_vision::{TileMode, TiledImage};
use anyhow::Context as _;
use rayon::prelude::*;

use super::generate::SamplingArgs;
use super::Context;

/// Where set-up puts the demo checkpoint, relative to the repository root.
pub const DEFAULT_VLM_REL: &str = "assets/models/afm-vl-demo";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image files, directories or quoted glob patterns ("photos/*.jpg").
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
    /// rapid (224-class thumbnail), balanced (one tile), high-res (4 crops + thumbnail) or auto.
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// The instruction (default: the checkpoint's, "Describe the image.").
    #[arg(long)]
    pub prompt: Option<String>,
    /// Vision-language checkpoint directory (default: the demo checkpoint in assets/models/, or
    /// $AFM_VL_VLM).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Text-model dtype: auto, fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A LoRA adapter of the text model (PEFT layout: adapter_config.json +
    /// adapter_model.safetensors), stacked with the checkpoint's image LoRA.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// One JSON object per image on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The default checkpoint: `$AFM_VL_VLM`, else `assets/models/afm-vl-demo` next to the repository
/// this binary was built in, else relative to the working directory.
pub fn default_vlm_dir() -> PathBuf {
    super::find_default_dir("AFM_VL_VLM", DEFAULT_VLM_REL)
}

/// Files named by the arguments, in order; an argument that names nothing is an error entry.
pub fn expand_inputs(args: &[String]) -> Vec<Result<PathBuf, String>> {
    let mut out = Vec::new();
    for a in args {
        let p = Path::new(a);
        if p.is_dir() {
            match afm_vision::tiler::list_images(p) {
                Ok(v) if v.is_empty() => out.push(Err(format!("{a}: no images in this folder"))),
                Ok(v) => out.extend(v.into_iter().map(Ok)),
                Err(e) => out.push(Err(e.to_string())),
            }
        } else if !p.exists() && a.contains(['*', '?', '[']) {
            match glob::glob(a) {
                Ok(paths) => {
                    let mut found: Vec<PathBuf> = paths.filter_map(|r| r.ok()).collect();
                    found.sort();
                    if found.is_empty() {
                        out.push(Err(format!("{a}: no file matches this pattern")));
                    }
                    out.extend(found.into_iter().map(Ok));
                }
                Err(e) => out.push(Err(format!("{a}: bad pattern: {e}"))),
            }
        } else {
            out.push(Ok(p.to_path_buf()));
        }
    }
    out
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    let mode: TileMode = a.mode.parse()?;
    let opts = a.sampling.options()?;
    let device = ctx.device()?;
    let dtype = DType::parse(&a.dtype, device)?;
    let dir = a.model.clone().unwrap_or_else(default_vlm_dir);
    let t0 = Instant::now();
    let mut model = VisionLanguageModel::load(&dir, device, dtype).with_context(|| {
        if a.model.is_none() && !dir.exists() {
            format!(
                "loading the demo checkpoint (run `make setup` to put it in {})",
                dir.display()
            )
        } else {
            format!("loading {}", dir.display())
        }
    })?;
    if let Some(path) = &a.adapter {
        let adapter = afm_text::lora::LoraAdapter::load(path, device, model.text.dtype.kind())
            .with_context(|| format!("loading the adapter {}", path.display()))?;
        model
            .set_text_adapter(Some(adapter))
            .with_context(|| format!("putting the adapter {} on the model", path.display()))?;
    }
    tracing::info!(
        "loaded {} in {:.2}s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    let tiler = model.tiler(mode)?;

    let inputs = expand_inputs(&a.images);
    // Decode and tile every image in parallel, timing each.
    let tiled: Vec<Result<(PathBuf, TiledImage, f64), String>> = inputs
        .into_par_iter()
        .map(|r| {
            let path = r?;
            let t = Instant::now();
            tiler
                .tile_path(&path)
                .map(|ti| (path, ti, t.elapsed().as_secs_f64()))
                .map_err(|e| e.to_string())
        })
        .collect();

    let mut failures = 0usize;
    let stdout = std::io::stdout();
    for item in tiled {
        let (path, ti, tile_s) = match item {
            Ok(x) => x,
            Err(msg) => {
                failures += 1;
                eprintln!("error: {msg}");
                if a.json {
                    println!("{}", serde_json::json!({ "error": msg }));
                }
                continue;
            }
        };
        let stream = !a.json && !ctx.quiet;
        if stream {
            print!("{}: ", path.display());
            let _ = stdout.lock().flush();
        }
        let result = model.describe_tiled(&ti, a.prompt.as_deref(), &opts, &mut |piece| {
            if stream {
                print!("{}", piece.replace('\n', " "));
                let _ = std::io::stdout().lock().flush();
            }
        });
        let mut d = match result {
            Ok(d) => d,
            Err(e) => {
                if stream {
                    println!();
                }
                failures += 1;
                eprintln!("error: {}: {e}", path.display());
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({ "image": path.display().to_string(), "error": e.to_string() })
                    );
                }
                continue;
            }
        };
        d.timings.tile_s = tile_s;
        if a.json {
            let mut obj = serde_json::json!({
                "image": path.display().to_string(),
                "description": d.text,
                "mode": d.mode.as_str(),
                "tiles": d.tiles,
                "visual_tokens": d.visual_tokens,
                "prompt_tokens": d.prompt_tokens,
                "generated_tokens": d.generation.tokens.len(),
            });
            if a.sampling.stats {
                obj["stats"] = serde_json::to_value(d.timings)?;
            }
            println!("{obj}");
        } else {
            if stream {
                println!();
            } else {
                println!("{}: {}", path.display(), d.text);
            }
            if a.sampling.stats {
                eprintln!(
                    "  [{} mode, {} tiles, {} visual tokens] tile {:.1} ms, encode {:.1} ms, prefill {:.1} ms ({} tokens), decode {:.1} ms ({} tokens, {:.1} tok/s)",
                    d.mode,
                    d.tiles,
                    d.visual_tokens,
                    d.timings.tile_s * 1e3,
                    d.timings.encode_s * 1e3,
                    d.timings.prefill_s * 1e3,
                    d.prompt_tokens,
                    d.timings.decode_s * 1e3,
                    d.generation.tokens.len(),
                    d.generation.stats.decode_tok_s()
                );
            }
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "{failures} of the images could not be described (see the error lines above)"
        );
    }
    Ok(())
}
