//! `afm-vl bench kernels`: the packed-weight matrix–vector kernels (a decode step's work) on
//! every instruction set this CPU has, against the portable kernels and libtorch's dense fp32
//! matrix–vector product, in one run with interleaved rounds.

use std::time::Instant;

use afm_text::gguf::GgmlType;
use afm_text::quant::ggml;
use afm_text::quant::packed::{gemv_isa, pack, Isa, Table};
use afm_text::sampling::Rng;
use tch::{Kind, Tensor};

use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Matrix shapes ROWSxCOLS, comma-separated (default: SmolLM2-135M's attention, FFN up and
    /// FFN down projections).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "576x576,1536x576,576x1536"
    )]
    pub shapes: Vec<String>,
    /// Interleaved rounds; the median per kernel is reported.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// Calls per timed round.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let (r, c) = s
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("--shapes: {s:?} is not ROWSxCOLS"))?;
    let (r, c): (usize, usize) = (
        r.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--shapes: bad row count in {s:?}"))?,
        c.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--shapes: bad column count in {s:?}"))?,
    );
    if !(1..=65_536).contains(&r) || !(64..=65_536).contains(&c) || c % 64 != 0 {
        anyhow::bail!(
            "--shapes: {s:?} needs 1..=65536 rows and a multiple of 64 columns (64..=65536)"
        );
    }
    Ok((r, c))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median µs per call over `a.rounds` rounds of `a.calls` calls (after one untimed call) of
/// `kernel` on each instruction set, and of `dense` (libtorch's fp32 product), interleaved
/// round by round.
fn time_kernels(
    a: &Args,
    isas: &[Isa],
    mut kernel: impl FnMut(Isa),
    mut dense: impl FnMut(),
) -> (Vec<f64>, f64) {
    let time = |f: &mut dyn FnMut()| {
        f();
        let t0 = Instant::now();
        for _ in 0..a.calls {
            f();
        }
        t0.elapsed().as_secs_f64() * 1e6 / a.calls as f64
    };
    // kernel index → per-round µs/call; the last entry is libtorch dense fp32.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); isas.len() + 1];
    for _ in 0..a.rounds {
        for (i, &isa) in isas.iter().enumerate() {
            times[i].push(time(&mut || kernel(isa)));
        }
        let _g = tch::no_grad_guard();
        times[isas.len()].push(time(&mut dense));
    }
    let mut med: Vec<f64> = times.into_iter().map(median).collect();
    let dense = med.pop().unwrap_or(f64::NAN);
    (med, dense)
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    if a.rounds == 0 || a.calls == 0 {
        anyhow::bail!("--rounds and --calls must be at least 1");
    }
    let shapes: Vec<(usize, usize)> = a
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<anyhow::Result<_>>()?;
    let isas = Isa::available();
    let _ = ctx;
    println!(
        "packed matrix-vector kernels, {} rayon threads, instruction sets: {} (in use: {})",
        rayon::current_num_threads(),
        isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "),
        Isa::current().name()
    );
    println!();
    println!(
        "| shape | weights | kernel | µs / call | weight GB/s | vs portable | vs dense fp32 |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: |");
    let mut rng = Rng::new(1);
    for &(rows, cols) in &shapes {
        let x: Vec<f32> = (0..cols).map(|_| rng.next_f64() as f32 - 0.5).collect();
        // libtorch's dense fp32 product on the same shape, for scale.
        let w = Tensor::randn([rows as i64, cols as i64], (Kind::Float, tch::Device::Cpu));
        let xt = Tensor::from_slice(&x).view([1, cols as i64]);
        for (bits, label) in [
            (2u8, "2-bit LUT"),
            (4, "4-bit LUT + row scale"),
            (8, "8-bit scale"),
        ] {
            let k = 1usize << bits;
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| (rng.next_u64() % k as u64) as u8)
                .collect();
            let packed = pack(&codes, rows, cols, bits)?;
            let lut: Vec<f32> = (0..rows.div_ceil(16) * k)
                .map(|_| rng.next_f64() as f32)
                .collect();
            let scale: Vec<f32> = (0..rows).map(|_| 0.01 + rng.next_f64() as f32).collect();
            let table = if bits == 8 {
                Table::Scale {
                    scale: &scale,
                    offset: 128.0,
                }
            } else {
                Table::Lut {
                    lut: &lut,
                    k,
                    group_rows: 16,
                    row_scale: (bits == 4).then_some(scale.as_slice()),
                }
            };
            let mut y = vec![0f32; rows];
            let (med, dense) = time_kernels(
                &a,
                &isas,
                |isa| gemv_isa(isa, &packed, table, bits, cols, &x, &mut y),
                || {
                    let _ = xt.matmul(&w.tr());
                },
            );
            let bytes = packed.len() as f64;
            for (i, isa) in isas.iter().enumerate() {
                println!(
                    "| {rows}×{cols} | {label} | {} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
                    isa.name(),
                    med[i],
                    bytes / (med[i] * 1e3),
                    med[0] / med[i],
                    dense / med[i]
                );
            }
            println!(
                "| {rows}×{cols} | fp32 dense | libtorch | {dense:.1} | {:.1} | | 1.00× |",
                (rows * cols * 4) as f64 / (dense * 1e3)
            );
        }
        bench_ggml(&a, &isas, rows, cols, &x, &w, &xt);
    }
    bench_batch(&a)?;
    Ok(())
}

