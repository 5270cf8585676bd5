//! afm-vision: image loading, the three-mode tiler, and register-window ViT encoders.
//!
//! - [`image_io`]: decode JPEG/PNG/WebP/GIF/BMP/TIFF to RGB8 with limits and EXIF orientation.
//! - [`tiler`]: rapid / balanced / high-res / auto tiles as `[tiles, 3, S, S]` f32.
//! - [`idefics3`], [`siglip`]: SmolVLM's image processor (Pillow-exact resampling through
//!   [`pil_resample`]) and SigLIP encoder.
//! - [`vit`]: ViT encoders (ViTDet-style window attention, global blocks, register-window
//!   tokens), built from [`vit_config::VitConfig`] or a [`presets`] name, weights from
//!   safetensors through [`weights`].

pub mod attention;
pub mod bench;
pub mod block;
pub mod cpu_bf16;
pub mod error;
pub mod idefics3;
pub mod image_io;
pub mod jpeg_draft;
pub mod jpeg_scan;
pub mod mlp;
pub mod patch_embed;
pub mod pil_resample;
pub mod position;
pub mod presets;
pub mod register_window;
pub mod siglip;
pub mod synth;
pub mod tiler;
pub mod vit;
pub mod vit_config;
pub mod weights;
pub mod window;

pub use error::{Result, VisionError};
pub use image_io::{load_image, load_image_from_bytes, load_image_hinted, LoadLimits};
pub use jpeg_draft::SizeHint;
pub use tiler::{AspectMode, TileKind, TileMeta, TileMode, TiledImage, Tiler, TilerConfig};
pub use vit::{EncoderOutput, VisionEncoder, VisionModel};
pub use vit_config::VitConfig;
