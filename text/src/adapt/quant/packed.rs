//! Bit packing of quantized codes and the matrix–vector kernels that read packed codes
//! directly.
//!
//! Layout (bits `b` ∈ {2, 4, 8}, `p = 8/b` codes per byte): each row is cut into blocks of
//! `16·p` codes stored in 16 bytes; byte `j` of a block holds code `j + 16·t` of the block in
//! bits `[b·t, b·t + b)` for `t = 0..p`. A row of `cols` codes takes `cols·b/8` bytes, and
//! `cols` must be a multiple of `16·p` (64 for 2-bit, 32 for 4-bit, 16 for 8-bit). The layout
//! lets a SIMD kernel widen 16 bytes to 16 lanes once and get 16 consecutive codes per shift.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};

/// Codes per 16-byte block.
pub fn block_codes(bits: u8) -> usize {
    16 * (8 / bits as usize)
}

/// Bytes per packed row.
pub fn packed_row_bytes(cols: usize, bits: u8) -> usize {
    cols * bits as usize / 8
}

fn check(cols: usize, bits: u8) -> Result<()> {
    if ![2, 4, 8].contains(&bits) {
        return Err(TextError::InvalidArgument(format!(
            "packed codes are 2, 4 or 8 bits, not {bits}"
        )));
    }
    if !cols.is_multiple_of(block_codes(bits)) {
        return Err(TextError::InvalidArgument(format!(
            "{bits}-bit packing needs a multiple of {} columns, got {cols}",
            block_codes(bits)
        )));
    }
    Ok(())
}

/// Pack row-major `[rows, cols]` codes (each `< 2^bits`).
pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Result<Vec<u8>> {
    check(cols, bits)?;
    if codes.len() != rows * cols {
        return Err(TextError::InvalidArgument(format!(
            "{} codes for a {rows}×{cols} matrix",
            codes.len()
        )));
    }
    let per = 8 / bits as usize;
    let blk = 16 * per;
    let mask = ((1u16 << bits) - 1) as u8;
    let mut out = vec![0u8; rows * packed_row_bytes(cols, bits)];
    for (i, chunk) in codes.chunks(blk).enumerate() {
        let dst = &mut out[i * 16..i * 16 + 16];
        for t in 0..per {
            for j in 0..16 {
                dst[j] |= (chunk[j + 16 * t] & mask) << (bits as usize * t);
            }
        }
    }
    Ok(out)
}

/// Inverse of [`pack`].
pub fn unpack(packed: &[u8], rows: usize, cols: usize, bits: u8) -> Result<Vec<u8>> {
    check(cols, bits)?;
    if packed.len() != rows * packed_row_bytes(cols, bits) {
        return Err(TextError::InvalidArgument(format!(
            "{} packed bytes for {rows}×{cols} {bits}-bit codes (expected {})",
            packed.len(),
            rows * packed_row_bytes(cols, bits)
        )));
    }
    let per = 8 / bits as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    let mut out = vec![0u8; rows * cols];
    for (i, blk) in packed.chunks(16).enumerate() {
        let dst = &mut out[i * 16 * per..(i + 1) * 16 * per];
        for t in 0..per {
            for j in 0..16 {
                dst[j + 16 * t] = (blk[j] >> (bits as usize * t)) & mask;
            }
        }
    }
    Ok(out)
}

/// Unpack through libtorch (any device): `[rows, cols·b/8]` uint8 → `[rows, cols]` int64.
pub fn unpack_tensor(packed: &Tensor, cols: i64, bits: u8) -> Result<Tensor> {
    check(cols as usize, bits)?;
    let rows = packed.size()[0];
    let per = 8 / bits as i64;
    let nblk = cols / (16 * per);
    if bits == 8 {
        return Ok(packed.f_to_kind(Kind::Int64)?);
    }
    let shifts: Vec<u8> = (0..per).map(|t| (t * bits as i64) as u8).collect();
    let shifts = Tensor::f_from_slice(&shifts)?
        .f_to_device(packed.device())?
        .f_view([1, 1, per, 1])?;
    let p = packed.f_reshape([rows, nblk, 1, 16])?;
    Ok(p.f_bitwise_right_shift(&shifts)?
        .f_bitwise_and((1i64 << bits) - 1)?
        .f_reshape([rows, cols])?
        .f_to_kind(Kind::Int64)?)
}

