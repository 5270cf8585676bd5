//! `afm-vl tile`: tile one image as the vision encoder sees it and write the tensor.

use std::path::PathBuf;

use afm_vision::{AspectMode, LoadLimits, TileMode, Tiler, TilerConfig};
use anyhow::Context as _;

use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image (JPEG, PNG, WebP, GIF, BMP or TIFF).
    pub image: PathBuf,
    /// Tiling mode: rapid (224), balanced (672 thumbnail), high-res (4 crops + thumbnail), auto.
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// Output safetensors file: `pixel_values` [tiles, 3, S, S] f32 and `content_boxes`
    /// [tiles, 4] i64 (x0, y0, x1, y1 of the non-padding pixels in each tile).
    #[arg(long)]
    pub out: PathBuf,
    /// Stretch to a square instead of padding (aspect ratio not kept).
    #[arg(long)]
    pub stretch: bool,
    /// A JSON config with `image_mean` / `image_std` (e.g. an HF preprocessor_config.json);
    /// other tiler fields (`tile_size`, `rapid_size`, ...) are read too when present.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Normalisation mean, three values in [0, 1], comma- or space-separated (overrides --config).
    #[arg(long, value_delimiter = ',', num_args = 1..=3, allow_negative_numbers = true)]
    pub mean: Option<Vec<f32>>,
    /// Normalisation std, three values, comma- or space-separated (overrides --config).
    #[arg(long, value_delimiter = ',', num_args = 1..=3, allow_negative_numbers = true)]
    pub std: Option<Vec<f32>>,
    /// Largest accepted image side in pixels.
    #[arg(long, default_value_t = 16_384)]
    pub max_side: u32,
    /// Largest accepted decoded size in MiB.
    #[arg(long, default_value_t = 512)]
    pub max_mib: u64,
}

/// The tiler configuration from the shared tiling flags.
pub fn tiler_config(
    config: Option<&PathBuf>,
    mean: Option<&Vec<f32>>,
    std: Option<&Vec<f32>>,
) -> anyhow::Result<TilerConfig> {
    let mut cfg = match config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str::<TilerConfig>(&text)
                .with_context(|| format!("{}: not a valid tiler config", p.display()))?
        }
        None => TilerConfig::default(),
    };
    let three = |v: &Vec<f32>, what: &str| -> anyhow::Result<[f32; 3]> {
        <[f32; 3]>::try_from(v.as_slice())
            .map_err(|_| anyhow::anyhow!("--{what} needs three values, got {}", v.len()))
    };
    if let Some(m) = mean {
        cfg.image_mean = three(m, "mean")?;
    }
    if let Some(s) = std {
        cfg.image_std = three(s, "std")?;
    }
    Ok(cfg)
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let mut cfg = tiler_config(args.config.as_ref(), args.mean.as_ref(), args.std.as_ref())?;
    cfg.mode = args.mode.parse::<TileMode>()?;
    if args.stretch {
        cfg.aspect = AspectMode::Stretch;
    }
    cfg.limits = LoadLimits {
        max_side: args.max_side,
        max_decoded_bytes: args.max_mib.saturating_mul(1024 * 1024),
    };
    let tiler = Tiler::new(cfg)?;
    let tiled = tiler.tile_path(&args.image)?;
    let pixels = tiled.to_tensor()?;
    let boxes = tiled.content_boxes_tensor()?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Temporary file + rename: a failed write (full disk) keeps a previous --out intact.
    afm_text::checkpoint::write_safetensors(
        &args.out,
        &[
            ("pixel_values".into(), pixels.shallow_clone()),
            ("content_boxes".into(), boxes.shallow_clone()),
        ],
        None,
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    if !ctx.quiet {
        let (w, h) = tiled.source_size;
        outln!(
            "{}: {w}×{h} → {} mode, {} tile(s) of {s}×{s} → {} (pixel_values {:?})",
            args.image.display(),
            tiled.mode,
            tiled.num_tiles(),
            args.out.display(),
            pixels.size(),
            s = tiled.tile_size,
        )?;
    }
    Ok(())
}
