//! Weight quantization: QAT fake-quantization and round-to-nearest ([`qat`]), k-means
//! palettization ([`palette`]), packed storage with kernels that read it ([`packed`]), and the
//! quantized weight a [`crate::linear::Linear`] (or the embedding) holds ([`QuantizedWeight`]).
//!
//! # Checkpoint layout (`afm-vl-packed-v1`)
//!
//! A quantized model directory is an ordinary model directory (config.json, tokenizer files,
//! model.safetensors). For every quantized weight `NAME` (`model.layers.3.mlp.up_proj.weight`,
//! `model.embed_tokens.weight`, …) of shape `[out, in]` the safetensors file holds, instead of
//! `NAME` itself:
//!
//! | tensor         | dtype | shape                    | meaning                                   |
//! |----------------|-------|--------------------------|-------------------------------------------|
//! | `NAME.qcodes`  | U8    | `[out, in·bits/8]`       | codes packed as [`packed`] documents      |
//! | `NAME.qlut`    | F32   | `[⌈out/16⌉, 2^bits]`     | palette: one table per 16 rows            |
//! | `NAME.qscale`  | F32   | `[out]`                  | per-row scale                             |
//!
//! Uniform weights (2, 4 or 8 bits) have only `qscale`: `w = scale·(code − c)` with `c` = 1.5,
//! 8, 128 ([`qat::UniformSpec`]). Palettized weights (2 or 4 bits) have `qlut`, and `qscale`
//! too when fitted on row-normalised values: `w = scale_r·lut[r/16][code]` (without it,
//! `w = lut[r/16][code]`, the plain AFM 2024 palette). The bit width follows from the
//! packed row length (`8·bytes/in`). Unquantized tensors (norms, layers whose width is not a
//! multiple of the packing block) stay dense under their own names. config.json gains a
//! `"quantization"` object (format, method, per-tensor bits, average bits per weight) and the
//! safetensors header metadata `afm.quant.format = afm-vl-packed-v1`; loading needs neither, it
//! goes by tensor names and checks every shape, naming the file and tensor on a mismatch.
//!
//! # Inference
//!
//! A decode step (at most [`GEMV_MAX_ROWS`] input rows, CPU, no autograd) runs the packed
//! matrix–vector kernel ([`packed::gemv`]: table look-ups with AVX-512F, AVX2 + FMA or portable
//! code, chosen at run time ([`packed::Isa`]), rayon over rows); longer
//! inputs (prefill, training, GPUs) unpack the layer through libtorch into the compute dtype
//! and run one matmul.

pub mod ggml;
pub mod packed;
pub mod palette;
pub mod qat;
pub mod qat_train;
pub mod quantize;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};
use crate::weights::WeightMap;

use packed::{cpu_slice, gemv, is_cpu_contiguous, unpack_tensor, Table};
use qat::UniformSpec;

/// The format tag in config.json and the safetensors metadata.
pub const FORMAT: &str = "afm-vl-packed-v1";

/// Inputs with at most this many rows use the packed kernel; more unpack once per call.
pub const GEMV_MAX_ROWS: i64 = 8;

/// How a weight was quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Uniform levels with a per-channel scale (round-to-nearest or QAT).
    Uniform,
    /// k-means look-up tables shared by 16 rows.
    Palette,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::Palette => "palette",
        }
    }
}

/// A packed low-bit `[rows, cols]` weight.
#[derive(Debug)]
pub struct QuantizedWeight {
    /// uint8 `[rows, cols·bits/8]`.
    packed: Tensor,
    /// fp32 `[⌈rows/group_rows⌉, 2^bits]`: palettes, or uniform 2/4-bit scales expanded to a
    /// per-row table (`group_rows = 1`).
    lut: Option<Tensor>,
    /// fp32 `[rows]`: uniform scales, or a palette's optional row scales.
    scale: Option<Tensor>,
    group_rows: i64,
    bits: u8,
    method: Method,
    rows: i64,
    cols: i64,
}

