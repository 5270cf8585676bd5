//! The fused CPU decode step: one new token of one sequence through the whole dense stack in
//! Rust, on one persistent thread pool ([`crate::cpu_pool`]), with no libtorch op between the
//! embedding and the logits.
//!
//! Per layer: RMSNorm → Q, K, V in one job (their rows are the chunks) → QK-norm / RoPE →
//! K, V written straight into the layer's cache buffer → attention split by kv head and token
//! range ([`attend`]) → O → residual → RMSNorm → gate and up in one job with SiLU(gate)·up
//! applied per chunk → down → residual. Activations are quantised once per input when a
//! projection holds GGUF blocks ([`crate::quant::ggml`]). Every other weight format runs its
//! own kernel: dense fp32 or bf16-stored ([`crate::linear::LinearWeight::Bf16`]), our packed
//! LUT / 8-bit codes ([`crate::quant::packed`]). A LoRA
//! overlay adds `s·B·(A·x)` to its projection's rows (`A·x` once per input).
//!
//! [`Plan::new`] says whether a decoder can take this path (fp32 on the CPU, no KV
//! fake-quantisation, no dynamic RoPE); [`crate::decoder::Decoder`] falls back to
//! libtorch otherwise, and for prefill, batches and training. Both paths are tested equal.

use crate::decoder::Decoder;
use crate::error::{Result, TextError};
use crate::gguf::GgmlType;
use crate::kv_cache::{KvCache, RawKv};
use crate::linear::{Linear, LinearWeight};
use crate::norm::RmsNorm;
use crate::quant::ggml::{self, Q8Acts};
use crate::quant::packed::{self, is_cpu_contiguous, Isa, Table};
use crate::runtime::cpu_kernels::{bf16_rows, dense_rows, weighted_rows};
use crate::runtime::cpu_pool::{self, Pool};
use tch::Kind;

/// Rows per chunk of a projection job of `rows` rows on `threads` threads: two chunks per
/// thread, so that each thread streams long runs of contiguous rows (the hardware prefetcher
/// keeps up; 32-row chunks measured 20% slower), capped so that a thread the OS sets aside
/// mid-chunk holds up at most ~2048 rows.
fn chunk_rows(rows: usize, threads: usize) -> usize {
    (rows / (2 * threads.max(1))).div_ceil(16).clamp(1, 128) * 16
}

/// A weight as the kernels read it.
enum Mat<'a> {
    Dense(&'a [f32]),
    /// bf16 bits, widened as they are read.
    Bf16(&'a [u16]),
    Ggml(GgmlType, &'a [u8]),
    Packed {
        packed: &'a [u8],
        table: Table<'a>,
        bits: u8,
    },
}

/// One projection: weight, shape, bias, LoRA overlay.
struct Proj<'a> {
    mat: Mat<'a>,
    rows: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
    lora: Option<Lora<'a>>,
    /// Some tensor of it requires grad (a parameter being trained).
    trainable: bool,
}

/// A LoRA overlay `y += s·B·(A·x)`: `a` `[rank, cols]`, `b` `[rows, rank]`.
struct Lora<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    scale: f32,
}

fn f32_slice(t: &tch::Tensor) -> Option<&[f32]> {
    cpu_view(t, Kind::Float)
}

/// The elements of a contiguous CPU tensor of `kind` (`T` its element type), borrowed.
fn cpu_view<T>(t: &tch::Tensor, kind: Kind) -> Option<&[T]> {
    // SAFETY: checked contiguous `kind` on the CPU; the slice borrows the tensor.
    is_cpu_contiguous(t, kind).then(|| unsafe { packed::cpu_slice::<T>(t) })
}

