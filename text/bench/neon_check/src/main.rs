//! Checks the NEON Q4_0 / Q4_1 / Q8_0 and Q4_K / Q5_K / Q6_K kernels against a float reference
//! (the dequantised weights times the dequantised activations, in f64, dequantised here from
//! the GGUF block layouts), on random blocks with ragged row and block counts, int8 activations
//! (plain NEON, and the dotprod kernels when the CPU has it: run under `qemu-aarch64 -cpu max`)
//! and int16 activations (Q4_0 / Q4_1 / Q8_0), 1 and 4 rows at once. Exits 1 on a mismatch.

#[cfg(target_arch = "aarch64")]
#[path = "../../../src/adapt/quant/ggml_neon.rs"]
mod neon;

#[cfg(target_arch = "aarch64")]
#[path = "../../../src/adapt/quant/packed_neon.rs"]
mod packed_neon;

#[allow(dead_code)]
const QK: usize = 32;

/// IEEE half → f32 (normal and zero values; the random scales here are normal).
#[allow(dead_code)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let (sign, exp, man) = ((h >> 15) << 31, (h >> 10) & 0x1F, h & 0x3FF);
    if exp == 0 {
        return f32::from_bits(sign)
            + (man as f32) * 2f32.powi(-24) * if sign != 0 { -1.0 } else { 1.0 };
    }
    f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
}

/// The 6-bit scale and min of sub-block `j` in a K-quant's packed `scales[12]` (GGUF's
/// `get_scale_min_k4`).
#[allow(dead_code)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One block of `ty` (0 Q4_0, 1 Q4_1, 2 Q8_0) with random codes and fp16 scales in 0.008–0.1.
fn block(ty: u8, rng: &mut Rng) -> Vec<u8> {
    let n = [18, 20, 34][ty as usize];
    let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    for k in 0..if ty == 1 { 2 } else { 1 } {
        let h = 0x2000 + (rng.next() % 0x0E00) as u16;
        b[2 * k..2 * k + 2].copy_from_slice(&h.to_le_bytes());
    }
    b
}

/// The block's 32 weights as floats.
fn dequant(ty: u8, b: &[u8]) -> Vec<f64> {
    let d = f16_at(b, 0) as f64;
    match ty {
        2 => b[2..34].iter().map(|&q| d * (q as i8) as f64).collect(),
        _ => {
            let (off, m) = if ty == 0 {
                (2, 0.0)
            } else {
                (4, f16_at(b, 2) as f64)
            };
            let q = &b[off..off + 16];
            let code = |j: usize| if j < 16 { q[j] & 0xF } else { q[j - 16] >> 4 } as f64;
            (0..32)
                .map(|j| {
                    if ty == 0 {
                        d * (code(j) - 8.0)
                    } else {
                        d * code(j) + m
                    }
                })
                .collect()
        }
    }
}

/// Bytes of one Q4_K (3), Q5_K (4) or Q6_K (5) super-block of 256 values.
fn k_bytes(ty: u8) -> usize {
    [144, 176, 210][ty as usize - 3]
}

/// One K-quant super-block with random codes and scales and fp16 `d` (and `dmin`) in
/// 0.0005–0.006.
fn k_block(ty: u8, rng: &mut Rng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..k_bytes(ty)).map(|_| rng.next() as u8).collect();
    let half = |rng: &mut Rng| (0x1000 + (rng.next() % 0x0A00) as u16).to_le_bytes();
    if ty == 5 {
        let h = half(rng);
        b[208..210].copy_from_slice(&h);
    } else {
        let (h0, h1) = (half(rng), half(rng));
        b[0..2].copy_from_slice(&h0);
        b[2..4].copy_from_slice(&h1);
    }
    b
}