/// A read-only view of a contiguous CPU tensor's data.
///
/// # Safety
/// The tensor must be contiguous, on the CPU, of element type `T`, and outlive the slice.
pub unsafe fn cpu_slice<T>(t: &Tensor) -> &[T] {
    std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel())
}

/// Whether a tensor can be read through [`cpu_slice`].
pub fn is_cpu_contiguous(t: &Tensor, kind: Kind) -> bool {
    t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous()
}

/// How the codes of a packed matrix map to values.
#[derive(Clone, Copy)]
pub enum Table<'a> {
    /// `lut[(r / group_rows)·k + code]` (`k` = 2^bits ≤ 16), times `row_scale[r]` if given.
    Lut {
        lut: &'a [f32],
        k: usize,
        group_rows: usize,
        row_scale: Option<&'a [f32]>,
    },
    /// `scale[r]·(code − offset)` (8-bit).
    Scale { scale: &'a [f32], offset: f32 },
}

/// Rows handled by one rayon task.
const ROWS_PER_TASK: usize = 32;

/// The instruction sets the packed kernels are written for, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (the reference the others are tested against).
    Scalar,
    /// x86-64 AVX2 + FMA (8 lanes).
    Avx2,
    /// x86-64 AVX-512F (16 lanes).
    Avx512,
    /// aarch64 NEON (GGUF block kernels; the packed LUT kernels run the portable code).
    Neon,
}

impl Isa {
    /// Every kernel set this CPU can run, the portable one first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
        v
    }

    /// The kernels in use: the best this CPU has, or `AFM_VL_ISA` (`scalar`, `avx2`,
    /// `avx512`, `neon`) when set to one it has (benchmarks compare them in one run).
    pub fn current() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let have = Isa::available();
            let best = *have.last().unwrap_or(&Isa::Scalar);
            match std::env::var("AFM_VL_ISA").ok().as_deref() {
                Some(name) => match have.iter().find(|i| i.name() == name) {
                    Some(i) => *i,
                    None => {
                        tracing::warn!(
                            "AFM_VL_ISA={name}: this CPU has {:?}; using {}",
                            have.iter().map(|i| i.name()).collect::<Vec<_>>(),
                            best.name()
                        );
                        best
                    }
                },
                None => best,
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }
}

/// `y[r] = Σ_c W[r, c]·x[c]` for a packed `[rows, cols]` matrix (`y.len() = rows`), with the
/// kernels of [`Isa::current`].
pub fn gemv(packed: &[u8], table: Table<'_>, bits: u8, cols: usize, x: &[f32], y: &mut [f32]) {
    gemv_isa(Isa::current(), packed, table, bits, cols, x, y)
}

/// [`gemv`] with the kernels of `isa`, which must be one of [`Isa::available`] (another falls
/// back to the portable kernels).
pub fn gemv_isa(
    isa: Isa,
    packed: &[u8],
    table: Table<'_>,
    bits: u8,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let rb = packed_row_bytes(cols, bits);
    debug_assert_eq!(packed.len(), rb * y.len());
    debug_assert_eq!(x.len(), cols);
    let isa = if Isa::available().contains(&isa) {
        isa
    } else {
        Isa::Scalar
    };
    let sum_x: f32 = x.iter().sum();
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, ys)| {
            gemv_rows(
                isa,
                packed,
                table,
                bits,
                cols,
                x,
                sum_x,
                task * ROWS_PER_TASK,
                ys,
            )
        });
}

