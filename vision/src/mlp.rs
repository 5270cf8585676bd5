//! The block MLP: Linear → GELU (exact) → Linear (HF `mlp.fc1` / `mlp.fc2`).

use tch::{nn, nn::Module, Tensor};

use crate::error::Result;
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        Self {
            fc1: nn::linear(
                &p / "fc1",
                cfg.hidden_size,
                cfg.intermediate_size,
                Default::default(),
            ),
            fc2: nn::linear(
                &p / "fc2",
                cfg.intermediate_size,
                cfg.hidden_size,
                Default::default(),
            ),
        }
    }

    /// `[..., C]` → `[..., C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x).f_gelu("none")?;
        Ok(self.fc2.forward(&h))
    }
}