impl<'a> Proj<'a> {
    fn new(l: &'a Linear) -> Option<Self> {
        let trainable = match l.weight() {
            LinearWeight::Dense(w) => w.requires_grad(),
            _ => false,
        } || l
            .lora()
            .is_some_and(|o| o.a.requires_grad() || o.b.requires_grad());
        let lora = match l.lora() {
            Some(o) => {
                let (a, b) = (f32_slice(&o.a)?, f32_slice(&o.b)?);
                let rank = o.a.size().first().copied().unwrap_or(0) as usize;
                let (rows, cols) = (l.out_features() as usize, l.in_features() as usize);
                if rank == 0 || a.len() != rank * cols || b.len() != rows * rank {
                    return None;
                }
                Some(Lora {
                    a,
                    b,
                    rank,
                    scale: o.scale as f32,
                })
            }
            None => None,
        };
        let mat = match l.weight() {
            LinearWeight::Dense(w) => Mat::Dense(f32_slice(w)?),
            LinearWeight::Bf16(w) => Mat::Bf16(cpu_view(w, Kind::BFloat16)?),
            LinearWeight::Ggml(g) => Mat::Ggml(g.ty(), g.bytes()),
            LinearWeight::Quantized(q) => {
                let (packed, table) = q.kernel_view()?;
                Mat::Packed {
                    packed,
                    table,
                    bits: q.bits(),
                }
            }
            LinearWeight::FakeQuant(_) => return None,
        };
        let bias = match l.bias() {
            Some(b) => Some(f32_slice(b)?),
            None => None,
        };
        Some(Self {
            mat,
            rows: l.out_features() as usize,
            cols: l.in_features() as usize,
            bias,
            lora,
            trainable,
        })
    }

    /// `A·x` of the LoRA overlay (empty without one): computed once per input, before the
    /// row chunks, which each add their rows of `s·B·(A·x)`.
    fn lora_input(&self, isa: Isa, x: &[f32]) -> Vec<f32> {
        match &self.lora {
            Some(l) => {
                let mut ax = vec![0f32; l.rank];
                dense_rows(isa, l.a, self.cols, x, 0, &mut ax);
                ax
            }
            None => Vec::new(),
        }
    }

    fn needs_q8(&self) -> bool {
        matches!(self.mat, Mat::Ggml(..))
    }

    /// Rows `r0..r0 + y.len()` of `W·x (+ b) (+ s·B·ax)`, `ax` from [`Proj::lora_input`].
    fn rows_into(&self, isa: Isa, inp: &Input<'_>, ax: &[f32], r0: usize, y: &mut [f32]) {
        match &self.mat {
            Mat::Dense(w) => dense_rows(isa, w, self.cols, inp.x, r0, y),
            Mat::Bf16(w) => bf16_rows(isa, w, self.cols, inp.x, r0, y),
            Mat::Ggml(ty, data) => ggml::gemv_rows(isa, *ty, data, self.cols, inp.q8, r0, y),
            Mat::Packed {
                packed: p,
                table,
                bits,
            } => packed::gemv_rows(isa, p, *table, *bits, self.cols, inp.x, inp.sum, r0, y),
        }
        if let Some(b) = self.bias {
            for (v, bv) in y.iter_mut().zip(&b[r0..]) {
                *v += bv;
            }
        }
        if let Some(l) = &self.lora {
            for (i, v) in y.iter_mut().enumerate() {
                let r = r0 + i;
                *v += l.scale
                    * crate::runtime::cpu_kernels::dot(isa, &l.b[r * l.rank..(r + 1) * l.rank], ax);
            }
        }
    }
}

/// One input vector in the forms the kernels read.
struct Input<'a> {
    x: &'a [f32],
    sum: f32,
    q8: &'a Q8Acts,
}

struct Norm<'a> {
    w: &'a [f32],
    eps: f32,
}

impl<'a> Norm<'a> {
    fn new(n: &'a RmsNorm) -> Option<Self> {
        let (w, eps) = n.parts();
        Some(Self {
            w: f32_slice(w)?,
            eps: eps as f32,
        })
    }

    /// `x / sqrt(mean(x²) + ε) · g` into `out` (fp32 statistics, as libtorch's rms_norm).
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let r = 1.0 / (ms + self.eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(x).zip(self.w) {
            *o = v * r * g;
        }
    }
}

struct LayerPlan<'a> {
    in_norm: Norm<'a>,
    post_norm: Norm<'a>,
    q: Proj<'a>,
    kv: Option<(Proj<'a>, Proj<'a>)>,
    o: Proj<'a>,
    gate: Proj<'a>,
    up: Proj<'a>,
    down: Proj<'a>,
    q_norm: Option<Norm<'a>>,
    k_norm: Option<Norm<'a>>,
    norm_after_rope: bool,
    rope: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// This layer's own cache index (segment 0) and the one it reads.
    layer: usize,
    cache_layer: usize,
}

/// What a decoder's fused step reads: borrowed views of its weights.
pub struct Plan<'a> {
    layers: Vec<LayerPlan<'a>>,
    final_norm: Norm<'a>,
    head: Proj<'a>,
    hidden: usize,
    vocab: usize,
    /// Some projection requires grad: with autograd recording, the step (which records
    /// nothing) must not run (`train lora`'s overlays; see [`Plan::may_run`]).
    trainable: bool,
}