/// Rows `r0..r0 + ys.len()` of [`gemv_isa`] on the calling thread (`isa` available; `sum_x`
/// = Σx, used by the 8-bit offset).
#[allow(clippy::too_many_arguments)]
pub fn gemv_rows(
    isa: Isa,
    packed: &[u8],
    table: Table<'_>,
    bits: u8,
    cols: usize,
    x: &[f32],
    sum_x: f32,
    r0: usize,
    ys: &mut [f32],
) {
    let rb = packed_row_bytes(cols, bits);
    {
        {
            let mut lut16 = [0f32; 16];
            // Four rows at a time: four independent load streams and accumulator chains, and
            // each block of x is loaded once for the four (a single row is latency-bound).
            let mut done = 0;
            if isa != Isa::Scalar {
                let mut luts = [[0f32; 16]; 4];
                while done + 4 <= ys.len() {
                    let i = done;
                    let rows: [&[u8]; 4] =
                        std::array::from_fn(|j| &packed[(r0 + i + j) * rb..(r0 + i + j + 1) * rb]);
                    match table {
                        Table::Lut {
                            lut,
                            k,
                            group_rows,
                            row_scale,
                        } => {
                            for (j, l) in luts.iter_mut().enumerate() {
                                let g = (r0 + i + j) / group_rows;
                                l[..k].copy_from_slice(&lut[g * k..(g + 1) * k]);
                            }
                            let v = rows4_lut(isa, rows, &luts, bits, x);
                            for j in 0..4 {
                                ys[i + j] = row_scale.map_or(v[j], |s| v[j] * s[r0 + i + j]);
                            }
                        }
                        Table::Scale { scale, offset } => {
                            let v = rows4_u8(isa, rows, x);
                            for j in 0..4 {
                                ys[i + j] = scale[r0 + i + j] * (v[j] - offset * sum_x);
                            }
                        }
                    }
                    done += 4;
                }
            }
            for (i, yr) in ys.iter_mut().enumerate().skip(done) {
                let r = r0 + i;
                let row = &packed[r * rb..(r + 1) * rb];
                *yr = match table {
                    Table::Lut {
                        lut,
                        k,
                        group_rows,
                        row_scale,
                    } => {
                        let g = r / group_rows;
                        lut16[..k].copy_from_slice(&lut[g * k..(g + 1) * k]);
                        let v = row_lut(row, &lut16, bits, x, isa);
                        row_scale.map_or(v, |s| v * s[r])
                    }
                    Table::Scale { scale, offset } => {
                        scale[r] * (row_u8(row, x, isa) - offset * sum_x)
                    }
                };
            }
        }
    }
}

/// Four rows of LUT codes with a SIMD kernel set (`isa` is available and not scalar).
fn rows4_lut(isa: Isa, rows: [&[u8]; 4], luts: &[[f32; 16]; 4], bits: u8, x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the instruction set was detected at run time (Isa::available); the rows and
        // x hold whole blocks.
        Isa::Avx512 => return unsafe { avx512::rows4_lut(rows, luts, bits, x) },
        Isa::Avx2 => return unsafe { avx2::rows_lut::<4>(rows, luts, bits, x) },
        Isa::Scalar | Isa::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: NEON was detected (Isa::available); the rows and x hold whole blocks.
        return unsafe { neon::rows_lut::<4>(rows, luts, bits, x) };
    }
    let _ = isa;
    std::array::from_fn(|j| row_lut(rows[j], &luts[j], bits, x, Isa::Scalar))
}

/// Four rows of 8-bit codes with a SIMD kernel set.
fn rows4_u8(isa: Isa, rows: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: as in rows4_lut.
        Isa::Avx512 => return unsafe { avx512::rows4_u8(rows, x) },
        // One row at a time: the rows stream through memory in order (for a large matrix the
        // hardware prefetcher follows one stream better than four interleaved ones: the 8-bit
        // kernel is memory-bound there, 1.5× faster this way on a 49152×576 head).
        Isa::Avx2 => return std::array::from_fn(|j| unsafe { avx2::row_u8(rows[j], x) }),
        Isa::Scalar | Isa::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: as in rows4_lut.
        return std::array::from_fn(|j| unsafe { neon::row_u8(rows[j], x) });
    }
    let _ = isa;
    std::array::from_fn(|j| row_u8(rows[j], x, Isa::Scalar))
}

