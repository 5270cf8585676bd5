//! The KV cache: one type, with a variant per layer kind.
//!
//! - `Normal`: preallocated `[batch, kv_heads, capacity, head_dim]` buffers that grow by chunks.
//! - `Shared`: the layer owns nothing and reads another layer's buffer (AFM 2025 segment 1).
//! - `Rotating`: a ring buffer bounded by a sliding window (PT-MoE local-attention layers):
//!   memory stays flat however long the sequence grows.
//!
//! The cache also carries what every layer needs to build masks and positions: the key padding
//! mask (left padding in batches) and each row's next position. It can snapshot and roll back
//! (speculative decoding), fork (copy-on-extend: reuse a few-shot prefix for many questions)
//! and broadcast a batch-1 prefix to a batch.
//!
//! KV quantization: a `Normal` buffer may store K and V as int8 with one scale per
//! (batch, head, token) — `x ≈ scale·q`, `scale = max|x|/127` over the head dimension — which
//! halves the bytes of a bf16 cache (plus one scale per head and token). Reads dequantize
//! to the compute dtype. [`set_default_kv_bits`] makes every new cache quantized (the CLI's
//! `--kv-bits 8`); [`KvCache::with_kinds_bits`] chooses per cache.

use std::sync::atomic::{AtomicU8, Ordering};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};

/// Growth step of the preallocated buffers, in tokens.
pub const DEFAULT_CHUNK: i64 = 256;

static DEFAULT_KV_BITS: AtomicU8 = AtomicU8::new(16);

/// Bits of the K/V that caches created from now on store: 16 (the compute dtype) or 8.
pub fn set_default_kv_bits(bits: u8) -> Result<()> {
    if bits != 8 && bits != 16 {
        return Err(TextError::InvalidArgument(format!(
            "KV-cache bits must be 8 or 16, not {bits}"
        )));
    }
    DEFAULT_KV_BITS.store(bits, Ordering::Relaxed);
    Ok(())
}

/// See [`set_default_kv_bits`].
pub fn default_kv_bits() -> u8 {
    DEFAULT_KV_BITS.load(Ordering::Relaxed)
}

/// `x` ([..., head_dim]) as int8 codes and per-row scales (`[..., 1]`, in `x`'s dtype).
pub fn quantize_kv(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let scale = x
        .f_abs()?
        .f_amax(&[-1i64][..], true)?
        .f_to_kind(Kind::Float)?
        .f_clamp_min(1e-8)?
        .f_div_scalar(127.0)?;
    let q = x
        .f_to_kind(Kind::Float)?
        .f_div(&scale)?
        .f_round()?
        .f_clamp(-127.0, 127.0)?
        .f_to_kind(Kind::Int8)?;
    Ok((q, scale.f_to_kind(x.kind())?))
}

/// Codes and scales back to `kind`.
pub fn dequantize_kv(q: &Tensor, scale: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(q.f_to_kind(kind)?.f_mul(scale)?)
}

/// Where a batch-1 fp32 buffer's keys and values lie: head `h`'s token `t` starts at
/// `(h·capacity + t)·head_dim`. Valid until the buffer grows or is dropped.
#[derive(Debug, Clone, Copy)]
pub struct RawKv {
    pub k: *const f32,
    pub v: *const f32,
    pub len: usize,
    pub capacity: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's own K/V storage.
#[derive(Debug)]
pub struct KvBuffer {
    k: Option<Tensor>, // [batch, kv_heads, capacity, head_dim] (int8 when quantized)
    v: Option<Tensor>,
    /// Scales `[batch, kv_heads, capacity, 1]` of an 8-bit buffer.
    ks: Option<Tensor>,
    vs: Option<Tensor>,
    /// The dtype K/V come in and are read back in.
    kind: Kind,
    bits: u8,
    len: i64,
    chunk: i64,
}

impl KvBuffer {
    pub fn new(chunk: i64) -> Self {
        Self::with_bits(chunk, 16)
    }

    /// `bits` 8 stores int8 codes with a scale per head and token; 16 stores as given.
    pub fn with_bits(chunk: i64, bits: u8) -> Self {
        Self {
            k: None,
            v: None,
            ks: None,
            vs: None,
            kind: Kind::Float,
            bits,
            len: 0,
            chunk: chunk.max(1),
        }
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[2])
    }

