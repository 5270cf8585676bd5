//! The one linear-layer abstraction every projection goes through.
//!
//! `y = x·Wᵀ (+ b)`. The weight is an enum so that quantized storage slots in beside the
//! dense one, and adapters (LoRA) overlay a layer without touching model code.

use tch::Tensor;

use crate::error::Result;
use crate::weights::WeightMap;

/// How a linear layer's weight is stored.
#[derive(Debug)]
pub enum LinearWeight {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
}

#[derive(Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_features: i64,
    out_features: i64,
}

impl Linear {
    /// Load `{prefix}.weight` of shape `[out, in]` (and `{prefix}.bias` when `bias`).
    pub fn new(
        w: &WeightMap,
        prefix: &str,
        in_features: i64,
        out_features: i64,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self::from_dense(weight, bias))
    }

    /// Wrap an existing `[out, in]` tensor (shared storage, e.g. tied embeddings).
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        let size = weight.size();
        Self {
            in_features: size[1],
            out_features: size[0],
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    pub fn in_features(&self) -> i64 {
        self.in_features
    }
    pub fn out_features(&self) -> i64 {
        self.out_features
    }
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// Number of weight (and bias) elements.
    pub fn num_params(&self) -> i64 {
        self.in_features * self.out_features + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }

    /// Bytes the weights occupy.
    pub fn weight_bytes(&self) -> usize {
        let LinearWeight::Dense(w) = &self.weight;
        w.numel() * w.kind().elt_size_in_bytes()
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.numel() * b.kind().elt_size_in_bytes())
    }

    // x: [..., in] → [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(x.f_linear(w, self.bias.as_ref())?),
        }
    }
}
