use afm_text::gguf::GgmlType;
use afm_text::quant::ggml;
use afm_text::quant::packed::Isa;
use std::time::Instant;
fn main() {
    let rows: usize = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let cols = 576usize;
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let data = ggml::random_blocks(ty, rows, cols, 5);
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = ggml::Q8Acts::from_slice(&x);
        let mut y = vec![0f32; rows];
        for isa in [Isa::Scalar, Isa::Avx2] {
            let t0 = Instant::now();
            for _ in 0..20 {
                ggml::gemv_rows(isa, ty, &data, cols, &a, 0, &mut y);
            }
            let dt = t0.elapsed().as_secs_f64() / 20.0;
            println!(
                "{} {:?} {:.1} us, {:.2} GB/s, ns/block {:.2}",
                ty.name(),
                isa,
                dt * 1e6,
                data.len() as f64 / dt / 1e9,
                dt * 1e9 / (rows * cols / 32) as f64
            );
        }
        for _ in 0..3 {
            let t0 = Instant::now();
            for _ in 0..5 {
                ggml::gemv(Isa::Avx2, ty, &data, cols, &a, &mut y);
            }
            let dt = t0.elapsed().as_secs_f64() / 5.0;
            println!(
                "{} rayon {} threads: {:.2} GB/s",
                ty.name(),
                rayon::current_num_threads(),
                data.len() as f64 / dt / 1e9
            );
        }
        let t0 = Instant::now();
        let mut a2 = ggml::Q8Acts::default();
        for _ in 0..1000 {
            a2.quantize(&x);
        }
        println!("quantize {:.2} us", t0.elapsed().as_secs_f64() * 1e3);
    }
}
