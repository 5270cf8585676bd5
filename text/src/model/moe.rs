//! Mixture-of-experts FFN (PT-MoE server model): E SwiGLU experts behind a softmax router.
//!
//! Routing is Mixtral's: `p = softmax(router(x))` in fp32 (optionally with the logits
//! soft-capped first, `cap · tanh(x / cap)`, as tamm's router does), the top-k experts per token, their
//! probabilities renormalised to sum to 1 (option: not renormalised, Qwen2-MoE's
//! `norm_topk_prob = false`), cast to the activations' dtype. Tokens are grouped per expert
//! with one sort (no per-token loop): each expert runs once on the `index_select`ed rows routed
//! to it and `index_add`s its gated output back.
//!
//! The load-balancing auxiliary loss (Switch Transformer, as HF's `load_balancing_loss_func`
//! computes it for one layer) is `E · Σₑ fₑ · Pₑ`, with fₑ the number of top-k assignments to
//! expert e over the tokens and Pₑ the mean router probability of e.
//!
//! Weight names under `{prefix}`: `gate.weight` `[E, hidden]` (the router) and
//! `experts.{e}.{gate,up,down}_proj.weight` (Mixtral's per-expert names; transformers 5's fused
//! `experts.gate_up_proj` / `experts.down_proj` split per expert on import).

use tch::{Kind, Tensor};

use crate::error::{Result, TextError};
use crate::linear::Linear;
use crate::mlp::SwiGlu;
use crate::weights::WeightMap;

/// Every tensor name of one MoE FFN with its shape.
pub fn moe_weight_shapes(
    prefix: &str,
    hidden: i64,
    ffn: i64,
    experts: usize,
) -> Vec<(String, Vec<i64>)> {
    let mut out = vec![(
        format!("{prefix}.gate.weight"),
        vec![experts as i64, hidden],
    )];
    for e in 0..experts {
        let p = format!("{prefix}.experts.{e}");
        out.push((format!("{p}.gate_proj.weight"), vec![ffn, hidden]));
        out.push((format!("{p}.up_proj.weight"), vec![ffn, hidden]));
        out.push((format!("{p}.down_proj.weight"), vec![hidden, ffn]));
    }
    out
}

/// What one MoE forward returns besides the output.
#[derive(Debug)]
pub struct MoeOutput {
    /// `[batch, seq, hidden]`.
    pub hidden: Tensor,
    /// Router logits `[batch·seq, E]` (fp32).
    pub router_logits: Tensor,
    /// Load-balancing auxiliary loss (scalar, fp32).
    pub aux_loss: Tensor,
}

#[derive(Debug)]
pub struct MoeFfn {
    /// The router: `[hidden] → [E]`.
    pub router: Linear,
    pub experts: Vec<SwiGlu>,
    top_k: i64,
    norm_topk: bool,
    /// Soft cap of the router logits (fp32), if any.
    logits_cap: Option<f64>,
}

impl MoeFfn {
    pub fn new(
        w: &WeightMap,
        prefix: &str,
        hidden: i64,
        ffn: i64,
        experts: usize,
        top_k: usize,
        norm_topk: bool,
    ) -> Result<Self> {
        if top_k == 0 || top_k > experts {
            return Err(TextError::InvalidArgument(format!(
                "MoE top-k {top_k} must be in 1..={experts}"
            )));
        }
        Ok(Self {
            router: Linear::new(w, &format!("{prefix}.gate"), hidden, experts as i64, false)?,
            experts: (0..experts)
                .map(|e| SwiGlu::new(w, &format!("{prefix}.experts.{e}"), hidden, ffn))
                .collect::<Result<Vec<_>>>()?,
            top_k: top_k as i64,
            norm_topk,
            logits_cap: None,
        })
    }

    /// Soft-cap the router logits to `cap · tanh(x / cap)` before the softmax (none: no cap).
    pub fn with_logits_cap(mut self, cap: Option<f64>) -> Self {
        self.logits_cap = cap;
        self
    }

    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }
    pub fn top_k(&self) -> usize {
        self.top_k as usize
    }

    pub fn num_params(&self) -> i64 {
        self.router.num_params() + self.experts.iter().map(SwiGlu::num_params).sum::<i64>()
    }
    /// Parameters one token uses: the router and its top-k experts.
    pub fn active_params(&self) -> i64 {
        self.router.num_params() + self.top_k * self.experts.first().map_or(0, SwiGlu::num_params)
    }

    // x: [batch, seq, hidden] → [batch, seq, hidden]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_full(x)?.hidden)
    }

    /// The output with the router logits and the auxiliary loss.
    pub fn forward_full(&self, x: &Tensor) -> Result<MoeOutput> {
        let size = x.size();
        let hidden = size[size.len() - 1];
        let flat = x.f_reshape([-1, hidden])?; // [n, hidden]
        let n = flat.size()[0];
        let e = self.experts.len() as i64;
        let mut logits = self.router.forward(&flat)?.f_to_kind(Kind::Float)?; // [n, E]
        if let Some(cap) = self.logits_cap {
            logits = logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?;
        }
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let (mut top_w, top_i) = probs.f_topk(self.top_k, -1, true, true)?; // [n, k]
        if self.norm_topk {
            top_w = top_w.f_div(&top_w.f_sum_dim_intlist(-1, true, Kind::Float)?)?;
        }
        let top_w = top_w.f_to_kind(x.kind())?;

        // Group the n·k assignments by expert with one stable sort.
        let flat_e = top_i.f_flatten(0, -1)?; // [n·k]
        let (_, order) = flat_e.f_sort_stable(true, 0, false)?;
        let token_of = order.f_floor_divide_scalar(self.top_k)?;
        let gate_of = top_w.f_flatten(0, -1)?.f_index_select(0, &order)?;
        let counts = flat_e.f_bincount(None::<Tensor>, e)?; // [E]
        let counts_cpu: Vec<i64> = Vec::<i64>::try_from(counts.f_to_device(tch::Device::Cpu)?)?;

        let mut out = flat.f_zeros_like()?;
        let mut offset = 0i64;
        for (expert, &c) in self.experts.iter().zip(&counts_cpu) {
            if c == 0 {
                continue;
            }
            let tok = token_of.f_narrow(0, offset, c)?;
            let rows = flat.f_index_select(0, &tok)?;
            let y = expert
                .forward(&rows)?
                .f_mul(&gate_of.f_narrow(0, offset, c)?.f_unsqueeze(-1)?)?;
            let _ = out.f_index_add_(0, &tok, &y)?;
            offset += c;
        }

        // Load balancing: E · Σ (assignments of e / n) · mean router probability of e.
        let frac = counts
            .f_to_kind(Kind::Float)?
            .f_div_scalar(n.max(1) as f64)?;
        let mean_p = probs.f_mean_dim(0, false, Kind::Float)?;
        let aux = frac
            .f_mul(&mean_p)?
            .f_sum(Kind::Float)?
            .f_mul_scalar(e as f64)?;
        Ok(MoeOutput {
            hidden: out.f_view(size.as_slice())?,
            router_logits: logits,
            aux_loss: aux,
        })
    }
}
