//! Multi-head attention with grouped K/V heads (GQA), optional QK-norm and RoPE.
//!
//! A segment-1 layer (AFM 2025) has only the Q and O projections: it attends with the K/V that
//! its source layer cached ([`crate::kv_cache::LayerCache::Shared`]).
//!
//! PT-MoE (server) layers add two options: no positional encoding (NoPE, the global layers)
//! and a sliding window, whose keys come from a ring buffer
//! ([`crate::kv_cache::LayerCache::Rotating`]) and whose band mask [`StepMask::sliding`] builds.

use tch::Tensor;

use crate::config::TextConfig;
use crate::error::Result;
use crate::kv_cache::{ring_key_positions, KvCache};
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::WeightMap;

/// Which keys each query may see in this step.
#[derive(Debug)]
pub struct StepMask {
    /// `[batch | 1, 1, q, k]` boolean (true = attend); `None` = no mask needed.
    pub mask: Option<Tensor>,
    /// Plain causal attention over a fresh sequence (lets SDPA pick its fast path).
    pub is_causal: bool,
}

impl StepMask {
    /// Causal + key-padding mask for `q` new tokens after `past` cached ones.
    pub fn build(
        q: i64,
        past: i64,
        key_mask: Option<&Tensor>,
        device: tch::Device,
    ) -> Result<Self> {
        let total = past + q;
        if key_mask.is_none() {
            if q == 1 {
                return Ok(Self {
                    mask: None,
                    is_causal: false,
                });
            }
            if past == 0 {
                return Ok(Self {
                    mask: None,
                    is_causal: true,
                });
            }
        }
        let opts = (tch::Kind::Int64, device);
        let qi = Tensor::f_arange_start(past, total, opts)?.f_unsqueeze(1)?; // [q, 1]
        let kj = Tensor::f_arange(total, opts)?.f_unsqueeze(0)?; // [1, total]
        let causal = kj.f_le_tensor(&qi)?.f_unsqueeze(0)?.f_unsqueeze(0)?; // [1, 1, q, total]
        let mask = match key_mask {
            None => causal,
            Some(km) => {
                let km = km.f_unsqueeze(1)?.f_unsqueeze(1)?; // [b, 1, 1, total]
                                                             // A padded query would see no key at all (NaN); let every query see itself.
                let diag = kj.f_eq_tensor(&qi)?.f_unsqueeze(0)?.f_unsqueeze(0)?;
                causal.f_logical_and(&km)?.f_logical_or(&diag)?
            }
        };
        Ok(Self {
            mask: Some(mask),
            is_causal: false,
        })
    }

    /// Sliding-window attention for `q` new tokens after `past` cached ones, over the keys a
    /// ring of `capacity` slots returns ([`ring_key_positions`]): query `i` (absolute cache
    /// index) sees key `j` iff `i − window < j ≤ i` (and `j` is a real token). With padding
    /// (`key_mask`, `[b, past + q]`), the window counts a row's real tokens, not cache slots:
    /// `j ≤ i` and `p(i) − window < p(j)`, `p` = the row's position (real tokens before it), so
    /// padding between a shared prefix and a row's question (eval's batches) takes no place in
    /// the window. The ring keeps `capacity` slots, padding included: the step that appends the
    /// padded rows sees every key it needs, later single-token steps only what the ring kept.
    pub fn sliding(
        q: i64,
        past: i64,
        window: i64,
        capacity: i64,
        key_mask: Option<&Tensor>,
        device: tch::Device,
    ) -> Result<Self> {
        let keys = ring_key_positions(past, q, capacity);
        if key_mask.is_none() {
            if q == 1 && keys.iter().all(|&j| past - j < window) {
                return Ok(Self {
                    mask: None,
                    is_causal: false,
                });
            }
            if past == 0 && q <= window {
                return Ok(Self {
                    mask: None,
                    is_causal: true,
                });
            }
        }
        let opts = (tch::Kind::Int64, device);
        let qi = Tensor::f_arange_start(past, past + q, opts)?.f_unsqueeze(1)?; // [q, 1]
        let kj = Tensor::f_from_slice(&keys)?
            .f_to_device(device)?
            .f_unsqueeze(0)?; // [1, keys]
        let causal = kj.f_le_tensor(&qi)?;
        let mask = match key_mask {
            None => causal
                .f_logical_and(&kj.f_gt_tensor(&qi.f_sub_scalar(window)?)?)?
                .f_unsqueeze(0)?
                .f_unsqueeze(0)?, // [1, 1, q, keys]
            Some(km) => {
                let key_idx = kj.f_squeeze_dim(0)?;
                // Row positions: real tokens before each cache index. [b, past + q]
                let pos = km
                    .f_to_kind(tch::Kind::Int64)?
                    .f_cumsum(1, tch::Kind::Int64)?
                    .f_sub_scalar(1)?;
                let pq = pos.f_narrow(1, past, q)?.f_unsqueeze(2)?; // [b, q, 1]
                let pk = pos.f_index_select(1, &key_idx)?.f_unsqueeze(1)?; // [b, 1, keys]
                let real = km.f_index_select(1, &key_idx)?.f_unsqueeze(1)?; // [b, 1, keys]
                                                                            // [b, q, keys]
                let band = pk
                    .f_gt_tensor(&pq.f_sub_scalar(window)?)?
                    .f_logical_and(&causal.f_unsqueeze(0)?)?
                    .f_logical_and(&real)?;
                // A padded query would see no key at all (NaN); let every query see itself.
                let diag = kj.f_eq_tensor(&qi)?.f_unsqueeze(0)?;
                band.f_logical_or(&diag)?.f_unsqueeze(1)? // [b, 1, q, keys]
            }
        };
        Ok(Self {
            mask: Some(mask),
            is_causal: false,
        })
    }