/// Small batches through the GGUF-block linear layer (what a batched decode step or a
/// speculative verification of a few tokens runs): `n` vectors in one forward (tile by tile,
/// the weights read once) vs `n` one-vector forwards, on SmolLM2's FFN matrix (in cache) and
/// its 49152-row head (from memory).
fn bench_batch(a: &Args) -> anyhow::Result<()> {
    use afm_text::quant::ggml::GgmlWeight;
    println!();
    println!("Small batches, GGUF blocks (the layer's forward, default activations, all threads):");
    println!();
    println!("| shape | weights | vectors | one forward µs | one-vector forwards µs | batched vs one by one |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let _g = tch::no_grad_guard();
    for (rows, cols, ty) in [
        (1536usize, 576usize, GgmlType::Q4_1),
        (49152, 576, GgmlType::Q8_0),
    ] {
        let data = ggml::random_blocks(ty, rows, cols, 7);
        let w = GgmlWeight::from_bytes(ty, &data, rows as i64, cols as i64)?;
        for n in [2i64, 4, 8] {
            let x = Tensor::randn([n, cols as i64], (tch::Kind::Float, tch::Device::Cpu));
            let singles: Vec<Tensor> = (0..n).map(|i| x.get(i).view([1, -1])).collect();
            let calls = (a.calls / 10).max(3);
            let (mut batched, mut single) = (Vec::new(), Vec::new());
            for _ in 0..a.rounds {
                let _ = w.forward(&x, None)?;
                let t0 = Instant::now();
                for _ in 0..calls {
                    let _ = w.forward(&x, None)?;
                }
                batched.push(t0.elapsed().as_secs_f64() * 1e6 / calls as f64);
                let t0 = Instant::now();
                for _ in 0..calls {
                    for s in &singles {
                        let _ = w.forward(s, None)?;
                    }
                }
                single.push(t0.elapsed().as_secs_f64() * 1e6 / calls as f64);
            }
            let (b, s) = (median(batched), median(single));
            println!(
                "| {rows}×{cols} | GGUF {} | {n} | {b:.1} | {s:.1} | {:.2}× |",
                ty.name(),
                s / b
            );
        }
    }
    Ok(())
}

/// GGUF's blocks read natively, per instruction set and activation precision (quantised
/// inside each call, as a decode step does once per input: Q4_0 / Q4_1 / Q8_0 in int8, int16
/// and fp32, the K-quants in int8).
fn bench_ggml(
    a: &Args,
    isas: &[Isa],
    rows: usize,
    cols: usize,
    x: &[f32],
    w: &Tensor,
    xt: &Tensor,
) {
    for ty in ggml::BLOCK_TYPES {
        if !cols.is_multiple_of(ty.block().0) {
            continue;
        }
        let modes: &[ggml::Acts] = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                &[ggml::Acts::Int8, ggml::Acts::Int16, ggml::Acts::F32]
            }
            _ => &[ggml::Acts::Int8],
        };
        for &mode in modes {
            bench_ggml_mode(a, isas, (rows, cols), ty, mode, x, (w, xt));
        }
    }
}

/// One block type in one activation precision (a table row per instruction set).
fn bench_ggml_mode(
    a: &Args,
    isas: &[Isa],
    (rows, cols): (usize, usize),
    ty: GgmlType,
    mode: ggml::Acts,
    x: &[f32],
    (w, xt): (&Tensor, &Tensor),
) {
    let data = ggml::random_blocks(ty, rows, cols, rows as u64 * 31 + cols as u64);
    let mut acts = ggml::Q8Acts::default();
    let mut y = vec![0f32; rows];
    let (med, dense) = time_kernels(
        a,
        isas,
        |isa| {
            acts.prepare(x, mode);
            ggml::gemv(isa, ty, &data, cols, &acts, &mut y);
        },
        || {
            let _ = xt.matmul(&w.tr());
        },
    );
    for (i, isa) in isas.iter().enumerate() {
        println!(
            "| {rows}×{cols} | GGUF {} ({} acts) | {} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
            ty.name(),
            mode.name(),
            isa.name(),
            med[i],
            data.len() as f64 / (med[i] * 1e3),
            med[0] / med[i],
            dense / med[i]
        );
    }
}