impl<'a> Plan<'a> {
    /// The plan for `dec`, or `None` when some part needs libtorch (see the module docs).
    pub fn new(dec: &'a Decoder) -> Option<Self> {
        if dec.kind() != Kind::Float || dec.device() != tch::Device::Cpu {
            return None;
        }
        let mut layers = Vec::with_capacity(dec.layers.len());
        for (i, l) in dec.layers.iter().enumerate() {
            let p = l.attn.parts();
            if p.kv_quant || p.heads % p.kv_heads.max(1) != 0 {
                return None;
            }
            let kv = match (&l.attn.k_proj, &l.attn.v_proj) {
                (Some(k), Some(v)) => Some((Proj::new(k)?, Proj::new(v)?)),
                (None, None) => None,
                _ => return None,
            };
            let norm = |n: Option<&'a RmsNorm>| -> Option<Option<Norm<'a>>> {
                match n {
                    Some(n) => Some(Some(Norm::new(n)?)),
                    None => Some(None),
                }
            };
            layers.push(LayerPlan {
                in_norm: Norm::new(&l.input_norm)?,
                post_norm: Norm::new(&l.post_norm)?,
                q: Proj::new(&l.attn.q_proj)?,
                kv,
                o: Proj::new(&l.attn.o_proj)?,
                gate: Proj::new(&l.mlp.gate)?,
                up: Proj::new(&l.mlp.up)?,
                down: Proj::new(&l.mlp.down)?,
                q_norm: norm(p.q_norm)?,
                k_norm: norm(p.k_norm)?,
                norm_after_rope: p.norm_after_rope,
                rope: p.rope,
                heads: p.heads,
                kv_heads: p.kv_heads,
                head_dim: p.head_dim,
                layer: i,
                cache_layer: p.cache_layer,
            });
        }
        let head = Proj::new(&dec.lm_head)?;
        let trainable = head.trainable
            || layers.iter().any(|l| {
                [&l.q, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .any(|p| p.trainable)
                    || l.kv
                        .as_ref()
                        .is_some_and(|(k, v)| k.trainable || v.trainable)
            });
        Some(Self {
            layers,
            final_norm: Norm::new(&dec.norm)?,
            head,
            hidden: dec.cfg.hidden_size,
            vocab: dec.cfg.vocab_size,
            trainable,
        })
    }

    /// Whether the step may run now: always, unless a projection is being trained and autograd
    /// records on this thread (then libtorch runs, so that gradients reach the parameters).
    pub fn may_run(&self) -> Result<bool> {
        Ok(!self.trainable || !crate::runtime::device::grad_enabled()?)
    }

    /// Whether `cache` can take a fused step (batch 1, fp32 CPU buffers, no padding).
    pub fn fits(&self, cache: &KvCache) -> bool {
        cache.batch() == 1
            && cache.key_mask().is_none()
            && !cache.first_token_pass()
            && self.layers.iter().all(|l| {
                if l.kv.is_some() {
                    cache.can_append_token_f32(l.layer)
                } else {
                    cache.raw_f32(l.cache_layer).is_some()
                }
            })
    }
}

/// A raw pointer that may cross to the pool's threads; each chunk writes its own range.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// SAFETY: `r0..r0 + n` lies inside the buffer and no other chunk writes it.
    unsafe fn range<'b>(self, r0: usize, n: usize) -> &'b mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(r0), n)
    }
}