    /// Bytes allocated (capacity, not length).
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v, &self.ks, &self.vs]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    fn grow(&mut self, needed: i64, like: &Tensor) -> Result<()> {
        let cap = self.capacity();
        if needed <= cap {
            return Ok(());
        }
        let new_cap = (needed + self.chunk - 1) / self.chunk * self.chunk;
        let s = like.size(); // [batch, heads, n, dim]
        self.kind = like.kind();
        let code_kind = if self.bits == 8 {
            Kind::Int8
        } else {
            like.kind()
        };
        let opts = (code_kind, like.device());
        let grow = |old: &Option<Tensor>, dim: i64, opts: (Kind, Device)| -> Result<Tensor> {
            let n = Tensor::f_zeros([s[0], s[1], new_cap, dim], opts)?;
            if let Some(o) = old {
                if self.len > 0 {
                    n.f_narrow(2, 0, self.len)?
                        .f_copy_(&o.f_narrow(2, 0, self.len)?)?;
                }
            }
            Ok(n)
        };
        let nk = grow(&self.k, s[3], opts)?;
        let nv = grow(&self.v, s[3], opts)?;
        if self.bits == 8 {
            let sopts = (like.kind(), like.device());
            self.ks = Some(grow(&self.ks, 1, sopts)?);
            self.vs = Some(grow(&self.vs, 1, sopts)?);
        }
        self.k = Some(nk);
        self.v = Some(nv);
        Ok(())
    }

    /// Append `k`, `v` ([batch, kv_heads, n, head_dim]) and return views of everything cached.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.size()[2];
        self.grow(self.len + n, k)?;
        let (bk, bv) = match (&self.k, &self.v) {
            (Some(bk), Some(bv)) => (bk, bv),
            _ => return Err(TextError::InvalidArgument("KV buffer not allocated".into())),
        };
        if bk.size()[0] != k.size()[0] {
            return Err(TextError::InvalidArgument(format!(
                "KV cache holds batch {} but the input has batch {}",
                bk.size()[0],
                k.size()[0]
            )));
        }
        if self.bits == 8 {
            let (qk, sk) = quantize_kv(k)?;
            let (qv, sv) = quantize_kv(v)?;
            bk.f_narrow(2, self.len, n)?.f_copy_(&qk)?;
            bv.f_narrow(2, self.len, n)?.f_copy_(&qv)?;
            if let (Some(ks), Some(vs)) = (&self.ks, &self.vs) {
                ks.f_narrow(2, self.len, n)?.f_copy_(&sk)?;
                vs.f_narrow(2, self.len, n)?.f_copy_(&sv)?;
            }
        } else {
            bk.f_narrow(2, self.len, n)?.f_copy_(k)?;
            bv.f_narrow(2, self.len, n)?.f_copy_(v)?;
        }
        self.len += n;
        self.view()
    }

    /// A batch-1, unquantised fp32 CPU buffer: append one token's keys and values
    /// (`[kv_heads·head_dim]` each, head after head) straight into the storage (the fused CPU
    /// decode step).
    pub fn append_token_f32(
        &mut self,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let d = head_dim;
        if self.bits != 16 || k.len() != kv_heads * d || v.len() != kv_heads * d {
            return Err(TextError::InvalidArgument(
                "append_token_f32 needs an unquantised buffer and [kv_heads·head_dim] inputs"
                    .into(),
            ));
        }
        if self.len + 1 > self.capacity() {
            let like = Tensor::f_empty(
                [1, kv_heads as i64, 1, d as i64],
                (Kind::Float, Device::Cpu),
            )?;
            self.grow(self.len + 1, &like)?;
        }
        let Some(raw) = self.raw_f32() else {
            return Err(TextError::InvalidArgument(
                "append_token_f32 needs a batch-1 fp32 CPU buffer".into(),
            ));
        };
        if raw.kv_heads != kv_heads || raw.head_dim != d {
            return Err(TextError::InvalidArgument(format!(
                "KV buffer holds {}×{} heads, the layer gives {kv_heads}×{d}",
                raw.kv_heads, raw.head_dim
            )));
        }
        let at = self.len as usize;
        for h in 0..kv_heads {
            let off = (h * raw.capacity + at) * d;
            // SAFETY: the buffers are contiguous fp32 [1, kv_heads, capacity, d] CPU tensors
            // owned by self, and at < capacity (grown above).
            unsafe {
                std::ptr::copy_nonoverlapping(k.as_ptr().add(h * d), raw.k.add(off) as *mut f32, d);
                std::ptr::copy_nonoverlapping(v.as_ptr().add(h * d), raw.v.add(off) as *mut f32, d);
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Pointers into a batch-1, unquantised fp32 CPU buffer (`None` for any other).
    pub fn raw_f32(&self) -> Option<RawKv> {
        let (k, v) = (self.k.as_ref()?, self.v.as_ref()?);
        let s = k.size();
        let ok =
            |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous();
        if self.bits != 16 || s[0] != 1 || !ok(k) || !ok(v) || v.size() != s {
            return None;
        }
        Some(RawKv {
            k: k.data_ptr() as *const f32,
            v: v.data_ptr() as *const f32,
            len: self.len as usize,
            capacity: s[2] as usize,
            kv_heads: s[1] as usize,
            head_dim: s[3] as usize,
        })
    }

    /// Views `[batch, kv_heads, len, head_dim]` of the cached keys and values.
    pub fn view(&self) -> Result<(Tensor, Tensor)> {
        if let (Some(k), Some(v), Some(ks), Some(vs)) = (&self.k, &self.v, &self.ks, &self.vs) {
            let n = self.len;
            return Ok((
                dequantize_kv(&k.f_narrow(2, 0, n)?, &ks.f_narrow(2, 0, n)?, self.kind)?,
                dequantize_kv(&v.f_narrow(2, 0, n)?, &vs.f_narrow(2, 0, n)?, self.kind)?,
            ));
        }
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k.f_narrow(2, 0, self.len)?, v.f_narrow(2, 0, self.len)?)),
            _ => Err(TextError::InvalidArgument(
                "KV cache is empty: a shared layer ran before its source layer".into(),
            )),
        }
    }

    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    fn map_raw(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            k: self.k.as_ref().map(&f).transpose()?,
            v: self.v.as_ref().map(&f).transpose()?,
            ks: self.ks.as_ref().map(&f).transpose()?,
            vs: self.vs.as_ref().map(&f).transpose()?,
            kind: self.kind,
            bits: self.bits,
            len: self.len,
            chunk: self.chunk,
        })
    }

    /// A deep copy holding only the cached length (plus one chunk of headroom).
    pub fn fork(&self) -> Result<Self> {
        if self.bits == 8 {
            // Copy the codes and scales as they are (re-quantizing would drift).
            return self.map_raw(|t| {
                let mut c = t.f_zeros_like()?;
                c.f_copy_(t)?;
                Ok(c)
            });
        }
        let mut out = Self::with_bits(self.chunk, self.bits);
        if self.len > 0 {
            let (k, v) = self.view()?;
            let _ = out.append(&k, &v)?;
        }
        Ok(out)
    }

    /// Repeat a batch-1 buffer `n` times along the batch.
    pub fn repeat_batch(&self, n: i64) -> Result<Self> {
        if self.bits == 8 {
            return self.map_raw(|t| Ok(t.f_repeat([n, 1, 1, 1])?));
        }
        let mut out = Self::with_bits(self.chunk, self.bits);
        if self.len > 0 {
            let (k, v) = self.view()?;
            let _ = out.append(&k.f_repeat([n, 1, 1, 1])?, &v.f_repeat([n, 1, 1, 1])?)?;
        }
        Ok(out)
    }
}