impl QuantizedWeight {
    fn check_cols(cols: i64, bits: u8) -> Result<()> {
        if cols % packed::block_codes(bits) as i64 != 0 {
            return Err(TextError::InvalidArgument(format!(
                "{bits}-bit packing needs a multiple of {} input features, got {cols}",
                packed::block_codes(bits)
            )));
        }
        Ok(())
    }

    /// From uniform codes (`[rows, cols]` uint8, `q − qmin`) and per-row scales.
    pub fn from_uniform(codes: &Tensor, scale: &Tensor, bits: u8) -> Result<Self> {
        let (rows, cols) = (codes.size()[0], codes.size()[1]);
        Self::check_cols(cols, bits)?;
        let c = Vec::<u8>::try_from(codes.f_flatten(0, -1)?.f_to_kind(Kind::Uint8)?)?;
        let p = packed::pack(&c, rows as usize, cols as usize, bits)?;
        let packed = Tensor::f_from_slice(&p)?.f_view([rows, -1])?;
        Self::assemble(
            packed,
            None,
            Some(scale.f_to_kind(Kind::Float)?),
            bits,
            rows,
            cols,
        )
    }

    /// From a palettization.
    pub fn from_palette(p: &palette::Palette, bits: u8) -> Result<Self> {
        let (rows, cols) = (p.rows as i64, p.cols as i64);
        Self::check_cols(cols, bits)?;
        let packed = packed::pack(&p.codes, p.rows, p.cols, bits)?;
        let packed = Tensor::f_from_slice(&packed)?.f_view([rows, -1])?;
        let lut = Tensor::f_from_slice(&p.lut)?.f_view([p.groups() as i64, p.k as i64])?;
        let scale = p
            .scales
            .as_ref()
            .map(|s| Tensor::f_from_slice(s))
            .transpose()?;
        Self::assemble(packed, Some(lut), scale, bits, rows, cols)
    }

    fn assemble(
        packed: Tensor,
        lut: Option<Tensor>,
        scale: Option<Tensor>,
        bits: u8,
        rows: i64,
        cols: i64,
    ) -> Result<Self> {
        let (method, lut, group_rows) = match (lut, &scale) {
            (Some(l), _) => (Method::Palette, Some(l), palette::GROUP_ROWS as i64),
            (None, Some(s)) if bits < 8 => {
                // Uniform 2/4-bit: the same kernel as palettes with a table per row.
                let spec = UniformSpec::new(bits)?;
                let k = 1i64 << bits;
                let codes = Tensor::f_arange(k, (Kind::Float, s.device()))?
                    .f_sub_scalar(spec.code_offset())?;
                (
                    Method::Uniform,
                    Some(s.f_unsqueeze(1)?.f_mul(&codes.f_unsqueeze(0)?)?),
                    1,
                )
            }
            (None, Some(_)) => (Method::Uniform, None, 1),
            (None, None) => {
                return Err(TextError::InvalidArgument(
                    "a quantized weight needs a look-up table or a scale".into(),
                ))
            }
        };
        Ok(Self {
            packed: packed.f_contiguous()?,
            lut: lut.map(|l| l.f_contiguous()).transpose()?,
            scale: scale.map(|s| s.f_contiguous()).transpose()?,
            group_rows,
            bits,
            method,
            rows,
            cols,
        })
    }

