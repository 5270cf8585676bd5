//! Fused CPU decode vs libtorch on a model dir: logits difference and tok/s.
use afm_text::generation::ids_tensor;
use afm_text::{DType, Logits, TextModel};
use std::time::Instant;
use tch::Device;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or("assets/models/smollm2-135m-instruct".into());
    let _g = tch::no_grad_guard();
    let mut m = TextModel::load(std::path::Path::new(&dir), Device::Cpu, DType::F32)?;
    let plen: u32 = std::env::var("PROMPT_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let prompt: Vec<u32> = (0..plen).map(|i| 100 + 37 * (i % 500)).collect();
    let mut res = vec![];
    let modes: Vec<bool> = if std::env::var_os("FUSED_ONLY").is_some() {
        vec![true]
    } else {
        vec![false, true]
    };
    for fused in modes {
        m.decoder.set_fused_decode(fused);
        let d = &m.decoder;
        let mut cache = d.new_cache(1);
        let _ = d.forward(&ids_tensor(&prompt)?, None, &mut cache, Logits::Last)?;
        println!("fused applies: {}", d.fused_decode_applies(&cache));
        let mut outs = vec![];
        let n = 64;
        let t0 = Instant::now();
        for i in 0..n as u32 {
            let l = d.forward(&ids_tensor(&[200 + i])?, None, &mut cache, Logits::Last)?;
            if i < 8 {
                outs.push(l);
            }
        }
        let dt = t0.elapsed().as_secs_f64() / n as f64;
        println!(
            "fused={fused}: {:.2} ms/token, {:.1} tok/s",
            dt * 1e3,
            1.0 / dt
        );
        res.push(outs);
    }
    for (a, b) in res[0].iter().zip(&res[1]) {
        let d = f64::try_from(a.f_sub(b)?.abs().max())?;
        let s = f64::try_from(a.abs().max())?;
        println!("max |Δ| {d:.3e} (scale {s:.2})");
    }
    Ok(())
}
