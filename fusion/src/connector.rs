//! The SmolVLM / Idefics3 connector (HF `SmolVLMConnector`): pixel shuffle by `scale_factor`
//! (each `s × s` block of encoder tokens becomes one token `s²` times as wide), then a linear
//! projection without bias to the text model's width (`modality_projection.proj`).

use tch::Tensor;

use crate::error::{FusionError, Result};

#[derive(Debug)]
pub struct Connector {
    pub scale_factor: i64,
    /// `[text_hidden, vision_hidden · s²]`.
    proj: Tensor,
}

impl Connector {
    /// `proj`: `modality_projection.proj.weight`.
    pub fn new(scale_factor: i64, proj: Tensor) -> Self {
        Self { scale_factor, proj }
    }

    /// HF's `pixel_shuffle`, the same views and permutes: `[B, S, C]` (S a square whose side
    /// `scale_factor` divides) → `[B, S / s², C · s²]`.
    pub fn pixel_shuffle(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, c) = x.size3()?;
        let s = self.scale_factor;
        let side = (seq as f64).sqrt() as i64;
        if side * side != seq || side % s != 0 {
            return Err(FusionError::InvalidArgument(format!(
                "pixel shuffle by {s} needs a square grid of tokens whose side {s} divides, got {seq} tokens"
            )));
        }
        let x = x
            .f_view([b, side, side, c])?
            .f_view([b, side, side / s, c * s])?
            .f_permute([0, 2, 1, 3])?
            .f_reshape([b, side / s, side / s, c * s * s])?
            .f_permute([0, 2, 1, 3])?
            .f_reshape([b, seq / (s * s), c * s * s])?;
        Ok(x)
    }

    /// Encoder tokens `[B, S, C]` → visual tokens `[B, S / s², text_hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.pixel_shuffle(x)?;
        Ok(x.f_to_kind(self.proj.kind())?
            .f_linear(&self.proj, None::<Tensor>)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn shuffle_gathers_each_block_into_one_token() {
        // 4×4 grid of scalar tokens numbered row-major, shuffled by 2.
        let c = Connector::new(2, Tensor::zeros([1, 4], (Kind::Float, tch::Device::Cpu)));
        let x = Tensor::arange(16, (Kind::Float, tch::Device::Cpu)).reshape([1, 16, 1]);
        let y = c.pixel_shuffle(&x).unwrap();
        assert_eq!(y.size(), vec![1, 4, 4]);
        let first: Vec<f32> = Vec::try_from(y.get(0).get(0)).unwrap();
        // HF's order: the block at the top left, its rows side by side.
        assert_eq!(first, vec![0.0, 1.0, 4.0, 5.0]);
        let bad = Tensor::zeros([1, 15, 1], (Kind::Float, tch::Device::Cpu));
        assert!(c.pixel_shuffle(&bad).is_err());
    }
}