/// Run projections `(proj, out)` on `inp` as one pool job, chunked by rows.
fn project(pool: &Pool, isa: Isa, inp: &Input<'_>, jobs: &mut [(&Proj<'_>, &mut [f32])]) {
    let mut chunks: Vec<(usize, usize, usize)> = Vec::new(); // (job, r0, r1)
    for (j, (p, _)) in jobs.iter().enumerate() {
        let step = chunk_rows(p.rows, pool.width());
        let mut r = 0;
        while r < p.rows {
            chunks.push((j, r, (r + step).min(p.rows)));
            r += step;
        }
    }
    let outs: Vec<(Out, &Proj<'_>, Vec<f32>)> = jobs
        .iter_mut()
        .map(|(p, o)| (Out(o.as_mut_ptr()), &**p, p.lora_input(isa, inp.x)))
        .collect();
    pool.run(chunks.len(), &|c| {
        let (j, r0, r1) = chunks[c];
        let (out, p, ax) = &outs[j];
        // SAFETY: chunks of one job cover disjoint row ranges of its output.
        let y = unsafe { out.range(r0, r1 - r0) };
        p.rows_into(isa, inp, ax, r0, y);
    });
}

fn input<'b>(x: &'b [f32], q8: &'b mut Q8Acts, need_q8: bool) -> Input<'b> {
    if need_q8 {
        q8.prepare(x, ggml::activations());
    }
    Input {
        x,
        sum: x.iter().sum(),
        q8,
    }
}

/// `x·cos + rotate_half(x)·sin` in place for one head (`sin` sign-folded: [−sin, sin]).
fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// A CPU fp32 tensor holding `v`. Unlike `Tensor::from_slice` (which zero-fills first, a
/// parallel libtorch kernel for a vocabulary-sized row), it wakes no OpenMP thread: libtorch's
/// workers would then spin against the decode pool for the next milliseconds.
pub fn f32_tensor(v: &[f32], shape: &[i64]) -> Result<tch::Tensor> {
    let n: i64 = shape.iter().product();
    if n as usize != v.len() {
        return Err(TextError::InvalidArgument(format!(
            "{} values for shape {shape:?}",
            v.len()
        )));
    }
    let t = tch::Tensor::f_empty(shape, (Kind::Float, tch::Device::Cpu))?;
    // SAFETY: a fresh contiguous fp32 CPU tensor of exactly v.len() elements.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), t.data_ptr() as *mut f32, v.len()) };
    Ok(t)
}

/// Reusable buffers of one step.
#[derive(Default)]
struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    h: Vec<f32>,
    q8: Q8Acts,
}

/// Softmax attention of one token's `heads` query heads (`q`, `[heads, head_dim]`) over a
/// layer's cache, into `out` (`[heads, head_dim]`). Flash-decoding: the work splits by kv head
/// and token range, so that every thread gets a share at any head count and each kv head's K
/// and V rows are read from memory once for all the query heads that share them (GQA); each
/// range keeps its softmax partials (max, Σexp, Σexp·v), which combine exactly after the job.
fn attend(pool: &Pool, isa: Isa, q: &[f32], raw: &RawKv, heads: usize, out: &mut [f32]) {
    // Ranges per kv head: two chunks per thread in all, ranges of at least 64 tokens.
    let splits = (2 * pool.width())
        .div_ceil(raw.kv_heads.max(1))
        .clamp(1, raw.len.div_ceil(64).max(1));
    attend_split(pool, isa, q, raw, heads, splits, out)
}

/// [`attend`] with `splits` token ranges per kv head.
fn attend_split(
    pool: &Pool,
    isa: Isa,
    q: &[f32],
    raw: &RawKv,
    heads: usize,
    splits: usize,
    out: &mut [f32],
) {
    let (nkv, hd, n, cap) = (raw.kv_heads, raw.head_dim, raw.len, raw.capacity);
    let groups = heads / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let stride = hd + 2; // one partial: o[hd], max, Σexp
    let mut parts = vec![0f32; heads * splits * stride];
    let po = Out(parts.as_mut_ptr());
    // SAFETY: RawKv's buffers hold kv_heads × capacity × head_dim values, and the cache is not
    // touched while the job runs.
    let (kall, vall) = unsafe {
        (
            std::slice::from_raw_parts(raw.k, nkv * cap * hd),
            std::slice::from_raw_parts(raw.v, nkv * cap * hd),
        )
    };
    pool.run(nkv * splits, &|c| {
        let (g, sp) = (c / splits, c % splits);
        let (t0, t1) = (sp * n / splits, (sp + 1) * n / splits);
        let base = g * cap * hd;
        let (kh, vh) = (
            &kall[base + t0 * hd..base + t1 * hd],
            &vall[base + t0 * hd..base + t1 * hd],
        );
        let mut sc = vec![0f32; t1 - t0];
        for h in g * groups..(g + 1) * groups {
            // SAFETY: partial (h, sp) is written by this chunk only.
            let part = unsafe { po.range((h * splits + sp) * stride, stride) };
            if t1 == t0 {
                part[hd] = f32::NEG_INFINITY;
                part[hd + 1] = 0.0;
                continue;
            }
            dense_rows(isa, kh, hd, &q[h * hd..(h + 1) * hd], 0, &mut sc);
            let m = sc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
            let mut z = 0f32;
            for v in sc.iter_mut() {
                *v = (*v * scale - m).exp();
                z += *v;
            }
            weighted_rows(isa, &sc, vh, &mut part[..hd]);
            part[hd] = m;
            part[hd + 1] = z;
        }
    });
    for (h, o) in out.chunks_exact_mut(hd).enumerate().take(heads) {
        let ps = &parts[h * splits * stride..(h + 1) * splits * stride];
        let mx = ps
            .chunks_exact(stride)
            .fold(f32::NEG_INFINITY, |a, p| a.max(p[hd]));
        o.fill(0.0);
        let mut z = 0f32;
        for p in ps.chunks_exact(stride).filter(|p| p[hd + 1] > 0.0) {
            let w = (p[hd] - mx).exp();
            z += w * p[hd + 1];
            for (ov, pv) in o.iter_mut().zip(&p[..hd]) {
                *ov += w * pv;
            }
        }
        let iz = 1.0 / z;
        o.iter_mut().for_each(|v| *v *= iz);
    }
}