/// Absolute cache indices of the keys [`RingBuffer::append`] returns when `n` tokens are
/// appended after `past` cached ones, in the order it returns them. A ring of `capacity` slots
/// holds, in slot `s`, the latest position `p ≡ s (mod capacity)`. One new token (`n = 1`) is
/// written first and the ring is returned as it lies; a chunk (`n > 1`) is returned as the
/// ring's past keys followed by the chunk, then its last `capacity` tokens are written.
pub fn ring_key_positions(past: i64, n: i64, capacity: i64) -> Vec<i64> {
    let cap = capacity.max(1);
    if n == 1 {
        (0..(past + 1).min(cap))
            .map(|s| past - (past - s).rem_euclid(cap))
            .collect()
    } else {
        let last = past - 1;
        (0..past.min(cap))
            .map(|s| last - (last - s).rem_euclid(cap))
            .chain(past..past + n)
            .collect()
    }
}

/// One sliding-window layer's K/V: a ring of `window + slack` slots. `slack` extra slots let
/// [`KvCache::rollback`] undo up to `slack` tokens once the ring has wrapped (speculative
/// decoding); a deeper rollback is rejected with an error.
#[derive(Debug)]
pub struct RingBuffer {
    k: Option<Tensor>, // [batch, kv_heads, capacity, head_dim]
    v: Option<Tensor>,
    window: i64,
    capacity: i64,
    /// Tokens ever appended (absolute length).
    len: i64,
}

impl RingBuffer {
    pub fn new(window: i64, slack: i64) -> Self {
        let window = window.max(1);
        Self {
            k: None,
            v: None,
            window,
            capacity: window + slack.max(0),
            len: 0,
        }
    }