/// A K-quant super-block's 256 weights, from the layouts of ggml's `dequantize_row_q{4,5,6}_K`.
fn k_dequant(ty: u8, w: &[u8]) -> Vec<f64> {
    let mut out = vec![0f64; 256];
    if ty == 5 {
        let d = f16_at(w, 208) as f64;
        let (ql, qh, sc) = (&w[0..128], &w[128..192], &w[192..208]);
        for h in 0..2 {
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[64 * h + l] & 0xF) | ((qh[32 * h + l] & 3) << 4)) as i32 - 32;
                let q2 =
                    ((ql[64 * h + l + 32] & 0xF) | (((qh[32 * h + l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[64 * h + l] >> 4) | (((qh[32 * h + l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 =
                    ((ql[64 * h + l + 32] >> 4) | (((qh[32 * h + l] >> 6) & 3) << 4)) as i32 - 32;
                let s = |k: usize| sc[8 * h + is + 2 * k] as i8 as f64;
                out[128 * h + l] = d * s(0) * q1 as f64;
                out[128 * h + l + 32] = d * s(1) * q2 as f64;
                out[128 * h + l + 64] = d * s(2) * q3 as f64;
                out[128 * h + l + 96] = d * s(3) * q4 as f64;
            }
        }
        return out;
    }
    let (d, dmin) = (f16_at(w, 0) as f64, f16_at(w, 2) as f64);
    let five = ty == 4;
    let (qh, ql) = if five {
        (&w[16..48], &w[48..176])
    } else {
        (&w[0..0], &w[16..144])
    };
    for i in 0..4 {
        for (j, shift) in [(2 * i, 0), (2 * i + 1, 4)] {
            let (sc, m) = scale_min_k4(j, &w[4..16]);
            for l in 0..32 {
                let mut q = ((ql[32 * i + l] >> shift) & 0xF) as f64;
                if five && qh[l] & (1 << j) != 0 {
                    q += 16.0;
                }
                out[32 * j + l] = d * sc as f64 * q - dmin * m as f64;
            }
        }
    }
    out
}

/// The NEON K-quant kernel of `ty` on each row.
#[cfg(target_arch = "aarch64")]
fn run_k(ty: u8, rows: &[&[u8]], xq: &[i8], xd: &[f32], dot: bool) -> Vec<f32> {
    let sum32: Vec<i32> = xq
        .chunks(32)
        .map(|c| c.iter().map(|&v| v as i32).sum())
        .collect();
    let sum16: Vec<i32> = xq
        .chunks(16)
        .map(|c| c.iter().map(|&v| v as i32).sum())
        .collect();
    rows.iter()
        .map(|row| {
            // SAFETY: NEON is part of aarch64; dotprod checked by the caller.
            unsafe {
                match (ty, dot) {
                    (3, false) => neon::q45_k::<false>(row, xq, xd, &sum32),
                    (4, false) => neon::q45_k::<true>(row, xq, xd, &sum32),
                    (_, false) => neon::q6_k(row, xq, xd, &sum16),
                    (3, true) => neon::q45_k_dot::<false>(row, xq, xd, &sum32),
                    (4, true) => neon::q45_k_dot::<true>(row, xq, xd, &sum32),
                    (_, true) => neon::q6_k_dot(row, xq, xd, &sum16),
                }
            }
        })
        .collect()
}

/// Which kernel a case runs.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Int8,
    Dot,
    Int16,
}

#[cfg(target_arch = "aarch64")]
fn run(
    ty: u8,
    rows: &[&[u8]],
    xq8: &[i8],
    xq16: &[i16],
    xd: &[f32],
    xs: &[f32],
    kernel: Kernel,
) -> Vec<f32> {
    use neon::*;
    let mut out = Vec::new();
    let mut r = 0;
    macro_rules! go {
        ($n:literal, $t:expr) => {{
            let rs: [&[u8]; $n] = core::array::from_fn(|j| rows[r + j]);
            // SAFETY: NEON is part of aarch64 (dotprod checked by the caller for Kernel::Dot);
            // rows hold xd.len() blocks.
            let v: [f32; $n] = unsafe {
                match (kernel, $t) {
                    (Kernel::Int8, 0) => rows32::<T_Q4_0, $n>(rs, xq8, xd, xs),
                    (Kernel::Int8, 1) => rows32::<T_Q4_1, $n>(rs, xq8, xd, xs),
                    (Kernel::Int8, _) => rows32::<T_Q8_0, $n>(rs, xq8, xd, xs),
                    (Kernel::Dot, 0) => rows32_dot::<T_Q4_0, $n>(rs, xq8, xd, xs),
                    (Kernel::Dot, 1) => rows32_dot::<T_Q4_1, $n>(rs, xq8, xd, xs),
                    (Kernel::Dot, _) => rows32_dot::<T_Q8_0, $n>(rs, xq8, xd, xs),
                    (Kernel::Int16, 0) => rows32_i16::<T_Q4_0, $n>(rs, xq16, xd, xs),
                    (Kernel::Int16, 1) => rows32_i16::<T_Q4_1, $n>(rs, xq16, xd, xs),
                    (Kernel::Int16, _) => rows32_i16::<T_Q8_0, $n>(rs, xq16, xd, xs),
                }
            };
            out.extend(v);
            r += $n;
        }};
    }
    while r + 4 <= rows.len() {
        go!(4, ty);
    }
    while r < rows.len() {
        go!(1, ty);
    }
    out
}

#[cfg(target_arch = "aarch64")]
fn main() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut checked, mut worst) = (0usize, 0f64);
    let dot = std::arch::is_aarch64_feature_detected!("dotprod");
    let mut kernels = vec![Kernel::Int8, Kernel::Int16];
    if dot {
        kernels.push(Kernel::Dot);
    }
    for ty in 0..3u8 {
        for nb in [1usize, 2, 3, 7, 18] {
            for nrows in [1usize, 3, 4, 5, 9] {
                for &kernel in &kernels {
                    let wide = kernel == Kernel::Int16;
                    let rows: Vec<Vec<u8>> = (0..nrows)
                        .map(|_| (0..nb).flat_map(|_| block(ty, &mut rng)).collect())
                        .collect();
                    let lim = if wide { 32767 } else { 127 };
                    let xq: Vec<i32> = (0..nb * QK)
                        .map(|_| (rng.next() % (2 * lim as u64 + 1)) as i32 - lim)
                        .collect();
                    let xd: Vec<f32> = (0..nb)
                        .map(|_| 1e-3 * (1 + rng.next() % 50) as f32)
                        .collect();
                    let xs: Vec<f32> = (0..nb)
                        .map(|b| xd[b] * xq[b * QK..(b + 1) * QK].iter().sum::<i32>() as f32)
                        .collect();
                    let xq8: Vec<i8> = xq.iter().map(|&v| v.clamp(-127, 127) as i8).collect();
                    let xq16: Vec<i16> = xq.iter().map(|&v| v as i16).collect();
                    let refs: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
                    let got = run(ty, &refs, &xq8, &xq16, &xd, &xs, kernel);
                    for (r, g) in got.iter().enumerate() {
                        let (mut want, mut scale) = (0f64, 0f64);
                        for b in 0..nb {
                            let w = dequant(ty, &rows[r][b * [18, 20, 34][ty as usize]..]);
                            for j in 0..QK {
                                let x = xd[b] as f64 * xq[b * QK + j] as f64;
                                want += w[j] * x;
                                scale += (w[j] * x).abs();
                            }
                        }
                        let err = (*g as f64 - want).abs() / scale.max(1e-30);
                        worst = worst.max(err);
                        checked += 1;
                        if err > 1e-5 {
                            eprintln!(
                                "MISMATCH ty {ty} blocks {nb} rows {nrows} {kernel:?} row {r}: {g} vs {want} (rel. {err:.2e})"
                            );
                            std::process::exit(1);
                        }
                    }
                }
            }
        }
    }
    for ty in 3..6u8 {
        for nb in [1usize, 2, 3, 5] {
            for nrows in [1usize, 3, 4] {
                for with_dot in [false, true] {
                    if with_dot && !dot {
                        continue;
                    }
                    let rows: Vec<Vec<u8>> = (0..nrows)
                        .map(|_| (0..nb).flat_map(|_| k_block(ty, &mut rng)).collect())
                        .collect();
                    let xq: Vec<i8> = (0..nb * 256)
                        .map(|_| ((rng.next() % 255) as i32 - 127) as i8)
                        .collect();
                    let xd: Vec<f32> = (0..nb * 8)
                        .map(|_| 1e-3 * (1 + rng.next() % 50) as f32)
                        .collect();
                    let refs: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
                    let got = run_k(ty, &refs, &xq, &xd, with_dot);
                    for (r, g) in got.iter().enumerate() {
                        let (mut want, mut scale) = (0f64, 0f64);
                        for b in 0..nb {
                            let w = k_dequant(ty, &rows[r][b * k_bytes(ty)..]);
                            for (j, wj) in w.iter().enumerate() {
                                let n = 256 * b + j;
                                let x = xd[n / QK] as f64 * xq[n] as f64;
                                want += wj * x;
                                scale += (wj * x).abs();
                            }
                        }
                        let err = (*g as f64 - want).abs() / scale.max(1e-30);
                        worst = worst.max(err);
                        checked += 1;
                        if err > 1e-5 {
                            eprintln!(
                                "MISMATCH K-quant ty {ty} blocks {nb} rows {nrows} dot {with_dot} row {r}: {g} vs {want} (rel. {err:.2e})"
                            );
                            std::process::exit(1);
                        }
                    }
                }
            }
        }
    }
    let (packed_checked, packed_worst) = check_packed(&mut rng);
    println!(
        "NEON packed LUT (2-, 4-bit) and 8-bit code kernels: {packed_checked} rows = float reference, worst {packed_worst:.2e} of Σ|w·x|"
    );
    println!(
        "NEON Q4_0/Q4_1/Q8_0 and Q4_K/Q5_K/Q6_K kernels ({}): {checked} rows = float reference, worst {worst:.2e} of Σ|w·x|",
        if dot {
            "int8, int8 with dotprod's sdot, int16 activations"
        } else {
            "int8 and int16 activations; this CPU has no dotprod"
        }
    );
}

/// Our packed codes (`packed.rs`'s layout: in each 16-byte block, byte `j` holds code
/// `j + 16·t` in bits `bits·t..`): the NEON LUT kernel (1 and 4 rows at once) and the 8-bit
/// kernel against `Σ lut[code]·x` / `Σ code·x` in f64. Returns (rows checked, worst error).
#[cfg(target_arch = "aarch64")]
fn check_packed(rng: &mut Rng) -> (usize, f64) {
    let (mut checked, mut worst) = (0usize, 0f64);
    for bits in [2u8, 4, 8] {
        let per = 8 / bits as usize;
        for nblk in [1usize, 2, 5, 12] {
            let cols = 16 * per * nblk;
            for nrows in [1usize, 4, 6] {
                let codes: Vec<Vec<u8>> = (0..nrows)
                    .map(|_| {
                        (0..cols)
                            .map(|_| (rng.next() % (1 << bits)) as u8)
                            .collect()
                    })
                    .collect();
                let packed: Vec<Vec<u8>> = codes
                    .iter()
                    .map(|c| {
                        let mut p = vec![0u8; cols * bits as usize / 8];
                        for (i, &code) in c.iter().enumerate() {
                            let (blk, r) = (i / (16 * per), i % (16 * per));
                            p[16 * blk + r % 16] |= code << (bits as usize * (r / 16));
                        }
                        p
                    })
                    .collect();
                let x: Vec<f32> = (0..cols)
                    .map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let luts: Vec<[f32; 16]> = (0..nrows)
                    .map(|_| {
                        let mut l = [0f32; 16];
                        for v in l.iter_mut().take(1 << bits.min(4)) {
                            *v = (rng.next() % 4001) as f32 / 1000.0 - 2.0;
                        }
                        l
                    })
                    .collect();
                // SAFETY: NEON is part of aarch64; rows and x hold whole blocks.
                let got: Vec<f32> = unsafe {
                    if bits == 8 {
                        packed.iter().map(|p| packed_neon::row_u8(p, &x)).collect()
                    } else if nrows % 4 == 0 {
                        (0..nrows / 4)
                            .flat_map(|g| {
                                let rows: [&[u8]; 4] =
                                    core::array::from_fn(|j| packed[4 * g + j].as_slice());
                                let l: [[f32; 16]; 4] = core::array::from_fn(|j| luts[4 * g + j]);
                                packed_neon::rows_lut::<4>(rows, &l, bits, &x)
                            })
                            .collect()
                    } else {
                        (0..nrows)
                            .map(|r| {
                                packed_neon::rows_lut::<1>([&packed[r]], &[luts[r]], bits, &x)[0]
                            })
                            .collect()
                    }
                };
                for (r, g) in got.iter().enumerate() {
                    let (mut want, mut scale) = (0f64, 0f64);
                    for (c, xv) in codes[r].iter().zip(&x) {
                        let w = if bits == 8 {
                            *c as f64
                        } else {
                            luts[r][*c as usize] as f64
                        };
                        want += w * *xv as f64;
                        scale += (w * *xv as f64).abs();
                    }
                    let err = (*g as f64 - want).abs() / scale.max(1e-30);
                    worst = worst.max(err);
                    checked += 1;
                    if err > 1e-5 {
                        eprintln!(
                            "MISMATCH packed {bits}-bit blocks {nblk} rows {nrows} row {r}: {g} vs {want} (rel. {err:.2e})"
                        );
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    (checked, worst)
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("neon-check: build it for aarch64 (make check-neon)");
    std::process::exit(1);
}
