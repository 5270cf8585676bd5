//! The one linear-layer abstraction every projection goes through.
//!
//! `y = x·Wᵀ (+ b) (+ s·(x·Aᵀ)·Bᵀ)`. The weight is an enum so that quantized storage slots in
//! beside the dense one, and a LoRA overlay (A, B, s = α/r) sits on top of any of them
//! without touching model code.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::quant::ggml::GgmlWeight;
use crate::quant::QuantizedWeight;
use crate::weights::WeightMap;

/// How a linear layer's weight is stored.
#[derive(Debug)]
pub enum LinearWeight {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
    /// Packed low-bit codes with look-up tables or scales ([`crate::quant`]); the matmul reads
    /// them directly.
    Quantized(Box<QuantizedWeight>),
    /// Quantization-aware training: a full-precision `[out, in]` weight run through the
    /// fake-quantizer ([`crate::quant::qat::fake_quant`]) with a learnable clipping factor
    /// `f` (`[out, 1]`) on every forward; both are trained.
    FakeQuant(Box<crate::quant::qat::FakeQuantWeight>),
    /// GGUF's quantized blocks as the file stores them ([`crate::quant::ggml`]); the matmul
    /// reads them directly, activations quantised per 32 values (int16 by default).
    Ggml(Box<GgmlWeight>),
    /// `[out, in]` stored in bf16 under fp32 activations (half the bytes a decode step reads;
    /// see [`Linear::store_bf16`]): the fused decode step widens each weight exactly as it
    /// reads it, libtorch's forward widens the whole matrix first (a copy per call: for
    /// batch-1 decoding through the fused step, not for batched libtorch work). The results
    /// are those of the widened fp32 weight.
    Bf16(Tensor),
}

/// A low-rank update `s·B·A` applied on the fly.
#[derive(Debug)]
pub struct LoraOverlay {
    /// `[rank, in]`
    pub a: Tensor,
    /// `[out, rank]`
    pub b: Tensor,
    /// α / r
    pub scale: f64,
}

impl LoraOverlay {
    /// The full update `s·B·A`, `[out, in]`, in `kind`.
    pub fn delta(&self, kind: Kind) -> Result<Tensor> {
        Ok(self
            .b
            .f_matmul(&self.a)?
            .f_mul_scalar(self.scale)?
            .f_to_kind(kind)?)
    }

    /// A view sharing storage (activating a cached adapter copies no weights).
    pub fn shallow_clone(&self) -> Self {
        Self {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            scale: self.scale,
        }
    }
}

#[derive(Debug)]
pub struct Linear {
    weight: LinearWeight,
    lora: Option<LoraOverlay>,
    bias: Option<Tensor>,
    in_features: i64,
    out_features: i64,
    /// The dtype activations run in.
    kind: Kind,
}

impl Linear {
    /// Load `{prefix}.weight` of shape `[out, in]` (and `{prefix}.bias` when `bias`), or its
    /// packed form (`{prefix}.weight.qcodes` + table, see [`crate::quant`]) when present.
    pub fn new(
        w: &WeightMap,
        prefix: &str,
        in_features: i64,
        out_features: i64,
        bias: bool,
    ) -> Result<Self> {
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        let name = format!("{prefix}.weight");
        if let Some(q) = QuantizedWeight::from_map(w, &name, out_features, in_features)? {
            return Ok(Self::from_quantized(q, bias, w.kind()));
        }
        if let Some(g) = GgmlWeight::from_map(w, &name, out_features, in_features)? {
            return Ok(Self::from_ggml(g, bias, w.kind()));
        }
        let weight = w.get(&name, &[out_features, in_features])?;
        Ok(Self::from_dense(weight, bias))
    }

    /// Wrap a quantized weight; activations run in `kind`.
    pub fn from_quantized(q: QuantizedWeight, bias: Option<Tensor>, kind: Kind) -> Self {
        Self {
            in_features: q.cols(),
            out_features: q.rows(),
            weight: LinearWeight::Quantized(Box::new(q)),
            lora: None,
            bias,
            kind,
        }
    }

    /// Wrap GGUF blocks; activations run in `kind`.
    pub fn from_ggml(g: GgmlWeight, bias: Option<Tensor>, kind: Kind) -> Self {
        Self {
            in_features: g.cols(),
            out_features: g.rows(),
            weight: LinearWeight::Ggml(Box::new(g)),
            lora: None,
            bias,
            kind,
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Wrap an existing `[out, in]` tensor (shared storage, e.g. tied embeddings).
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        let size = weight.size();
        Self {
            in_features: size[1],
            out_features: size[0],
            kind: weight.kind(),
            weight: LinearWeight::Dense(weight),
            lora: None,
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
        let w = match &self.weight {
            LinearWeight::Dense(w) | LinearWeight::Bf16(w) => {
                w.numel() * w.kind().elt_size_in_bytes()
            }
            LinearWeight::Quantized(q) => q.stored_bytes(),
            LinearWeight::Ggml(g) => g.stored_bytes(),
            LinearWeight::FakeQuant(q) => {
                (q.w.numel() + q.f.numel()) * q.w.kind().elt_size_in_bytes()
            }
        };
        w + self
            .bias
            .as_ref()
            .map_or(0, |b| b.numel() * b.kind().elt_size_in_bytes())
    }

    /// The dtype computations run in.
    pub fn weight_kind(&self) -> tch::Kind {
        self.kind
    }

    pub fn device(&self) -> tch::Device {
        match &self.weight {
            LinearWeight::Dense(w) | LinearWeight::Bf16(w) => w.device(),
            LinearWeight::Quantized(q) => q.device(),
            LinearWeight::Ggml(_) => tch::Device::Cpu,
            LinearWeight::FakeQuant(q) => q.w.device(),
        }
    }

    /// Whether the weight is stored quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Quantized(_) | LinearWeight::Ggml(_)
        )
    }

