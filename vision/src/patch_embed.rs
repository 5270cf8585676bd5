//! Patch embedding: a `patch × patch` convolution with stride `patch`
//! (HF `embeddings.projection`), optionally after a convolutional stem
//! ([`VitConfig::conv_stem`]: 3×3 stride-2 convolutions + GELU, names `stem.{i}`), in which case
//! the projection's kernel and stride shrink by 2 per stem layer.

use tch::{nn, Tensor};

use crate::error::Result;
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct PatchEmbed {
    stem: Vec<nn::Conv2D>,
    proj: nn::Conv2D,
    /// Kernel and stride of the projection.
    step: i64,
}

impl PatchEmbed {
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let mut stem = Vec::with_capacity(cfg.conv_stem.len());
        let mut channels = cfg.num_channels;
        for (i, &c) in cfg.conv_stem.iter().enumerate() {
            let conv = nn::ConvConfig {
                stride: 2,
                padding: 1,
                ..Default::default()
            };
            stem.push(nn::conv2d(p / "stem" / i, channels, c, 3, conv));
            channels = c;
        }
        let step = (cfg.patch_size >> cfg.conv_stem.len()).max(1);
        let conv = nn::ConvConfig {
            stride: step,
            ..Default::default()
        };
        Self {
            proj: nn::conv2d(p / "projection", channels, cfg.hidden_size, step, conv),
            stem,
            step,
        }
    }

    /// `[B, 3, H, W]` → `[B, H / patch, W / patch, C]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = pixels.shallow_clone();
        for conv in &self.stem {
            // [B, c, H / 2^i, W / 2^i]
            x = x
                .f_conv2d(&conv.ws, conv.bs.as_ref(), [2, 2], [1, 1], [1, 1], 1)?
                .f_gelu("none")?;
        }
        let x = x.f_conv2d(
            &self.proj.ws,
            self.proj.bs.as_ref(),
            [self.step, self.step],
            0,
            1,
            1,
        )?; // [B, C, gh, gw]
        Ok(x.f_permute([0, 2, 3, 1])?) // [B, gh, gw, C]
    }
}