/// One decode step: `x` (the new token's embedding, `[hidden]`) through every layer, the
/// final norm and the head, extending `cache` by one token. Returns the logits `[vocab]`.
pub fn step(dec: &Decoder, plan: &Plan<'_>, x: &[f32], cache: &mut KvCache) -> Result<Vec<f32>> {
    if x.len() != plan.hidden {
        return Err(TextError::InvalidArgument(format!(
            "fused step: embedding of {} values for hidden size {}",
            x.len(),
            plan.hidden
        )));
    }
    let pool = cpu_pool::global();
    let isa = Isa::current();
    let pos = cache.next_positions()[0];
    let rope = if plan.layers.iter().any(|l| l.rope) {
        Some(dec.rope_row_f32(pos).ok_or_else(|| {
            TextError::InvalidArgument(format!("fused step: no RoPE row for position {pos}"))
        })?)
    } else {
        None
    };
    let t0 = std::time::Instant::now();
    let _ = cache.begin_step(1, None)?;
    let mut x = x.to_vec();
    let mut s = Scratch::default();
    s.xn.resize(plan.hidden, 0.0);
    for l in &plan.layers {
        let (hd, nh, nkv) = (l.head_dim, l.heads, l.kv_heads);
        l.in_norm.apply(&x, &mut s.xn);
        s.q.resize(nh * hd, 0.0);
        s.k.resize(nkv * hd, 0.0);
        s.v.resize(nkv * hd, 0.0);
        {
            let need = l.q.needs_q8()
                || l.kv
                    .as_ref()
                    .is_some_and(|(k, v)| k.needs_q8() || v.needs_q8());
            let inp = input(&s.xn, &mut s.q8, need);
            let mut jobs: Vec<(&Proj<'_>, &mut [f32])> = vec![(&l.q, &mut s.q[..])];
            if let Some((kp, vp)) = &l.kv {
                jobs.push((kp, &mut s.k[..]));
                jobs.push((vp, &mut s.v[..]));
            }
            project(pool, isa, &inp, &mut jobs);
        }
        // QK-norm and RoPE, head by head.
        let norm_rope = |buf: &mut [f32], n: &Option<Norm<'_>>| {
            for hbuf in buf.chunks_exact_mut(hd) {
                if let (Some(n), false) = (n, l.norm_after_rope) {
                    let t = hbuf.to_vec();
                    n.apply(&t, hbuf);
                }
                if let (true, Some((c, sn))) = (l.rope, rope) {
                    rope_head(hbuf, c, sn);
                }
                if let (Some(n), true) = (n, l.norm_after_rope) {
                    let t = hbuf.to_vec();
                    n.apply(&t, hbuf);
                }
            }
        };
        norm_rope(&mut s.q, &l.q_norm);
        if l.kv.is_some() {
            norm_rope(&mut s.k, &l.k_norm);
            cache.append_token_f32(l.layer, &s.k, &s.v, nkv, hd)?;
        }
        let raw = cache.raw_f32(l.cache_layer).ok_or_else(|| {
            TextError::InvalidArgument(format!("fused step: layer {} has no fp32 cache", l.layer))
        })?;
        if raw.kv_heads != nkv || raw.head_dim != hd {
            return Err(TextError::InvalidArgument(format!(
                "fused step: layer {} cache holds {}×{} heads, expected {nkv}×{hd}",
                l.layer, raw.kv_heads, raw.head_dim
            )));
        }
        // Attention over the cache.
        s.att.resize(nh * hd, 0.0);
        attend(pool, isa, &s.q, &raw, nh, &mut s.att);
        // Output projection and residual.
        s.o.resize(plan.hidden, 0.0);
        {
            let inp = input(&s.att, &mut s.q8, l.o.needs_q8());
            project(pool, isa, &inp, &mut [(&l.o, &mut s.o[..])]);
        }
        for (a, b) in x.iter_mut().zip(&s.o) {
            *a += b;
        }
        // Feed-forward: gate and up in one job, SiLU(gate)·up per chunk.
        l.post_norm.apply(&x, &mut s.xn);
        let f = l.gate.rows;
        s.g.resize(f, 0.0);
        s.u.resize(f, 0.0);
        s.h.resize(f, 0.0);
        {
            let inp = input(&s.xn, &mut s.q8, l.gate.needs_q8() || l.up.needs_q8());
            let step = chunk_rows(f, pool.width());
            let nchunks = f.div_ceil(step);
            let (go, uo, ho) = (
                Out(s.g.as_mut_ptr()),
                Out(s.u.as_mut_ptr()),
                Out(s.h.as_mut_ptr()),
            );
            let inp = &inp;
            let (axg, axu) = (l.gate.lora_input(isa, inp.x), l.up.lora_input(isa, inp.x));
            pool.run(nchunks, &|c| {
                let r0 = c * step;
                let n = (f - r0).min(step);
                // SAFETY: chunk c alone writes rows r0..r0 + n of g, u and h.
                let (g, u, h) = unsafe { (go.range(r0, n), uo.range(r0, n), ho.range(r0, n)) };
                l.gate.rows_into(isa, inp, &axg, r0, g);
                l.up.rows_into(isa, inp, &axu, r0, u);
                for ((hv, gv), uv) in h.iter_mut().zip(g.iter()).zip(u.iter()) {
                    *hv = gv / (1.0 + (-gv).exp()) * uv;
                }
            });
        }
        {
            let inp = input(&s.h, &mut s.q8, l.down.needs_q8());
            project(pool, isa, &inp, &mut [(&l.down, &mut s.o[..])]);
        }
        for (a, b) in x.iter_mut().zip(&s.o) {
            *a += b;
        }
    }
    plan.final_norm.apply(&x, &mut s.xn);
    let mut logits = vec![0f32; plan.vocab];
    let inp = input(&s.xn, &mut s.q8, plan.head.needs_q8());
    project(pool, isa, &inp, &mut [(&plan.head, &mut logits[..])]);
    pool.step_done(t0.elapsed().as_secs_f64());
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    /// Split attention (any number of ranges, ranges shorter than a thread's share, empty
    /// ranges) equals one softmax over all keys, on every kernel set this machine has.
    #[test]
    fn split_attention_equals_one_softmax() {
        let mut rng = Rng::new(11);
        let mut f = || ggml::uniform_pm1(&mut rng) * 3.0;
        let pool = Pool::new(2);
        for (nkv, groups, hd, n, cap) in
            [(2, 2, 16, 5, 8), (3, 3, 64, 150, 160), (1, 4, 24, 70, 70)]
        {
            let heads = nkv * groups;
            let k: Vec<f32> = (0..nkv * cap * hd).map(|_| f()).collect();
            let v: Vec<f32> = (0..nkv * cap * hd).map(|_| f()).collect();
            let q: Vec<f32> = (0..heads * hd).map(|_| f()).collect();
            let raw = RawKv {
                k: k.as_ptr(),
                v: v.as_ptr(),
                len: n,
                capacity: cap,
                kv_heads: nkv,
                head_dim: hd,
            };
            let mut want = vec![0f64; heads * hd];
            for h in 0..heads {
                let g = h / groups;
                let row = |t: usize| g * cap * hd + t * hd;
                let s: Vec<f64> = (0..n)
                    .map(|t| {
                        (0..hd)
                            .map(|d| q[h * hd + d] as f64 * k[row(t) + d] as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for t in 0..n {
                    for d in 0..hd {
                        want[h * hd + d] += (s[t] - m).exp() / z * v[row(t) + d] as f64;
                    }
                }
            }
            for isa in Isa::available() {
                for splits in [1, 2, 3, 7, n + 2] {
                    let mut out = vec![0f32; heads * hd];
                    attend_split(&pool, isa, &q, &raw, heads, splits, &mut out);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5,
                            "{} nkv {nkv} n {n} splits {splits} [{i}]: {a} vs {b}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}