    /// Replace the weight (QAT swaps a dense weight for a fake-quantized one and back).
    pub fn set_weight(&mut self, weight: LinearWeight) -> LinearWeight {
        std::mem::replace(&mut self.weight, weight)
    }

    /// Store a dense fp32 CPU weight in bf16 ([`LinearWeight::Bf16`]), activations staying
    /// fp32; anything else (quantized, trained, already bf16, another device) is left as it
    /// is. With `lossless_only`, only a weight whose every value is a bf16 value (an fp32
    /// model loaded from a bf16 checkpoint) is stored, so nothing changes but the bytes.
    /// Returns whether the weight was converted.
    pub fn store_bf16(&mut self, lossless_only: bool) -> Result<bool> {
        let LinearWeight::Dense(w) = &self.weight else {
            return Ok(false);
        };
        if w.kind() != Kind::Float || w.device() != tch::Device::Cpu || w.requires_grad() {
            return Ok(false);
        }
        let lossless = |w: &Tensor| -> Result<bool> {
            Ok(w.f_to_kind(Kind::BFloat16)?
                .f_to_kind(Kind::Float)?
                .f_equal(w)?)
        };
        // The first row settles an fp32 checkpoint's weights without converting the matrix.
        if lossless_only && w.size()[0] > 0 && !lossless(&w.f_narrow(0, 0, 1)?)? {
            return Ok(false);
        }
        let b = w.f_to_kind(Kind::BFloat16)?.f_contiguous()?;
        if lossless_only && !b.f_to_kind(Kind::Float)?.f_equal(w)? {
            return Ok(false);
        }
        self.weight = LinearWeight::Bf16(b);
        Ok(true)
    }

    pub fn lora(&self) -> Option<&LoraOverlay> {
        self.lora.as_ref()
    }

    /// Put a LoRA overlay on (or take it off with `None`); returns the previous one.
    pub fn set_lora(&mut self, lora: Option<LoraOverlay>) -> Result<Option<LoraOverlay>> {
        if let Some(l) = &lora {
            let (a, b) = (l.a.size(), l.b.size());
            if a.len() != 2
                || b.len() != 2
                || a[1] != self.in_features
                || b[0] != self.out_features
                || a[0] != b[1]
            {
                return Err(crate::error::TextError::InvalidArgument(format!(
                    "LoRA A {a:?} / B {b:?} do not fit a {}→{} linear layer",
                    self.in_features, self.out_features
                )));
            }
        }
        Ok(std::mem::replace(&mut self.lora, lora))
    }

    /// Fold the overlay into the dense weight (`W += s·B·A`) and drop it.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.widen_bf16()?;
        if self.lora.is_some() && !matches!(self.weight, LinearWeight::Dense(_)) {
            return Err(crate::error::TextError::InvalidArgument(
                "cannot merge a LoRA adapter into a quantized layer (run it as an overlay)".into(),
            ));
        }
        if let Some(l) = self.lora.take() {
            let LinearWeight::Dense(w) = &self.weight else {
                unreachable!("checked above")
            };
            self.weight = LinearWeight::Dense(w.f_add(&l.delta(w.kind())?)?);
        }
        Ok(())
    }

    /// Take a merged update back out of the dense weight (`W −= s·B·A`): the inverse of
    /// [`Linear::merge_lora`] up to rounding in the weight's dtype.
    pub fn unmerge_lora(&mut self, lora: &LoraOverlay) -> Result<()> {
        self.widen_bf16()?;
        let LinearWeight::Dense(w) = &self.weight else {
            return Err(crate::error::TextError::InvalidArgument(
                "cannot unmerge a LoRA adapter from a quantized layer".into(),
            ));
        };
        let delta = lora.delta(w.kind())?;
        if delta.size() != w.size() {
            return Err(crate::error::TextError::InvalidArgument(format!(
                "LoRA update {:?} does not fit a weight {:?}",
                delta.size(),
                w.size()
            )));
        }
        self.weight = LinearWeight::Dense(w.f_sub(&delta)?);
        Ok(())
    }

    /// A bf16-stored weight back to a dense one in the activations' dtype (a merged update must
    /// not be rounded to bf16).
    fn widen_bf16(&mut self) -> Result<()> {
        if let LinearWeight::Bf16(w) = &self.weight {
            self.weight = LinearWeight::Dense(w.f_to_kind(self.kind)?);
        }
        Ok(())
    }

    // x: [..., in] → [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.f_linear(w, self.bias.as_ref())?,
            LinearWeight::Bf16(w) => x.f_linear(&w.f_to_kind(x.kind())?, self.bias.as_ref())?,
            LinearWeight::Quantized(q) => q.forward(x, self.bias.as_ref())?,
            LinearWeight::Ggml(g) => g.forward(x, self.bias.as_ref())?,
            LinearWeight::FakeQuant(q) => {
                let wq = crate::quant::qat::fake_quant(&q.w, &q.f, &q.spec)?.f_to_kind(x.kind())?;
                x.f_linear(&wq, self.bias.as_ref())?
            }
        };
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                // [..., in] → [..., rank] → [..., out]
                let xa = x.f_to_kind(l.a.kind())?.f_linear::<Tensor>(&l.a, None)?;
                let delta = xa.f_linear::<Tensor>(&l.b, None)?.f_mul_scalar(l.scale)?;
                Ok(y.f_add(&delta.f_to_kind(y.kind())?)?)
            }
        }
    }
}
