//! SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`.

use tch::Tensor;

use crate::error::Result;
use crate::linear::Linear;
use crate::weights::WeightMap;

#[derive(Debug)]
pub struct SwiGlu {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl SwiGlu {
    pub fn new(w: &WeightMap, prefix: &str, hidden: i64, ffn: i64) -> Result<Self> {
        Ok(Self {
            gate: Linear::new(w, &format!("{prefix}.gate_proj"), hidden, ffn, false)?,
            up: Linear::new(w, &format!("{prefix}.up_proj"), hidden, ffn, false)?,
            down: Linear::new(w, &format!("{prefix}.down_proj"), ffn, hidden, false)?,
        })
    }

    pub fn num_params(&self) -> i64 {
        self.gate.num_params() + self.up.num_params() + self.down.num_params()
    }

    // x: [batch, seq, hidden] → [batch, seq, hidden]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.f_silu()?; // [batch, seq, ffn]
        let u = self.up.forward(x)?;
        self.down.forward(&g.f_mul(&u)?)
    }
}
