//! `afm-vl describe IMAGE...`: describe images with a vision-language checkpoint.
//!
//! Arguments may be files, directories (their images) or glob patterns (quoted, so the shell
//! leaves them alone). Images are decoded and tiled in parallel, then described one by one.
//! A file that cannot be read or decoded gets an `error:` line on stderr and the others are still
//! described; the exit code is then 1.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use afm_fusion::VisionLanguageModel;
use afm_text::generation::CausalLm as _;
use afm_text::{DType, LanguageModel};
use afm_vision::TileMode;
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
    pub images: Vec<std::ffi::OsString>,
    /// rapid (224-class thumbnail), balanced (one tile), high-res (4 crops + thumbnail) or auto.
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// The instruction (default: the checkpoint's, "Describe the image.").
    #[arg(long)]
    pub prompt: Option<String>,
    /// Vision-language checkpoint directory: an afm-vl checkpoint or a SmolVLM / Idefics3
    /// directory in HF layout (default: the demo checkpoint in assets/models/, or $AFM_VL_VLM).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Dtype: auto, fp32, bf16, fp16. auto: the text model in fp32 on a CPU (the fused decode
    /// step) and bf16 on a GPU; a SmolVLM encoder in bf16 on a GPU and where the CPU's bf16
    /// matrix products measure faster than fp32 ones, else fp32. An explicit dtype applies to
    /// both (a SmolVLM encoder stays fp32 on a CPU without native bf16).
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

/// The default checkpoint: `$AFM_VL_VLM`, else `assets/models/afm-vl-demo` next to the
/// executable, else in the data directory (the rule of [`super::find_default_dir`]).
pub fn default_vlm_dir() -> anyhow::Result<PathBuf> {
    super::find_default_dir(
        "AFM_VL_VLM",
        DEFAULT_VLM_REL,
        "--model",
        "vision-language checkpoint",
    )
}

/// Files named by the arguments, in order; an argument that names nothing is an error entry.
/// Paths are taken as the OS gives them (they need not be UTF-8); only a glob pattern has to be
/// valid UTF-8.
pub fn expand_inputs(args: &[std::ffi::OsString]) -> Vec<Result<PathBuf, String>> {
    let mut out = Vec::new();
    for a in args {
        let p = Path::new(a);
        let shown = p.display();
        let pattern = a.to_str().filter(|s| s.contains(['*', '?', '[']));
        if p.is_dir() {
            match afm_vision::tiler::list_images(p) {
                Ok(v) if v.is_empty() => {
                    out.push(Err(format!("{shown}: no images in this folder")))
                }
                Ok(v) => out.extend(v.into_iter().map(Ok)),
                Err(e) => out.push(Err(e.to_string())),
            }
        } else if let (false, Some(pat)) = (p.exists(), pattern) {
            match glob::glob(pat) {
                Ok(paths) => {
                    let mut found: Vec<PathBuf> = paths.filter_map(|r| r.ok()).collect();
                    found.sort();
                    if found.is_empty() {
                        out.push(Err(format!("{shown}: no file matches this pattern")));
                    }
                    out.extend(found.into_iter().map(Ok));
                }
                Err(e) => out.push(Err(format!("{shown}: bad pattern: {e}"))),
            }
        } else {
            out.push(Ok(p.to_path_buf()));
        }
    }
    out
}

/// The path as JSON fields: `image` (the path, lossy only when it is not UTF-8) and, then,
/// `image_b64` with the exact bytes of the path (base64), so no name is lost.
fn path_fields(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("image".into(), path.to_string_lossy().into_owned().into());
    if path.to_str().is_none() {
        m.insert(
            "image_b64".into(),
            base64(path.as_os_str().as_encoded_bytes()).into(),
        );
    }
    m
}

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Say once, on stderr, that a demo checkpoint cannot describe real photos.
pub fn notice_demo<L: LanguageModel>(model: &VisionLanguageModel<L>, dir: &Path, quiet: bool) {
    if !quiet && model.config.is_demo() {
        eprintln!(
            "note: {} is the demo checkpoint: it knows only generated scenes of coloured shapes \
             and describes real photos as such; to describe real photos pass --model with a SmolVLM \
             directory (HF layout, e.g. SmolVLM-256M-Instruct: config.json, model.safetensors, \
             tokenizer.json, preprocessor_config.json)",
            dir.display()
        );
    }
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => default_vlm_dir()?,
    };
    if afm_fusion::smolvlm::is_smolvlm_dir(&dir) {
        describe_smolvlm(ctx, &a, &dir)
    } else if afm_fusion::model::has_ptmoe_text(&dir) {
        // The server model (PT-MoE) behind the encoder, or the on-device decoder.
        describe_all::<afm_text::ptmoe_model::PtMoeModel>(ctx, &a, &dir)
    } else {
        describe_all::<afm_text::TextModel>(ctx, &a, &dir)
    }
}