    /// `name.qcodes` (+ `name.qlut` | `name.qscale`) from a weight map, if present. Shapes are
    /// checked against `[rows, cols]`; errors name the file and the tensor.
    pub fn from_map(w: &WeightMap, name: &str, rows: i64, cols: i64) -> Result<Option<Self>> {
        let codes_name = format!("{name}.qcodes");
        let Some(codes) = w.raw(&codes_name) else {
            return Ok(None);
        };
        let err = |t: &str, msg: String| TextError::checkpoint(w.file_of(t), msg);
        let cs = codes.size();
        if codes.kind() != Kind::Uint8 {
            return Err(err(
                &codes_name,
                format!(
                    "tensor '{codes_name}' has dtype {:?}, expected U8 packed codes",
                    codes.kind()
                ),
            ));
        }
        let bits = if cs.len() == 2 && cs[0] == rows && cs[1] > 0 {
            [2u8, 4, 8].into_iter().find(|&b| {
                cs[1] == cols * b as i64 / 8 && cols % packed::block_codes(b) as i64 == 0
            })
        } else {
            None
        };
        let Some(bits) = bits else {
            return Err(err(
                &codes_name,
                format!(
                    "tensor '{codes_name}' has shape {cs:?}: wrong packed length for a [{rows}, \
                     {cols}] weight (expected [{rows}, {}], [{rows}, {}] or [{rows}, {}] for 2-, 4- \
                     or 8-bit codes)",
                    cols / 4,
                    cols / 2,
                    cols
                ),
            ));
        };
        let lut_name = format!("{name}.qlut");
        let scale_name = format!("{name}.qscale");
        let device = w.device();
        let check_scale = |s: &Tensor| -> Result<Tensor> {
            if s.size() != [rows] {
                return Err(err(
                    &scale_name,
                    format!(
                        "tensor '{scale_name}' has shape {:?}, expected [{rows}] (one scale per row)",
                        s.size()
                    ),
                ));
            }
            Ok(s.f_to_kind(Kind::Float)?.f_to_device(device)?)
        };
        let (lut, scale) = match (w.raw(&lut_name), w.raw(&scale_name)) {
            (Some(lut), row_scale) => {
                let groups = (rows + palette::GROUP_ROWS as i64 - 1) / palette::GROUP_ROWS as i64;
                let want = [groups, 1i64 << bits];
                if bits == 8 || lut.size() != want {
                    return Err(err(
                        &lut_name,
                        format!(
                            "tensor '{lut_name}' has bad LUT shape {:?}: {bits}-bit codes for {rows} \
                             rows need {want:?} (a {}-entry table per {} rows){}",
                            lut.size(),
                            want[1],
                            palette::GROUP_ROWS,
                            if bits == 8 { "; palettes are 2- or 4-bit" } else { "" }
                        ),
                    ));
                }
                (
                    Some(lut.f_to_kind(Kind::Float)?.f_to_device(device)?),
                    row_scale.map(check_scale).transpose()?,
                )
            }
            (None, Some(s)) => (None, Some(check_scale(s)?)),
            (None, None) => {
                return Err(err(
                    &codes_name,
                    format!(
                        "'{codes_name}' has neither a '{lut_name}' nor a '{scale_name}' tensor"
                    ),
                ))
            }
        };
        let packed = codes.f_to_device(device)?;
        Self::assemble(packed, lut, scale, bits, rows, cols).map(Some)
    }