    /// A copy on `device` (tracks on other devices).
    pub fn to_device(&self, device: tch::Device) -> Result<Self> {
        Ok(Self {
            mask: match &self.mask {
                Some(m) => Some(m.f_to_device(device)?),
                None => None,
            },
            is_causal: self.is_causal,
        })
    }

    /// Only the last query row (segment 1 during prefill).
    pub fn last_row(&self) -> Result<Self> {
        Ok(Self {
            mask: match &self.mask {
                Some(m) => {
                    let q = m.size()[2];
                    Some(m.f_narrow(2, q - 1, 1)?)
                }
                None => None,
            },
            is_causal: false,
        })
    }
}

/// An attention layer's shape and options, read-only.
#[derive(Debug, Clone, Copy)]
pub struct AttnParts<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The cache layer its K/V live in (its own, or its source's for a segment-1 layer).
    pub cache_layer: usize,
    pub rope: bool,
    pub q_norm: Option<&'a RmsNorm>,
    pub k_norm: Option<&'a RmsNorm>,
    pub norm_after_rope: bool,
    /// K/V are fake-quantised before the cache.
    pub kv_quant: bool,
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    /// `None` in segment-1 layers.
    pub k_proj: Option<Linear>,
    pub v_proj: Option<Linear>,
    pub o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    layer: usize,
    /// Rotate Q and K (false: no positional encoding, NoPE).
    rope: bool,
    /// Apply the QK-norm after RoPE (tamm) instead of before (HF).
    norm_after_rope: bool,
    /// Per-tensor int8 fake-quantisation scales of (keys, values) before the cache.
    kv_quant: Option<(f32, f32)>,
    /// In generation's first-token pass, attend to this pass's keys and values unquantised
    /// (the cache still gets them quantised): tamm's `skip_quantize_for_first_token`.
    kv_quant_skip_first: bool,
}

impl Attention {
    /// The projections with their HF module names under `prefix` (`{prefix}.self_attn.q_proj`,
    /// …; segment-1 layers have no k and v), for adapters.
    pub fn named_linears(&mut self, prefix: &str) -> Vec<(String, &mut Linear)> {
        let mut out = vec![(format!("{prefix}.self_attn.q_proj"), &mut self.q_proj)];
        if let Some(k) = self.k_proj.as_mut() {
            out.push((format!("{prefix}.self_attn.k_proj"), k));
        }
        if let Some(v) = self.v_proj.as_mut() {
            out.push((format!("{prefix}.self_attn.v_proj"), v));
        }
        out.push((format!("{prefix}.self_attn.o_proj"), &mut self.o_proj));
        out
    }

    pub fn new(cfg: &TextConfig, w: &WeightMap, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.self_attn");
        Self::new_at(cfg, w, &p, layer, !cfg.is_segment1(layer), true)
    }

