//! Learned absolute position embedding, bicubically interpolated (`align_corners = false`, as
//! HF `VitDetEmbeddings.get_absolute_positions`) when the token grid differs from the learnt one.

use tch::{nn, Tensor};

use crate::error::{Result, VisionError};
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct PositionEmbedding {
    /// `[1, (1 +) grid², C]` (HF `embeddings.position_embeddings`).
    pub table: Tensor,
    grid: i64,
    cls_slot: bool,
}

impl PositionEmbedding {
    pub fn new(p: &nn::Path, cfg: &VitConfig) -> Self {
        let grid = cfg.position_grid();
        let n = grid * grid + i64::from(cfg.position_cls_slot);
        let table = p.var(
            "position_embeddings",
            &[1, n, cfg.hidden_size],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        Self {
            table,
            grid,
            cls_slot: cfg.position_cls_slot,
        }
    }

    /// Positions for a `gh × gw` grid: `[1, gh, gw, C]`.
    pub fn forward(&self, gh: i64, gw: i64) -> Result<Tensor> {
        let t = if self.cls_slot {
            self.table.f_narrow(1, 1, self.grid * self.grid)?
        } else {
            self.table.shallow_clone()
        };
        let c = t.size().last().copied().unwrap_or(0);
        let t = t.f_reshape([1, self.grid, self.grid, c])?; // [1, g, g, C]
        if (gh, gw) == (self.grid, self.grid) {
            return Ok(t);
        }
        if gh <= 0 || gw <= 0 {
            return Err(VisionError::Shape(format!("empty token grid {gh}×{gw}")));
        }
        Ok(t.f_permute([0, 3, 1, 2])? // [1, C, g, g]
            .f_upsample_bicubic2d([gh, gw], false, None, None)?
            .f_permute([0, 2, 3, 1])?) // [1, gh, gw, C]
    }
}