    /// The tensors this weight is stored as under `name` (see the module docs).
    pub fn tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(format!("{name}.qcodes"), self.packed.shallow_clone())];
        if self.method == Method::Palette {
            if let Some(l) = &self.lut {
                out.push((format!("{name}.qlut"), l.shallow_clone()));
            }
        }
        if let Some(s) = &self.scale {
            out.push((format!("{name}.qscale"), s.shallow_clone()));
        }
        Ok(out)
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }
    pub fn method(&self) -> Method {
        self.method
    }
    pub fn rows(&self) -> i64 {
        self.rows
    }
    pub fn cols(&self) -> i64 {
        self.cols
    }
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// Bytes as stored (packed codes plus tables or scales).
    pub fn stored_bytes(&self) -> usize {
        let lut = match self.method {
            Method::Palette => self.lut.as_ref().map_or(0, |t| t.numel() * 4),
            Method::Uniform => 0,
        };
        self.packed.numel() + lut + self.scale.as_ref().map_or(0, |t| t.numel() * 4)
    }

    /// Whether a palette carries per-row scales.
    pub fn has_row_scale(&self) -> bool {
        self.method == Method::Palette && self.scale.is_some()
    }

    /// Stored bits per weight, tables included.
    pub fn bits_per_weight(&self) -> f64 {
        self.stored_bytes() as f64 * 8.0 / (self.rows * self.cols) as f64
    }

    /// A view sharing storage.
    pub fn shallow_clone(&self) -> Self {
        Self {
            packed: self.packed.shallow_clone(),
            lut: self.lut.as_ref().map(|t| t.shallow_clone()),
            scale: self.scale.as_ref().map(|t| t.shallow_clone()),
            group_rows: self.group_rows,
            bits: self.bits,
            method: self.method,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// The values of rows `idx` (int64, any shape) as `[idx.., cols]` in `kind`.
    pub fn rows_of(&self, idx: &Tensor, kind: Kind) -> Result<Tensor> {
        let mut shape = idx.size();
        let flat = idx.f_flatten(0, -1)?.f_to_device(self.device())?;
        let codes = unpack_tensor(&self.packed.f_index_select(0, &flat)?, self.cols, self.bits)?;
        let vals = match &self.lut {
            Some(lut) => {
                let v = lut
                    .f_index_select(0, &flat.f_floor_divide_scalar(self.group_rows)?)?
                    .f_gather(1, &codes, false)?;
                match (&self.scale, self.method) {
                    (Some(s), Method::Palette) => {
                        v.f_mul(&s.f_index_select(0, &flat)?.f_unsqueeze(1)?)?
                    }
                    _ => v,
                }
            }
            None => {
                let spec = UniformSpec::new(self.bits)?;
                let s = self.scale.as_ref().expect("uniform weight has a scale");
                codes
                    .f_to_kind(Kind::Float)?
                    .f_sub_scalar(spec.code_offset())?
                    .f_mul(&s.f_index_select(0, &flat)?.f_unsqueeze(1)?)?
            }
        };
        shape.push(self.cols);
        Ok(vals.f_to_kind(kind)?.f_reshape(shape)?)
    }

    /// The whole `[rows, cols]` matrix in `kind`.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let idx = Tensor::f_arange(self.rows, (Kind::Int64, self.device()))?;
        self.rows_of(&idx, kind)
    }

    /// The packed codes and their table for the CPU kernels ([`packed::gemv_rows`]), when
    /// they are contiguous CPU tensors.
    pub fn kernel_view(&self) -> Option<(&[u8], Table<'_>)> {
        let ok = is_cpu_contiguous(&self.packed, Kind::Uint8)
            && self
                .lut
                .as_ref()
                .is_none_or(|l| is_cpu_contiguous(l, Kind::Float))
            && self
                .scale
                .as_ref()
                .is_none_or(|s| is_cpu_contiguous(s, Kind::Float));
        if !ok {
            return None;
        }
        // SAFETY: every tensor read here is contiguous fp32/uint8 on the CPU (checked above)
        // and owned by self, which the returned slices borrow.
        let packed = unsafe { cpu_slice::<u8>(&self.packed) };
        let table = match (&self.lut, &self.scale) {
            (Some(l), s) => Table::Lut {
                lut: unsafe { cpu_slice::<f32>(l) },
                k: 1 << self.bits,
                group_rows: self.group_rows as usize,
                row_scale: match (s, self.method) {
                    (Some(s), Method::Palette) => Some(unsafe { cpu_slice::<f32>(s) }),
                    _ => None,
                },
            },
            (None, Some(s)) => Table::Scale {
                scale: unsafe { cpu_slice::<f32>(s) },
                offset: UniformSpec::new(self.bits).ok()?.code_offset() as f32,
            },
            (None, None) => return None,
        };
        Some((packed, table))
    }

    /// `x·Wᵀ (+ b)` for `x: [..., cols]`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let shape = x.size();
        let n = x.numel() as i64 / self.cols.max(1);
        let view = if n <= GEMV_MAX_ROWS && x.device() == Device::Cpu && !x.requires_grad() {
            self.kernel_view()
        } else {
            None
        };
        let Some((packed, table)) = view else {
            let w = self.dequantize(x.kind())?;
            return Ok(x.f_linear(&w, bias)?);
        };
        let xf = x
            .f_reshape([n, self.cols])?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        // SAFETY: xf is contiguous fp32 on the CPU and lives until the end of this function.
        let xs = unsafe { cpu_slice::<f32>(&xf) };
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let mut y = vec![0f32; n as usize * rows];
        if n == 1 {
            gemv(packed, table, self.bits, cols, xs, &mut y);
        } else {
            // A small batch (several tokens or sequences): the weights are read once for all.
            let isa = packed::Isa::current();
            let sums: Vec<f32> = xs.chunks_exact(cols).map(|x| x.iter().sum()).collect();
            let bits = self.bits;
            batched_rows(n as usize, rows, &mut y, |i, r0, out| {
                let x = &xs[i * cols..(i + 1) * cols];
                packed::gemv_rows(isa, packed, table, bits, cols, x, sums[i], r0, out)
            });
        }
        gemv_output(&y, shape, self.rows, bias, x.kind())
    }
}