    pub fn window(&self) -> i64 {
        self.window
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated: at most `capacity` tokens, whatever the sequence length.
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    fn buffers(&mut self, like: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.k.is_none() {
            let s = like.size();
            let opts = (like.kind(), like.device());
            self.k = Some(Tensor::f_zeros([s[0], s[1], self.capacity, s[3]], opts)?);
            self.v = Some(Tensor::f_zeros([s[0], s[1], self.capacity, s[3]], opts)?);
        }
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => {
                if k.size()[0] != like.size()[0] {
                    return Err(TextError::InvalidArgument(format!(
                        "KV cache holds batch {} but the input has batch {}",
                        k.size()[0],
                        like.size()[0]
                    )));
                }
                Ok((k.shallow_clone(), v.shallow_clone()))
            }
            _ => Err(TextError::InvalidArgument("KV ring not allocated".into())),
        }
    }

    /// Append `k`, `v` ([batch, kv_heads, n, head_dim]); returns the keys and values the new
    /// queries attend to, laid out as [`ring_key_positions`] says (the caller masks them).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.size()[2];
        let past = self.len;
        let cap = self.capacity;
        let (mut bk, mut bv) = self.buffers(k)?;
        if n == 1 {
            let slot = past % cap;
            bk.f_narrow(2, slot, 1)?.f_copy_(k)?;
            bv.f_narrow(2, slot, 1)?.f_copy_(v)?;
            self.len += 1;
            let filled = self.len.min(cap);
            return Ok((bk.f_narrow(2, 0, filled)?, bv.f_narrow(2, 0, filled)?));
        }
        let kept = past.min(cap);
        let k_all = Tensor::f_cat(&[&bk.f_narrow(2, 0, kept)?, k], 2)?;
        let v_all = Tensor::f_cat(&[&bv.f_narrow(2, 0, kept)?, v], 2)?;
        let m = n.min(cap);
        if m > 0 {
            let slots: Vec<i64> = (past + n - m..past + n).map(|p| p % cap).collect();
            let idx = Tensor::f_from_slice(&slots)?.f_to_device(k.device())?;
            let _ = bk.f_index_copy_(2, &idx, &k.f_narrow(2, n - m, m)?)?;
            let _ = bv.f_index_copy_(2, &idx, &v.f_narrow(2, n - m, m)?)?;
        }
        self.len += n;
        Ok((k_all, v_all))
    }

    /// The ring as it lies (`min(len, capacity)` slots).
    pub fn view(&self) -> Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => {
                let filled = self.len.min(self.capacity);
                Ok((k.f_narrow(2, 0, filled)?, v.f_narrow(2, 0, filled)?))
            }
            _ => Err(TextError::InvalidArgument("KV ring is empty".into())),
        }
    }

    /// Whether rolling back to `len` tokens loses nothing the window still needs: the tokens
    /// appended since overwrote slots whose keys are older than `len − window`.
    pub fn can_truncate(&self, len: i64) -> bool {
        if len >= self.len {
            return true;
        }
        let newest_overwritten = self.len - 1 - self.capacity;
        newest_overwritten < 0 || newest_overwritten < len - self.window
    }

    fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            k: self.k.as_ref().map(&f).transpose()?,
            v: self.v.as_ref().map(&f).transpose()?,
            window: self.window,
            capacity: self.capacity,
            len: self.len,
        })
    }

    /// A deep copy.
    pub fn fork(&self) -> Result<Self> {
        self.map(|t| {
            let mut c = t.f_zeros_like()?;
            c.f_copy_(t)?;
            Ok(c)
        })
    }

    /// Repeat a batch-1 ring `n` times along the batch.
    pub fn repeat_batch(&self, n: i64) -> Result<Self> {
        self.map(|t| Ok(t.f_repeat([n, 1, 1, 1])?))
    }
}

/// How a layer caches, for [`KvCache::with_kinds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Its own growing K/V.
    Normal,
    /// Reads layer `source`'s K/V.
    Shared(usize),
    /// A ring of `window + slack` tokens (sliding-window attention).
    Rotating { window: i64, slack: i64 },
}

/// What one layer keeps.
#[derive(Debug)]
pub enum LayerCache {
    /// The layer's own keys and values.
    Normal(KvBuffer),
    /// Reads the cache of layer `source` (which must be `Normal`).
    Shared { source: usize },
    /// A ring buffer bounded by the sliding window.
    Rotating(RingBuffer),
}

/// A position in the cache to roll back to.
#[derive(Debug, Clone)]
pub struct CacheSnapshot {
    len: i64,
    next_pos: Vec<i64>,
}

