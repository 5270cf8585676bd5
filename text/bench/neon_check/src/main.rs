//! Checks the NEON Q4_0 / Q4_1 / Q8_0 kernels against a float reference (the dequantised
//! weights times the dequantised activations, in f64), on random blocks with ragged row and
//! block counts, int8 activations (plain NEON, and the dotprod kernel when the CPU has it: run
//! under `qemu-aarch64 -cpu max`) and int16 activations, 1 and 4 rows at once. Exits 1 on a
//! mismatch.

#[cfg(target_arch = "aarch64")]
#[path = "../../../src/adapt/quant/ggml_neon.rs"]
mod neon;

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
    println!(
        "NEON Q4_0/Q4_1/Q8_0 kernels ({}): {checked} rows = float reference, worst {worst:.2e} of Σ|w·x|",
        if dot {
            "int8, int8 with dotprod's sdot, int16 activations"
        } else {
            "int8 and int16 activations; this CPU has no dotprod"
        }
    );
}

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("neon-check: build it for aarch64 (make check-neon)");
    std::process::exit(1);
}