fn row_lut(row: &[u8], lut: &[f32; 16], bits: u8, x: &[f32], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the instruction set was detected at run time; `row` and `x` hold whole blocks.
        Isa::Avx512 => return unsafe { avx512::row_lut(row, lut, bits, x) },
        Isa::Avx2 => return unsafe { avx2::row_lut(row, lut, bits, x) },
        Isa::Scalar | Isa::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: NEON was detected; `row` and `x` hold whole blocks.
        return unsafe { neon::rows_lut::<1>([row], &[*lut], bits, x)[0] };
    }
    let _ = isa;
    let per = 8 / bits as usize;
    let mask = (1u8 << bits) - 1;
    let mut acc = [0f32; 16];
    for (blk, xs) in row.chunks_exact(16).zip(x.chunks_exact(16 * per)) {
        for t in 0..per {
            let sh = bits as usize * t;
            for j in 0..16 {
                acc[j] += lut[((blk[j] >> sh) & mask) as usize] * xs[16 * t + j];
            }
        }
    }
    acc.iter().sum()
}

fn row_u8(row: &[u8], x: &[f32], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the instruction set was detected at run time; `row` and `x` hold whole blocks.
        Isa::Avx512 => return unsafe { avx512::row_u8(row, x) },
        Isa::Avx2 => return unsafe { avx2::row_u8(row, x) },
        Isa::Scalar | Isa::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        // SAFETY: NEON was detected; `row` and `x` hold whole blocks.
        return unsafe { neon::row_u8(row, x) };
    }
    let _ = isa;
    let mut acc = [0f32; 16];
    for (blk, xs) in row.chunks_exact(16).zip(x.chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += blk[j] as f32 * xs[j];
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "aarch64")]
#[path = "packed_neon.rs"]
mod neon;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::runtime::cpu_kernels::avx2::prefetch;

    /// One row of LUT codes: 16 bytes widen to 16 lanes, each shift/mask gives 16 consecutive
    /// codes, `vpermps` looks all 16 up in the table held in one register.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_lut(row: &[u8], lut: &[f32; 16], bits: u8, x: &[f32]) -> f32 {
        let per = 8 / bits as usize;
        let table = _mm512_loadu_ps(lut.as_ptr());
        let mask = _mm512_set1_epi32((1i32 << bits) - 1);
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let nblk = row.len() / 16;
        let xp = x.as_ptr();
        for b in 0..nblk {
            let v =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(row.as_ptr().add(b * 16) as *const __m128i));
            let xb = xp.add(b * 16 * per);
            if bits == 4 {
                let lo = _mm512_and_si512(v, mask);
                let hi = _mm512_srli_epi32::<4>(v);
                acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, table), _mm512_loadu_ps(xb), acc0);
                acc1 = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(hi, table),
                    _mm512_loadu_ps(xb.add(16)),
                    acc1,
                );
            } else {
                // 2-bit: four 16-code slices per block.
                let c0 = _mm512_and_si512(v, mask);
                let c1 = _mm512_and_si512(_mm512_srli_epi32::<2>(v), mask);
                let c2 = _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask);
                let c3 = _mm512_srli_epi32::<6>(v);
                acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c0, table), _mm512_loadu_ps(xb), acc0);
                acc1 = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(c1, table),
                    _mm512_loadu_ps(xb.add(16)),
                    acc1,
                );
                acc0 = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(c2, table),
                    _mm512_loadu_ps(xb.add(32)),
                    acc0,
                );
                acc1 = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(c3, table),
                    _mm512_loadu_ps(xb.add(48)),
                    acc1,
                );
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// [`row_lut`] for four rows at once.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows4_lut(
        rows: [&[u8]; 4],
        luts: &[[f32; 16]; 4],
        bits: u8,
        x: &[f32],
    ) -> [f32; 4] {
        let per = 8 / bits as usize;
        let t: [__m512; 4] = std::array::from_fn(|j| _mm512_loadu_ps(luts[j].as_ptr()));
        let mask = _mm512_set1_epi32((1i32 << bits) - 1);
        let mut acc = [_mm512_setzero_ps(); 4];
        let nblk = rows[0].len() / 16;
        let xp = x.as_ptr();
        // The rows after these (callers walk contiguous rows) are fetched meanwhile.
        let next = rows[3].as_ptr().wrapping_add(rows[3].len());
        for b in 0..nblk {
            prefetch(next.wrapping_add(64 * b), 64);
            let xb = xp.add(b * 16 * per);
            if bits == 4 {
                let x0 = _mm512_loadu_ps(xb);
                let x1 = _mm512_loadu_ps(xb.add(16));
                for j in 0..4 {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        rows[j].as_ptr().add(b * 16) as *const __m128i
                    ));
                    let lo = _mm512_and_si512(v, mask);
                    let hi = _mm512_srli_epi32::<4>(v);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, t[j]), x0, acc[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, t[j]), x1, acc[j]);
                }
            } else {
                let xs: [__m512; 4] = std::array::from_fn(|q| _mm512_loadu_ps(xb.add(16 * q)));
                for j in 0..4 {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        rows[j].as_ptr().add(b * 16) as *const __m128i
                    ));
                    let c0 = _mm512_and_si512(v, mask);
                    let c1 = _mm512_and_si512(_mm512_srli_epi32::<2>(v), mask);
                    let c2 = _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask);
                    let c3 = _mm512_srli_epi32::<6>(v);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(c0, t[j]), xs[0], acc[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(c1, t[j]), xs[1], acc[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(c2, t[j]), xs[2], acc[j]);
                    acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(c3, t[j]), xs[3], acc[j]);
                }
            }
        }
        std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]))
    }

    /// [`row_u8`] for four rows at once.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows4_u8(rows: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
        let mut acc = [_mm512_setzero_ps(); 4];
        let nblk = rows[0].len() / 16;
        let next = rows[3].as_ptr().wrapping_add(rows[3].len());
        for b in 0..nblk {
            prefetch(next.wrapping_add(64 * b), 64);
            let xb = _mm512_loadu_ps(x.as_ptr().add(b * 16));
            for j in 0..4 {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    rows[j].as_ptr().add(b * 16) as *const __m128i
                ));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), xb, acc[j]);
            }
        }
        std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]))
    }

    /// Σ code·x over one row of 8-bit codes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_u8(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let nblk = row.len() / 16;
        for b in 0..nblk {
            let v =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(row.as_ptr().add(b * 16) as *const __m128i));
            acc = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(v),
                _mm512_loadu_ps(x.as_ptr().add(b * 16)),
                acc,
            );
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// The same kernels for AVX2 + FMA (8 lanes): a 16-byte block widens as two halves of 8; a
/// 16-entry table is two registers, looked up with `vpermps` in each and blended on bit 3 of
/// the code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::runtime::cpu_kernels::avx2::{hsum, prefetch};

    /// Codes `8·h .. 8·h + 8` of a 16-byte block, one per 32-bit lane.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen(block: *const u8, h: usize) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(block.add(8 * h) as *const __m128i))
    }

    /// `table[idx]` per lane for a table of up to 16 entries held in (`lo`, `hi`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lookup(idx: __m256i, lo: __m256, hi: __m256, wide: bool) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lo, idx);
        if !wide {
            return a;
        }
        let b = _mm256_permutevar8x32_ps(hi, idx);
        // Bit 3 of the code to the sign bit selects the upper half of the table.
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
    }

    /// Σ lut[code]·x over one row (see the AVX-512 `row_lut`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_lut(row: &[u8], lut: &[f32; 16], bits: u8, x: &[f32]) -> f32 {
        rows_lut::<1>([row], &[*lut], bits, x)[0]
    }

    /// [`row_lut`] for `N` rows at once (each block of x is loaded once for all of them).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_lut<const N: usize>(
        rows: [&[u8]; N],
        luts: &[[f32; 16]; N],
        bits: u8,
        x: &[f32],
    ) -> [f32; N] {
        let per = 8 / bits as usize;
        let wide = bits == 4;
        let lo: [__m256; N] = std::array::from_fn(|j| _mm256_loadu_ps(luts[j].as_ptr()));
        let hi: [__m256; N] = std::array::from_fn(|j| _mm256_loadu_ps(luts[j].as_ptr().add(8)));
        let mask = _mm256_set1_epi32((1i32 << bits) - 1);
        // One accumulator per row and half block: 2·N independent FMA chains.
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        let nblk = rows[0].len() / 16;
        let xp = x.as_ptr();
        // The rows after these (callers walk contiguous rows) are fetched meanwhile.
        let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
        for b in 0..nblk {
            prefetch(next.wrapping_add(16 * N * b), 16 * N);
            let xb = xp.add(b * 16 * per);
            for (h, acc_h) in acc.iter_mut().enumerate() {
                for j in 0..N {
                    let v = widen(rows[j].as_ptr().add(b * 16), h);
                    for t in 0..per {
                        let shift = _mm256_set1_epi32((bits as usize * t) as i32);
                        let c = _mm256_and_si256(_mm256_srlv_epi32(v, shift), mask);
                        let xv = _mm256_loadu_ps(xb.add(16 * t + 8 * h));
                        acc_h[j] = _mm256_fmadd_ps(lookup(c, lo[j], hi[j], wide), xv, acc_h[j]);
                    }
                }
            }
        }
        std::array::from_fn(|j| hsum(_mm256_add_ps(acc[0][j], acc[1][j])))
    }

    /// Σ code·x over one row of 8-bit codes: 32 codes per step, four accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_u8(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let (p, xp) = (row.as_ptr(), x.as_ptr());
        let n = row.len();
        let mut i = 0;
        while i + 32 <= n {
            prefetch(p.wrapping_add(n + i), 32);
            for (q, a) in acc.iter_mut().enumerate() {
                let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    p.add(i + 8 * q) as *const __m128i
                )));
                *a = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp.add(i + 8 * q)), *a);
            }
            i += 32;
        }
        // A last half step (rows are whole 16-code blocks).
        while i + 8 <= n {
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                p.add(i) as *const __m128i
            )));
            acc[0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    fn codes(n: usize, bits: u8, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() % (1 << bits)) as u8)
            .collect()
    }

    #[test]
    fn pack_round_trips_in_rust_and_libtorch() {
        for bits in [2u8, 4, 8] {
            let (rows, cols) = (5, 128);
            let c = codes(rows * cols, bits, bits as u64);
            let p = pack(&c, rows, cols, bits).unwrap();
            assert_eq!(p.len(), rows * cols * bits as usize / 8);
            assert_eq!(unpack(&p, rows, cols, bits).unwrap(), c);
            let t = Tensor::from_slice(&p).view([rows as i64, -1]);
            let u = unpack_tensor(&t, cols as i64, bits).unwrap();
            let u: Vec<i64> = Vec::try_from(u.flatten(0, -1)).unwrap();
            assert!(
                u.iter().zip(&c).all(|(a, &b)| *a == b as i64),
                "bits {bits}"
            );
        }
        // The documented layout: 4-bit byte j holds code j (low nibble) and code j+16 (high).
        let c: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let p = pack(&c, 1, 32, 4).unwrap();
        assert_eq!(p[1], 1 | (1 << 4));
        assert_eq!(p[3], 3 | (3 << 4));
        let c: Vec<u8> = (0..32).map(|i| if i < 16 { 2 } else { 9 }).collect();
        assert!(pack(&c, 1, 32, 4)
            .unwrap()
            .iter()
            .all(|&b| b == 2 | (9 << 4)));
        assert!(pack(&c, 1, 30, 4).is_err());
        assert!(pack(&c, 1, 32, 3).is_err());
        assert!(unpack(&[0u8; 15], 1, 32, 4).is_err());
    }

    /// Every kernel set this CPU has = the dense product (and the portable kernels) on ragged
    /// shapes: row counts that are not multiples of 4 or of a task, 2/4/8-bit, LUT and scale.
    #[test]
    fn gemv_matches_dense_on_every_instruction_set() {
        let isas = Isa::available();
        eprintln!("instruction sets tested: {:?}", isas);
        let mut rng = Rng::new(9);
        for (rows, cols) in [(1usize, 64usize), (3, 192), (5, 64), (33, 320), (70, 192)] {
            let x: Vec<f32> = (0..cols).map(|_| rng.next_f64() as f32 - 0.5).collect();
            for bits in [2u8, 4, 8] {
                let c = codes(rows * cols, bits, 11 + rows as u64);
                let p = pack(&c, rows, cols, bits).unwrap();
                let k = 1usize << bits;
                let (want, table_lut, scale): (Vec<f32>, Vec<f32>, Vec<f32>) = if bits == 8 {
                    let scale: Vec<f32> = (0..rows).map(|r| 0.01 * (r + 1) as f32).collect();
                    let w = (0..rows)
                        .map(|r| {
                            (0..cols)
                                .map(|j| scale[r] * (c[r * cols + j] as f32 - 128.0) * x[j])
                                .sum()
                        })
                        .collect();
                    (w, vec![], scale)
                } else {
                    let groups = rows.div_ceil(16);
                    let lut: Vec<f32> = (0..groups * k)
                        .map(|_| rng.next_f64() as f32 - 0.5)
                        .collect();
                    let w = (0..rows)
                        .map(|r| {
                            (0..cols)
                                .map(|j| lut[(r / 16) * k + c[r * cols + j] as usize] * x[j])
                                .sum()
                        })
                        .collect();
                    (w, lut, vec![])
                };
                let row_scale: Vec<f32> = (0..rows).map(|r| 1.0 + 0.1 * r as f32).collect();
                let tables = if bits == 8 {
                    vec![Table::Scale {
                        scale: &scale,
                        offset: 128.0,
                    }]
                } else {
                    vec![
                        Table::Lut {
                            lut: &table_lut,
                            k,
                            group_rows: 16,
                            row_scale: None,
                        },
                        Table::Lut {
                            lut: &table_lut,
                            k,
                            group_rows: 16,
                            row_scale: Some(&row_scale),
                        },
                    ]
                };
                // The size of the terms summed (the 8-bit path subtracts the offset's share at
                // the end): float rounding is relative to it, not to the (cancelled) result.
                let mag: Vec<f32> = (0..rows)
                    .map(|r| {
                        (0..cols)
                            .map(|j| {
                                let code = c[r * cols + j] as usize;
                                let w = if bits == 8 {
                                    scale[r] * (code as f32 + 128.0)
                                } else {
                                    table_lut[(r / 16) * k + code].abs() * row_scale[r]
                                };
                                w * x[j].abs()
                            })
                            .sum()
                    })
                    .collect();
                for (ti, &table) in tables.iter().enumerate() {
                    let mut reference = vec![0f32; rows];
                    gemv_isa(Isa::Scalar, &p, table, bits, cols, &x, &mut reference);
                    for (r, (a, b)) in reference.iter().zip(&want).enumerate() {
                        let b = if ti == 1 { b * row_scale[r] } else { *b };
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "scalar {bits}: {a} vs {b}"
                        );
                    }
                    for &isa in &isas {
                        let mut y = vec![0f32; rows];
                        gemv_isa(isa, &p, table, bits, cols, &x, &mut y);
                        for ((a, b), m) in y.iter().zip(&reference).zip(&mag) {
                            // The same products, summed in another order: float rounding only.
                            assert!(
                                (a - b).abs() <= 1e-6 * (1.0 + m),
                                "{isa:?} {rows}x{cols} bits {bits}: {a} vs scalar {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