    /// Weights under `prefix` (`….self_attn`), K/V in layer `cache_layer` of the cache; without
    /// `owns_kv` it reads that layer's cache; without `rope` it has no positional encoding.
    pub fn new_at(
        cfg: &TextConfig,
        w: &WeightMap,
        prefix: &str,
        cache_layer: usize,
        owns_kv: bool,
        rope: bool,
    ) -> Result<Self> {
        let p = prefix;
        let layer = cache_layer;
        let hidden = cfg.hidden_size as i64;
        let heads = cfg.num_attention_heads as i64;
        let kv_heads = cfg.num_kv_heads() as i64;
        let head_dim = cfg.head_dim() as i64;
        let bias = cfg.attention_bias;
        let k_proj = owns_kv
            .then(|| Linear::new(w, &format!("{p}.k_proj"), hidden, kv_heads * head_dim, bias))
            .transpose()?;
        let v_proj = owns_kv
            .then(|| Linear::new(w, &format!("{p}.v_proj"), hidden, kv_heads * head_dim, bias))
            .transpose()?;
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::for_text(
                    cfg,
                    w,
                    &format!("{p}.q_norm.weight"),
                    head_dim,
                )?),
                owns_kv
                    .then(|| RmsNorm::for_text(cfg, w, &format!("{p}.k_norm.weight"), head_dim))
                    .transpose()?,
            )
        } else {
            (None, None)
        };
        // tamm's SimpleEMAMinMaxObserver: scale = max(min / −128, max / 127) in fp32.
        let kv_quant = if cfg.kv_fake_quant && owns_kv {
            let scale = |name: &str| -> Result<f32> {
                let r: Vec<f32> = Vec::try_from(
                    w.get_kind(
                        &format!("{p}.kv_quant.{name}_range"),
                        &[2],
                        tch::Kind::Float,
                    )?
                    .f_to_device(tch::Device::Cpu)?,
                )?;
                let s = (r[0] * (1.0f32 / -128.0)).max(r[1] * (1.0f32 / 127.0));
                if !(s.is_finite() && s > 0.0) {
                    return Err(crate::error::TextError::InvalidArgument(format!(
                        "{p}.kv_quant.{name}_range {r:?} gives no positive scale"
                    )));
                }
                Ok(s)
            };
            Some((scale("key")?, scale("value")?))
        } else {
            None
        };
        Ok(Self {
            kv_quant,
            kv_quant_skip_first: cfg.kv_fake_quant_skip_first,
            q_proj: Linear::new(w, &format!("{p}.q_proj"), hidden, heads * head_dim, bias)?,
            k_proj,
            v_proj,
            o_proj: Linear::new(w, &format!("{p}.o_proj"), heads * head_dim, hidden, bias)?,
            q_norm,
            k_norm,
            heads,
            kv_heads,
            head_dim,
            layer,
            rope,
            norm_after_rope: cfg.qk_norm_after_rope,
        })
    }

    /// What the fused CPU decode step ([`crate::cpu_decode`]) needs besides the projections.
    pub fn parts(&self) -> AttnParts<'_> {
        AttnParts {
            heads: self.heads as usize,
            kv_heads: self.kv_heads as usize,
            head_dim: self.head_dim as usize,
            cache_layer: self.layer,
            rope: self.rope,
            q_norm: self.q_norm.as_ref(),
            k_norm: self.k_norm.as_ref(),
            norm_after_rope: self.norm_after_rope,
            kv_quant: self.kv_quant.is_some(),
        }
    }

    /// Whether Q and K are rotated (false: NoPE).
    pub fn uses_rope(&self) -> bool {
        self.rope
    }

    pub fn num_params(&self) -> i64 {
        let lin = [
            Some(&self.q_proj),
            self.k_proj.as_ref(),
            self.v_proj.as_ref(),
            Some(&self.o_proj),
        ]
        .into_iter()
        .flatten()
        .map(Linear::num_params)
        .sum::<i64>();
        let norms = [&self.q_norm, &self.k_norm]
            .into_iter()
            .flatten()
            .map(RmsNorm::num_params)
            .sum::<i64>();
        lin + norms
    }

    // x: [batch, seq, hidden]; cos/sin: [batch, 1, seq, head_dim] → [batch, seq, hidden]
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &StepMask,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, s) = (x.size()[0], x.size()[1]);
        // [batch, heads, seq, head_dim]
        let mut q = self
            .q_proj
            .forward(x)?
            .f_view([b, s, self.heads, self.head_dim])?
            .f_transpose(1, 2)?;
        if let (Some(n), false) = (&self.q_norm, self.norm_after_rope) {
            q = n.forward(&q)?;
        }
        let mut q = if self.rope {
            Rope::apply(&q, cos, sin)?
        } else {
            q
        };
        if let (Some(n), true) = (&self.q_norm, self.norm_after_rope) {
            q = n.forward(&q)?;
        }
        let (k_all, v_all) = match (&self.k_proj, &self.v_proj) {
            (Some(kp), Some(vp)) => {
                // [batch, kv_heads, seq, head_dim]
                let mut k = kp
                    .forward(x)?
                    .f_view([b, s, self.kv_heads, self.head_dim])?
                    .f_transpose(1, 2)?;
                if let (Some(n), false) = (&self.k_norm, self.norm_after_rope) {
                    k = n.forward(&k)?;
                }
                let mut k = if self.rope {
                    Rope::apply(&k, cos, sin)?
                } else {
                    k
                };
                if let (Some(n), true) = (&self.k_norm, self.norm_after_rope) {
                    k = n.forward(&k)?;
                }
                let mut v = vp
                    .forward(x)?
                    .f_view([b, s, self.kv_heads, self.head_dim])?
                    .f_transpose(1, 2)?;
                match self.kv_quant {
                    Some((ks, vs)) if self.kv_quant_skip_first && cache.first_token_pass() => {
                        // The cache keeps the quantised values; attention sees the cached
                        // (quantised) past with this pass's own tokens unquantised, and so do
                        // the layers that reuse this one's keys and values.
                        let (kq, vq) = (fake_quant_int8(&k, ks)?, fake_quant_int8(&v, vs)?);
                        let (ka, va) = cache.append(self.layer, &kq, &vq)?;
                        let past = ka.size()[2] - s;
                        let ka =
                            Tensor::f_cat(&[ka.f_narrow(2, 0, past)?, k.f_to_kind(ka.kind())?], 2)?;
                        let va =
                            Tensor::f_cat(&[va.f_narrow(2, 0, past)?, v.f_to_kind(va.kind())?], 2)?;
                        if cache.is_shared_source(self.layer) {
                            cache.set_pass_view(self.layer, ka.shallow_clone(), va.shallow_clone());
                        }
                        (ka, va)
                    }
                    Some((ks, vs)) => {
                        k = fake_quant_int8(&k, ks)?;
                        v = fake_quant_int8(&v, vs)?;
                        cache.append(self.layer, &k, &v)?
                    }
                    None => cache.append(self.layer, &k, &v)?,
                }
            }
            // Segment 1: the source layer's keys (already rotated) and values.
            _ => cache.read(self.layer)?,
        };
        let groups = self.heads / self.kv_heads;
        let out = if s == 1 && groups > 1 && !mask.is_causal {
            // Decoding one token: fold the query heads that share a K/V head into the query
            // axis, [batch, heads, 1, d] → [batch, kv_heads, groups, d], so attention runs on
            // the cache as stored (SDPA's GQA path on CPU repeats K/V for every step). A
            // [batch | 1, 1, 1, keys] mask broadcasts over the groups.
            let qg = q.f_reshape([b, self.kv_heads, groups, self.head_dim])?;
            Tensor::f_scaled_dot_product_attention(
                &qg,
                &k_all,
                &v_all,
                mask.mask.as_ref(),
                0.0,
                false,
                None,
                false,
            )?
            .f_reshape([b, self.heads, 1, self.head_dim])?
        } else {
            Tensor::f_scaled_dot_product_attention(
                &q,
                &k_all,
                &v_all,
                mask.mask.as_ref(),
                0.0,
                mask.is_causal,
                None,
                groups > 1,
            )?
        }; // [batch, heads, seq, head_dim]
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, s, self.heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }
}

/// `round(x / scale).clamp(−128, 127) · scale` in fp32, back in `x`'s dtype (tamm's
/// `fake_quantize` with zero point 0).
fn fake_quant_int8(x: &Tensor, scale: f32) -> Result<Tensor> {
    Ok(x.f_to_kind(tch::Kind::Float)?
        .f_div_scalar(f64::from(scale))?
        .f_round()?
        .f_clamp(-128.0, 127.0)?
        .f_mul_scalar(f64::from(scale))?
        .f_to_kind(x.kind())?)
}
