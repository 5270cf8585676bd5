//! Where a decode step's time goes: whole step vs its parts (layers, head, norms), for the
//! default model. `cargo run --release -p afm-text --example decode_profile -- DIR [bf16|fp32] [threads]`
use std::time::Instant;

use afm_text::generation::ids_tensor;
use afm_text::{DType, Logits, TextModel};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or("assets/models/smollm2-135m-instruct".into());
    let dtype = if args.get(2).map(String::as_str) == Some("fp32") {
        DType::F32
    } else {
        DType::BF16
    };
    if let Some(t) = args.get(3) {
        tch::set_num_threads(t.parse()?);
    }
    let _g = tch::no_grad_guard();
    let m = TextModel::load(std::path::Path::new(&dir), Device::Cpu, dtype)?;
    let d = &m.decoder;
    let n = 48;
    let mut cache = d.new_cache(1);
    let _ = d.forward(
        &ids_tensor(&[1, 2, 3, 4, 5, 6, 7, 8])?,
        None,
        &mut cache,
        Logits::Last,
    )?;
    let t0 = Instant::now();
    for i in 0..n {
        let _ = d.forward(&ids_tensor(&[100 + i])?, None, &mut cache, Logits::Last)?;
    }
    let step = t0.elapsed().as_secs_f64() / n as f64;
    let h = m.config().hidden_size as i64;
    let x = Tensor::randn([1, 1, h], (dtype.kind(), Device::Cpu));
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = d.lm_head.forward(&x)?.to_kind(Kind::Float);
    }
    let head = t0.elapsed().as_secs_f64() / n as f64;
    let t0 = Instant::now();
    for _ in 0..n {
        for l in &d.layers {
            let _ = l.mlp.forward(&x)?;
        }
    }
    let mlp = t0.elapsed().as_secs_f64() / n as f64;
    let t0 = Instant::now();
    for _ in 0..n {
        for l in &d.layers {
            let _ = l.input_norm.forward(&x)?;
            let _ = l.post_norm.forward(&x)?;
        }
    }
    let norms = t0.elapsed().as_secs_f64() / n as f64;
    let t0 = Instant::now();
    for _ in 0..n {
        for l in &d.layers {
            let _ = l.attn.q_proj.forward(&x)?;
            let _ = l.attn.k_proj.as_ref().map(|p| p.forward(&x));
            let _ = l.attn.v_proj.as_ref().map(|p| p.forward(&x));
            let _ = l.attn.o_proj.forward(&x)?;
        }
    }
    let proj = t0.elapsed().as_secs_f64() / n as f64;
    println!(
        "{} threads {}: step {:.2} ms ({:.1} tok/s) | head {:.2} | mlp {:.2} | attn proj {:.2} | norms {:.2} | rest {:.2}",
        dtype.name(),
        tch::get_num_threads(),
        step * 1e3,
        1.0 / step,
        head * 1e3,
        mlp * 1e3,
        proj * 1e3,
        norms * 1e3,
        (step - head - mlp - proj - norms) * 1e3
    );
    Ok(())
}