fn describe_all<L: LanguageModel>(ctx: &Context, a: &Args, dir: &Path) -> anyhow::Result<()> {
    let mode: TileMode = a.mode.parse()?;
    let opts = a.sampling.options()?;
    let device = ctx.device()?;
    let dtype = DType::parse(&a.dtype, device)?;
    let t0 = Instant::now();
    let mut model = VisionLanguageModel::<L>::load_any(dir, device, dtype).with_context(|| {
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
        let adapter = model
            .text
            .load_adapter(path)
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
    notice_demo(&model, dir, ctx.quiet);
    let tiler = model.tiler(mode)?;
    let prompt = a.prompt.as_deref();
    describe_loop(
        ctx,
        a,
        &|path| tiler.tile_path(path).map_err(|e| e.to_string()),
        &mut |ti, on_text| model.describe_tiled(ti, prompt, &opts, on_text),
        model.text.net().context_len(),
    )
}

/// A SmolVLM checkpoint (HF layout): its own processor splits the images.
fn describe_smolvlm(ctx: &Context, a: &Args, dir: &Path) -> anyhow::Result<()> {
    if a.mode != "auto" {
        anyhow::bail!(
            "--mode {} applies to AFM checkpoints; {} is a SmolVLM checkpoint, whose \
             preprocessor_config.json decides how images are split",
            a.mode,
            dir.display()
        );
    }
    if a.adapter.is_some() {
        anyhow::bail!(
            "--adapter is not supported with SmolVLM checkpoints ({})",
            dir.display()
        );
    }
    let opts = a.sampling.options()?;
    let device = ctx.device()?;
    let (text, vision) = afm_fusion::smolvlm::parse_dtypes(&a.dtype, device)?;
    let t0 = Instant::now();
    let model = afm_fusion::SmolVlm::load_with(dir, device, text, vision)
        .with_context(|| format!("loading {}", dir.display()))?;
    tracing::info!(
        "loaded {} in {:.2}s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    let prompt = a.prompt.as_deref();
    // The processor alone crosses threads (tensors are not `Sync`); the crop grid is checked
    // against the tokenizer when the image is described.
    let processor = model.processor.clone();
    describe_loop(
        ctx,
        a,
        &|path| processor.process_path(path).map_err(|e| e.to_string()),
        &mut |img, on_text| model.describe_processed(img, prompt, &opts, on_text),
        model.text.decoder.context_len(),
    )
}

/// Describe one prepared image, streaming text pieces to the callback.
type DescribeFn<'a, I> =
    dyn FnMut(&I, &mut dyn FnMut(&str)) -> afm_fusion::Result<afm_fusion::Description> + 'a;

/// Prepare every image in parallel (decode + tile or process, timed), then describe them one
/// by one, streaming or as JSON lines; a failed image is an `error:` line and exit 1 at the end.
fn describe_loop<I: Send>(
    ctx: &Context,
    a: &Args,
    prepare: &(dyn Fn(&Path) -> Result<I, String> + Sync),
    describe: &mut DescribeFn<'_, I>,
    context_len: usize,
) -> anyhow::Result<()> {
    let inputs = expand_inputs(&a.images);
    // Decode and tile every image in parallel, timing each.
    let tiled: Vec<Result<(PathBuf, I, f64), String>> = inputs
        .into_par_iter()
        .map(|r| {
            let path = r?;
            let t = Instant::now();
            prepare(&path).map(|ti| (path, ti, t.elapsed().as_secs_f64()))
        })
        .collect();

    let mut failures = 0usize;
    // Streamed text on a terminal shows progress itself; otherwise (--json, a pipe) a bar does.
    let stream = !a.json && !ctx.quiet;
    let bar_len = if stream && std::io::stdout().is_terminal() {
        0
    } else {
        tiled.len()
    };
    let bar = super::progress::bar(bar_len as u64, "images", ctx.quiet || bar_len < 2);
    for item in tiled {
        bar.inc(1);
        let (path, ti, tile_s) = match item {
            Ok(x) => x,
            Err(msg) => {
                failures += 1;
                bar.suspend(|| eprintln!("error: {msg}"));
                if a.json {
                    outln!("{}", serde_json::json!({ "error": msg }))?;
                }
                continue;
            }
        };
        // The `PATH: ` prefix goes out with the first piece of text, so an image that fails
        // before any text leaves no dangling prefix on stdout.
        let mut sink = super::output::StreamSink::default();
        let mut started = false;
        let result = describe(&ti, &mut |piece| {
            if stream {
                if !started {
                    started = true;
                    sink.write(&format!("{}: ", path.display()));
                }
                sink.write(&piece.replace('\n', " "));
            }
        });
        sink.finish()?;
        let mut d = match result {
            Ok(d) => d,
            Err(e) => {
                if started {
                    outln!()?;
                }
                failures += 1;
                bar.suspend(|| eprintln!("error: {}: {e}", path.display()));
                if a.json {
                    let mut obj = path_fields(&path);
                    obj.insert("error".into(), e.to_string().into());
                    outln!("{}", serde_json::Value::Object(obj))?;
                }
                continue;
            }
        };
        d.timings.tile_s = tile_s;
        if a.json {
            let mut obj = path_fields(&path);
            obj.extend(
                serde_json::json!({
                    "description": d.text,
                    "mode": d.mode,
                    "tiles": d.tiles,
                    "visual_tokens": d.visual_tokens,
                    "prompt_tokens": d.prompt_tokens,
                    "generated_tokens": d.generation.tokens.len(),
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            );
            if a.sampling.stats {
                obj.insert("stats".into(), serde_json::to_value(d.timings)?);
            }
            outln!("{}", serde_json::Value::Object(obj))?;
        } else {
            if stream && started {
                outln!()?;
            } else {
                outln!("{}: {}", path.display(), d.text)?;
            }
            super::generate::notice_stop(ctx.quiet, d.generation.stop_reason, context_len);
            if a.sampling.stats {
                bar.suspend(|| eprintln!(
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
                ));
            }
        }
    }
    bar.finish_and_clear();
    if failures > 0 {
        anyhow::bail!(
            "{failures} of the images could not be described (see the error lines above)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(raw.as_bytes()), enc);
        }
    }
}
