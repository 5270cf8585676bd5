//! Matrix–vector time of one decode step per layer shape of SmolLM2-135M: dense fp32, dense
//! bf16 (libtorch) and the packed kernels (8-bit uniform, 4-bit and 2-bit palettes).
//!
//! `cargo run --release -p afm-text --example quant_matvec`

use std::time::Instant;

use afm_text::quant::{palette, qat, QuantizedWeight};
use tch::{Device, Kind, Tensor};

fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    t0.elapsed().as_secs_f64() / iters as f64 * 1e6
}

fn main() {
    let _g = tch::no_grad_guard();
    println!(
        "| shape (out×in) | fp32 µs | bf16 µs | 8-bit µs | 4-bit palette µs | 2-bit palette µs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (rows, cols, iters) in [
        (576, 576, 400),
        (1536, 576, 200),
        (576, 1536, 200),
        (49152, 576, 10),
    ] {
        let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 0.02;
        let x = Tensor::randn([1, 1, cols], (Kind::Float, Device::Cpu));
        let wb = w.to_kind(Kind::BFloat16);
        let xb = x.to_kind(Kind::BFloat16);
        let v = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        let (codes, s) = qat::rtn(&w, &qat::UniformSpec::new(8).unwrap()).unwrap();
        let q8 = QuantizedWeight::from_uniform(&codes, &s, 8).unwrap();
        let p4 = QuantizedWeight::from_palette(
            &palette::palettize_scaled(&v, rows as usize, cols as usize, 4, 0),
            4,
        )
        .unwrap();
        let p2 = QuantizedWeight::from_palette(
            &palette::palettize_scaled(&v, rows as usize, cols as usize, 2, 0),
            2,
        )
        .unwrap();
        let t32 = time(iters, || {
            let _ = x.linear::<Tensor>(&w, None);
        });
        let t16 = time(iters, || {
            let _ = xb.linear::<Tensor>(&wb, None);
        });
        let t8 = time(iters, || {
            let _ = q8.forward(&x, None).unwrap();
        });
        let t4 = time(iters, || {
            let _ = p4.forward(&xb, None).unwrap();
        });
        let t2 = time(iters, || {
            let _ = p2.forward(&xb, None).unwrap();
        });
        println!("| {rows}×{cols} | {t32:.1} | {t16:.1} | {t8:.1} | {t4:.1} | {t2:.1} |");
    }
}