/// The whole model's cache.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// `[batch, len]`, true where the key is a real token; `None` when nothing is padded.
    key_mask: Option<Tensor>,
    /// Next position id per batch row (number of real tokens seen).
    next_pos: Vec<i64>,
    len: i64,
    batch: i64,
    device: Device,
    /// Generation's first-token pass (the prompt's prefill) is running
    /// (`TextConfig::kv_fake_quant_skip_first`).
    first_token_pass: bool,
    /// During a first-token pass: the keys and values a layer attended to (its quantised cache
    /// with this pass's own tokens unquantised), for the layers that reuse that layer's cache.
    pass_views: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// `kinds[i]` is `None` for a layer with its own K/V, `Some(src)` for one reading `src`.
    pub fn new(kinds: &[Option<usize>], batch: i64, device: Device) -> Self {
        let kinds: Vec<CacheKind> = kinds
            .iter()
            .map(|k| match k {
                None => CacheKind::Normal,
                Some(src) => CacheKind::Shared(*src),
            })
            .collect();
        Self::with_kinds(&kinds, batch, device)
    }

    /// One layer per entry of `kinds` (normal, shared or rotating); `Normal` layers store
    /// K/V in [`default_kv_bits`].
    pub fn with_kinds(kinds: &[CacheKind], batch: i64, device: Device) -> Self {
        Self::with_kinds_bits(kinds, batch, device, default_kv_bits())
    }

    /// Like [`KvCache::with_kinds`] with `Normal` layers storing `bits` (8 or 16) per value.
    pub fn with_kinds_bits(kinds: &[CacheKind], batch: i64, device: Device, bits: u8) -> Self {
        let layers = kinds
            .iter()
            .map(|k| match k {
                CacheKind::Normal => LayerCache::Normal(KvBuffer::with_bits(DEFAULT_CHUNK, bits)),
                CacheKind::Shared(src) => LayerCache::Shared { source: *src },
                CacheKind::Rotating { window, slack } => {
                    LayerCache::Rotating(RingBuffer::new(*window, *slack))
                }
            })
            .collect();
        let n = kinds.len();
        Self {
            layers,
            key_mask: None,
            next_pos: vec![0; batch as usize],
            len: 0,
            batch,
            device,
            first_token_pass: false,
            pass_views: (0..n).map(|_| None).collect(),
        }
    }

    /// Mark (or end) generation's first-token pass: see
    /// [`crate::config::TextConfig::kv_fake_quant_skip_first`]. Ending it drops the pass's views.
    pub fn set_first_token_pass(&mut self, on: bool) {
        self.first_token_pass = on;
        if !on {
            self.pass_views.iter_mut().for_each(|v| *v = None);
        }
    }

    pub fn first_token_pass(&self) -> bool {
        self.first_token_pass
    }

    /// Whether some layer reuses `layer`'s keys and values.
    pub fn is_shared_source(&self, layer: usize) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, LayerCache::Shared { source } if *source == layer))
    }

    /// During a first-token pass, what `layer` attended to, so that the layers reusing its
    /// cache read the same (tamm's reuse layers get the source's attention inputs).
    pub fn set_pass_view(&mut self, layer: usize, k: Tensor, v: Tensor) {
        if let Some(slot) = self.pass_views.get_mut(layer) {
            *slot = Some((k, v));
        }
    }

    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// Slots of the sliding-window rings (the first ring's: one cache's rings share a window
    /// and slack); `None` without rotating layers.
    pub fn ring_capacity(&self) -> Option<i64> {
        self.layers.iter().find_map(|l| match l {
            LayerCache::Rotating(r) => Some(r.capacity()),
            _ => None,
        })
    }
    /// Tokens cached (including left padding).
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn next_positions(&self) -> &[i64] {
        &self.next_pos
    }
    pub fn key_mask(&self) -> Option<&Tensor> {
        self.key_mask.as_ref()
    }

    /// Bytes held by all K/V buffers (allocated capacity).
    pub fn allocated_bytes(&self) -> usize {
        (0..self.layers.len()).map(|l| self.layer_bytes(l)).sum()
    }

    /// Bytes held by one layer's K/V (0 for a shared layer or an unknown index).
    pub fn layer_bytes(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(LayerCache::Normal(b)) => b.allocated_bytes(),
            Some(LayerCache::Rotating(r)) => r.allocated_bytes(),
            _ => 0,
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Record `n` new tokens for every row; `mask` ([batch, n], 1 = real) marks padding.
    /// Returns the position ids `[batch, n]` of the new tokens.
    pub fn begin_step(&mut self, n: i64, mask: Option<&Tensor>) -> Result<Tensor> {
        let b = self.batch;
        let positions = match mask {
            None => {
                let mut rows = Vec::with_capacity((b * n) as usize);
                for p in &mut self.next_pos {
                    rows.extend(*p..*p + n);
                    *p += n;
                }
                if let Some(km) = &self.key_mask {
                    let ones = Tensor::f_ones([b, n], (Kind::Bool, self.device))?;
                    self.key_mask = Some(Tensor::f_cat(&[km, &ones], 1)?);
                }
                Tensor::from_slice(&rows)
                    .f_view([b, n])?
                    .f_to_device(self.device)?
            }
            Some(m) => {
                if m.size() != [b, n] {
                    return Err(TextError::InvalidArgument(format!(
                        "attention mask has shape {:?}, expected [{b}, {n}]",
                        m.size()
                    )));
                }
                let m = m.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
                let flat: Vec<i64> = Vec::<i64>::try_from(m.f_flatten(0, -1)?)?;
                let mut rows = Vec::with_capacity((b * n) as usize);
                for (r, p) in self.next_pos.iter_mut().enumerate() {
                    for j in 0..n {
                        let real = flat[(r as i64 * n + j) as usize] != 0;
                        // Pads take the position of the next real token (they are masked anyway).
                        rows.push(*p);
                        if real {
                            *p += 1;
                        }
                    }
                }
                let new_mask = m.f_ne(0)?.f_to_device(self.device)?;
                let prev = match &self.key_mask {
                    Some(km) => km.shallow_clone(),
                    None => Tensor::f_ones([b, self.len], (Kind::Bool, self.device))?,
                };
                self.key_mask = Some(Tensor::f_cat(&[&prev, &new_mask], 1)?);
                Tensor::from_slice(&rows)
                    .f_view([b, n])?
                    .f_to_device(self.device)?
            }
        };
        self.len += n;
        Ok(positions)
    }

    /// Append this step's K/V for `layer` and return all cached K/V.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.layers.get_mut(layer) {
            Some(LayerCache::Normal(buf)) => buf.append(k, v),
            Some(LayerCache::Rotating(ring)) => ring.append(k, v),
            Some(LayerCache::Shared { source }) => Err(TextError::InvalidArgument(format!(
                "layer {layer} shares layer {source}'s cache and cannot append to it"
            ))),
            None => Err(TextError::InvalidArgument(format!(
                "no cache for layer {layer}"
            ))),
        }
    }

    /// The K/V a layer attends to: its own, or its source's for a shared layer (during a
    /// first-token pass, what the source attended to, when it left that view).
    pub fn read(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        match self.layers.get(layer) {
            Some(LayerCache::Normal(buf)) => buf.view(),
            Some(LayerCache::Rotating(ring)) => ring.view(),
            Some(LayerCache::Shared { source }) => {
                if self.first_token_pass {
                    if let Some(Some((k, v))) = self.pass_views.get(*source) {
                        return Ok((k.shallow_clone(), v.shallow_clone()));
                    }
                }
                match self.layers.get(*source) {
                    Some(LayerCache::Normal(buf)) => buf.view(),
                    _ => Err(TextError::InvalidArgument(format!(
                        "layer {layer} reads layer {source}, which has no cache of its own"
                    ))),
                }
            }
            None => Err(TextError::InvalidArgument(format!(
                "no cache for layer {layer}"
            ))),
        }
    }

    /// [`KvBuffer::append_token_f32`] for `layer` (a layer with its own, normal buffer).
    pub fn append_token_f32(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        match self.layers.get_mut(layer) {
            Some(LayerCache::Normal(buf)) => buf.append_token_f32(k, v, kv_heads, head_dim),
            _ => Err(TextError::InvalidArgument(format!(
                "layer {layer} has no normal KV buffer of its own"
            ))),
        }
    }

    /// [`KvBuffer::raw_f32`] of the buffer `layer` reads (its own or its source's); `None`
    /// for rings, quantised or non-fp32 buffers, and during a first-token pass.
    pub fn raw_f32(&self, layer: usize) -> Option<RawKv> {
        if self.first_token_pass {
            return None;
        }
        match self.layers.get(layer)? {
            LayerCache::Normal(buf) => buf.raw_f32(),
            LayerCache::Shared { source } => match self.layers.get(*source)? {
                LayerCache::Normal(buf) => buf.raw_f32(),
                _ => None,
            },
            LayerCache::Rotating(_) => None,
        }
    }

    /// Whether `layer` has a normal buffer of its own that [`KvCache::append_token_f32`] can
    /// extend (allocated or not yet), 16-bit.
    pub fn can_append_token_f32(&self, layer: usize) -> bool {
        !self.first_token_pass
            && self.batch == 1
            && self.device == Device::Cpu
            && matches!(self.layers.get(layer), Some(LayerCache::Normal(b)) if b.bits == 16
                && (b.k.is_none() || b.raw_f32().is_some()))
    }

    /// Keep only the first `len` tokens (unpadded caches: every row advanced together).
    /// Speculative decoding uses it to drop rejected draft tokens.
    pub fn truncate(&mut self, len: i64) -> Result<()> {
        if self.key_mask.is_some() {
            return Err(TextError::InvalidArgument(
                "truncate needs an unpadded cache; use snapshot/rollback".into(),
            ));
        }
        if len < 0 || len > self.len {
            return Err(TextError::InvalidArgument(format!(
                "cannot truncate a cache of {} tokens to {len}",
                self.len
            )));
        }
        let drop = self.len - len;
        self.rollback(&CacheSnapshot {
            len,
            next_pos: self.next_pos.iter().map(|p| p - drop).collect(),
        })
    }

    pub fn snapshot(&self) -> CacheSnapshot {
        CacheSnapshot {
            len: self.len,
            next_pos: self.next_pos.clone(),
        }
    }

    /// Forget everything appended after `snap`.
    pub fn rollback(&mut self, snap: &CacheSnapshot) -> Result<()> {
        if snap.len > self.len || snap.next_pos.len() != self.next_pos.len() {
            return Err(TextError::InvalidArgument(
                "snapshot does not belong to this cache state".into(),
            ));
        }
        // A ring that has overwritten keys the window still needs cannot go back.
        for (i, l) in self.layers.iter().enumerate() {
            if let LayerCache::Rotating(r) = l {
                if !r.can_truncate(snap.len) {
                    return Err(TextError::InvalidArgument(format!(
                        "cannot roll back {} tokens: layer {i}'s sliding-window ring ({} slots, \
                         window {}) has overwritten keys it would need",
                        self.len - snap.len,
                        r.capacity(),
                        r.window()
                    )));
                }
            }
        }
        for l in &mut self.layers {
            match l {
                LayerCache::Normal(b) => b.truncate(snap.len),
                LayerCache::Rotating(r) => r.truncate(snap.len),
                LayerCache::Shared { .. } => {}
            }
        }
        if let Some(km) = &self.key_mask {
            self.key_mask = Some(km.f_narrow(1, 0, snap.len)?);
        }
        self.len = snap.len;
        self.next_pos = snap.next_pos.clone();
        Ok(())
    }

    fn map_buffers(
        &self,
        f: impl Fn(&KvBuffer) -> Result<KvBuffer>,
        g: impl Fn(&RingBuffer) -> Result<RingBuffer>,
    ) -> Result<Vec<LayerCache>> {
        self.layers
            .iter()
            .map(|l| {
                Ok(match l {
                    LayerCache::Normal(b) => LayerCache::Normal(f(b)?),
                    LayerCache::Rotating(r) => LayerCache::Rotating(g(r)?),
                    LayerCache::Shared { source } => LayerCache::Shared { source: *source },
                })
            })
            .collect()
    }

    /// An independent copy: extending it leaves `self` untouched (copy-on-extend).
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            layers: self.map_buffers(KvBuffer::fork, RingBuffer::fork)?,
            key_mask: self.key_mask.as_ref().map(|m| m.copy()),
            next_pos: self.next_pos.clone(),
            len: self.len,
            batch: self.batch,
            device: self.device,
            first_token_pass: false,
            pass_views: (0..self.layers.len()).map(|_| None).collect(),
        })
    }

    /// Broadcast a batch-1 cache to `n` rows (a shared prefix for a batch of questions).
    pub fn repeat_batch(&self, n: i64) -> Result<Self> {
        if self.batch != 1 {
            return Err(TextError::InvalidArgument(format!(
                "repeat_batch needs a batch-1 cache, this one has batch {}",
                self.batch
            )));
        }
        Ok(Self {
            layers: self.map_buffers(|b| b.repeat_batch(n), |r| r.repeat_batch(n))?,
            key_mask: match &self.key_mask {
                Some(m) => Some(m.f_repeat([n, 1])?),
                None => None,
            },
            next_pos: vec![self.next_pos[0]; n as usize],
            len: self.len,
            batch: n,
            device: self.device,
            first_token_pass: false,
            pass_views: (0..self.layers.len()).map(|_| None).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(b: i64, n: i64, fill: f64) -> Tensor {
        Tensor::full([b, 2, n, 4], fill, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn grows_by_chunks_and_rolls_back() {
        let mut c = KvCache::new(&[None, Some(0)], 1, Device::Cpu);
        let _ = c.begin_step(3, None).unwrap();
        let (k, _) = c.append(0, &kv(1, 3, 1.0), &kv(1, 3, 1.0)).unwrap();
        assert_eq!(k.size(), [1, 2, 3, 4]);
        let snap = c.snapshot();
        for i in 0..300 {
            let _ = c.begin_step(1, None).unwrap();
            let _ = c.append(0, &kv(1, 1, i as f64), &kv(1, 1, 0.0)).unwrap();
        }
        assert_eq!(c.read(1).unwrap().0.size(), [1, 2, 303, 4]);
        match &c.layers[0] {
            LayerCache::Normal(b) => assert_eq!(b.capacity(), 512),
            _ => unreachable!(),
        }
        c.rollback(&snap).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.next_positions(), &[3]);
        assert_eq!(c.read(1).unwrap().0.size(), [1, 2, 3, 4]);
        assert!(c.append(1, &kv(1, 1, 0.0), &kv(1, 1, 0.0)).is_err());
    }

    #[test]
    fn int8_kv_halves_bytes_and_stays_close() {
        let _g = crate::weights::seed_global_rng(3);
        let k = Tensor::randn([1, 2, 5, 64], (Kind::BFloat16, Device::Cpu));
        let v = Tensor::randn([1, 2, 5, 64], (Kind::BFloat16, Device::Cpu));
        let kinds = [CacheKind::Normal, CacheKind::Shared(0)];
        let mut full = KvCache::with_kinds_bits(&kinds, 1, Device::Cpu, 16);
        let mut q8 = KvCache::with_kinds_bits(&kinds, 1, Device::Cpu, 8);
        for c in [&mut full, &mut q8] {
            let _ = c.begin_step(5, None).unwrap();
            let _ = c.append(0, &k, &v).unwrap();
        }
        let (fk, fv) = full.read(1).unwrap();
        let (qk, qv) = q8.read(1).unwrap();
        assert_eq!(qk.kind(), Kind::BFloat16);
        assert_eq!(qk.size(), fk.size());
        // Per (head, token) absmax scaling: error at most half a step, scale = max|x|/127.
        for (a, b) in [(&qk, &fk), (&qv, &fv)] {
            let a = a.to_kind(Kind::Float);
            let b = b.to_kind(Kind::Float);
            let step = b.abs().amax([-1], true) / 127.0;
            let ratio = ((a - &b).abs() / step).max();
            // bf16 rounding of the scale and of the product (2^-8 relative, i.e. up to half a
            // step each near max|x|) comes on top of the half step of int8 rounding.
            assert!(f64::try_from(ratio).unwrap() <= 1.5 + 1e-3);
        }
        // In fp32 the error is at most half a step.
        let kf = k.to_kind(Kind::Float);
        let (q, sc) = quantize_kv(&kf).unwrap();
        assert_eq!(q.kind(), Kind::Int8);
        let back = dequantize_kv(&q, &sc, Kind::Float).unwrap();
        let ratio = ((back - &kf).abs() / (kf.abs().amax([-1], true) / 127.0)).max();
        assert!(f64::try_from(ratio).unwrap() <= 0.5 + 1e-4);
        // int8 codes + a bf16 scale per head and token: (64 + 2) / (2·64) of the bf16 bytes.
        assert_eq!(full.allocated_bytes(), 2 * 2 * 256 * 64 * 2);
        assert_eq!(q8.allocated_bytes(), 2 * 2 * 256 * (64 + 2));
        // Fork and rollback keep the codes.
        let f = q8.fork().unwrap();
        let d = (f.read(0).unwrap().0 - &qk).abs().max();
        assert_eq!(f64::try_from(d).unwrap(), 0.0);
        assert!(set_default_kv_bits(4).is_err());
    }

    #[test]
    fn left_padding_positions_and_fork() {
        let mut c = KvCache::new(&[None], 2, Device::Cpu);
        let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 1]).view([2, 3]);
        let pos = c.begin_step(3, Some(&mask)).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(pos.flatten(0, -1)).unwrap(),
            vec![0, 0, 1, 0, 1, 2]
        );
        assert_eq!(c.next_positions(), &[2, 3]);
        let _ = c.append(0, &kv(2, 3, 1.0), &kv(2, 3, 1.0)).unwrap();
        let mut f = c.fork().unwrap();
        let _ = f.begin_step(1, None).unwrap();
        let _ = f.append(0, &kv(2, 1, 5.0), &kv(2, 1, 5.0)).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(c.len(), 3);
        assert_eq!(f.key_mask().unwrap().size(), [2, 4]);
        assert_eq!(c.key_mask().unwrap().size(), [2, 3]);
    }
}