/// Rows per task of [`batched_rows`]: 64 rows of a 576-column Q4_1 matrix are 23 KB, of a
/// 1536-column one 61 KB, so a tile stays in L2 while every vector of the batch meets it.
pub(crate) const BATCH_TILE_ROWS: usize = 64;

/// A small batch of matrix–vector products, `y[i·rows + r] = (W·xᵢ)[r]` for `n` vectors:
/// `rows_fn(i, r0, out)` computes rows `r0..r0 + out.len()` for vector `i` (one of the
/// kernels' `gemv_rows`). Tiles of [`BATCH_TILE_ROWS`] rows run in parallel, each for every
/// vector in turn, so the weights stream from memory once for the whole batch instead of once
/// per vector; each value is the one the single-vector product gives (same kernel, same order).
pub(crate) fn batched_rows(
    n: usize,
    rows: usize,
    y: &mut [f32],
    rows_fn: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    debug_assert_eq!(y.len(), n * rows);
    let tiles = rows.div_ceil(BATCH_TILE_ROWS);
    // Each tile's rows for every vector, vector after vector, then scattered into `y`.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..tiles)
        .into_par_iter()
        .map(|t| {
            let r0 = t * BATCH_TILE_ROWS;
            let len = BATCH_TILE_ROWS.min(rows - r0);
            let mut buf = vec![0f32; n * len];
            for (i, out) in buf.chunks_exact_mut(len).enumerate() {
                rows_fn(i, r0, out);
            }
            (r0, len, buf)
        })
        .collect();
    for (r0, len, buf) in &parts {
        let (r0, len) = (*r0, *len);
        for (i, part) in buf.chunks_exact(len).enumerate() {
            y[i * rows + r0..i * rows + r0 + len].copy_from_slice(part);
        }
    }
}

