//! Patch embedding: a `patch × patch` convolution with stride `patch`
//! (HF `embeddings.projection`).

use tch::{nn, Tensor};

use crate::error::Result;
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct PatchEmbed {
    proj: nn::Conv2D,
    patch: i64,
}

impl PatchEmbed {
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Self {
            proj: nn::conv2d(
                p / "projection",
                cfg.num_channels,
                cfg.hidden_size,
                cfg.patch_size,
                conv,
            ),
            patch: cfg.patch_size,
        }
    }

    /// `[B, 3, H, W]` → `[B, H / patch, W / patch, C]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.f_conv2d(
            &self.proj.ws,
            self.proj.bs.as_ref(),
            [self.patch, self.patch],
            0,
            1,
            1,
        )?; // [B, C, gh, gw]
        Ok(x.f_permute([0, 2, 3, 1])?) // [B, gh, gw, C]
    }
}