/// The output of a CPU matrix–vector forward: `y` (rows after rows) in the input's `shape`
/// with its last dimension replaced by `rows`, plus `bias`, in `kind`.
pub(crate) fn gemv_output(
    y: &[f32],
    mut shape: Vec<i64>,
    rows: i64,
    bias: Option<&Tensor>,
    kind: Kind,
) -> Result<Tensor> {
    shape.pop();
    shape.push(rows);
    let mut out = Tensor::f_from_slice(y)?.f_view(shape.as_slice())?;
    if let Some(b) = bias {
        out = out.f_add(&b.f_to_kind(Kind::Float)?)?;
    }
    Ok(out.f_to_kind(kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(rows: i64, cols: i64, seed: i64) -> Tensor {
        let _g = crate::weights::seed_global_rng(seed);
        Tensor::randn([rows, cols], (Kind::Float, Device::Cpu))
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from(a.f_sub(b).unwrap().abs().max()).unwrap()
    }

    /// A small batch gives exactly the single-vector products (LUT codes with and without row
    /// scales, 8-bit codes), over several row tiles with a ragged last one.
    #[test]
    fn batched_forward_equals_one_vector_at_a_time() {
        let (rows, cols) = (2 * BATCH_TILE_ROWS as i64 + 5, 128);
        let w = rand(rows, cols, 15);
        let wv = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        let (r, c) = (rows as usize, cols as usize);
        let mut qs = vec![
            QuantizedWeight::from_palette(&palette::palettize(&wv, r, c, 4, 0), 4).unwrap(),
            QuantizedWeight::from_palette(&palette::palettize_scaled(&wv, r, c, 2, 0), 2).unwrap(),
        ];
        for bits in [2u8, 8] {
            let spec = UniformSpec::new(bits).unwrap();
            let (codes, scale) = qat::rtn(&w, &spec).unwrap();
            qs.push(QuantizedWeight::from_uniform(&codes, &scale, bits).unwrap());
        }
        for q in &qs {
            for n in [2i64, 5, GEMV_MAX_ROWS] {
                let x = rand(n, cols, 16 + n);
                let got = q.forward(&x, None).unwrap();
                assert_eq!(got.size(), [n, rows]);
                for i in 0..n {
                    let one = q.forward(&x.get(i).view([1, cols]), None).unwrap();
                    assert!(
                        got.get(i).equal(&one.get(0)),
                        "{:?} {}-bit, batch {n}, vector {i}",
                        q.method,
                        q.bits
                    );
                }
            }
        }
    }

    #[test]
    fn forward_paths_agree_with_the_dequantized_matmul() {
        let w = rand(48, 128, 5);
        let x1 = rand(1, 128, 6).view([1, 1, 128]);
        let x9 = rand(9, 128, 7).view([1, 9, 128]); // above GEMV_MAX_ROWS: unpack path
        let bias = rand(1, 48, 8).view([48]);
        let wv = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        let mut qs = vec![];
        for bits in [2u8, 4] {
            let p = palette::palettize(&wv, 48, 128, bits, 0);
            qs.push(QuantizedWeight::from_palette(&p, bits).unwrap());
            let p = palette::palettize_scaled(&wv, 48, 128, bits, 0);
            let q = QuantizedWeight::from_palette(&p, bits).unwrap();
            assert!(q.has_row_scale());
            // The matrix is the palette's.
            let d = q.dequantize(Kind::Float).unwrap();
            assert!((d.double_value(&[47, 100]) - p.value(47, 100) as f64).abs() < 1e-6);
            qs.push(q);
        }
        for bits in [2u8, 4, 8] {
            let spec = UniformSpec::new(bits).unwrap();
            let (codes, scale) = qat::rtn(&w, &spec).unwrap();
            let q = QuantizedWeight::from_uniform(&codes, &scale, bits).unwrap();
            // The dequantized matrix is the fake-quantized one.
            let fq = qat::fake_quant(&w, &qat::search_f(&w, &spec).unwrap(), &spec).unwrap();
            assert!(max_abs(&q.dequantize(Kind::Float).unwrap(), &fq) < 1e-5);
            qs.push(q);
        }
        for q in &qs {
            let dq = q.dequantize(Kind::Float).unwrap();
            for x in [&x1, &x9] {
                let want = x.linear(&dq, Some(&bias));
                let got = q.forward(x, Some(&bias)).unwrap();
                assert_eq!(got.size(), want.size());
                assert!(max_abs(&got, &want) < 1e-4, "{:?} {}", q.method, q.bits);
            }
            // Embedding-style row lookup.
            let idx = Tensor::from_slice(&[3i64, 47, 0, 16]).view([2, 2]);
            let rows = q.rows_of(&idx, Kind::Float).unwrap();
            assert_eq!(rows.size(), [2, 2, 128]);
            assert!(max_abs(&rows.get(0).get(1), &dq.get(47)) == 0.0);
            let expect_bpw = q.bits as f64
                + match q.method {
                    Method::Palette => 32.0 * (1 << q.bits) as f64 / (16.0 * 128.0),
                    Method::Uniform => 0.0,
                }
                + if q.scale.is_some() { 32.0 / 128.0 } else { 0.0 };
            assert!((q.bits_per_weight() - expect_bpw).abs() < 1e-9);
        }
    }
}
