//! Perplexity of one or more model directories (quantized or not) on held-out text: the
//! MGSM English questions (`../shared/bench/mgsm/mgsm_en.tsv`, question column), joined by
//! blank lines, cut into 512-token windows, fp32, every token after the first of a window
//! scored. `QUANT_PPL_QUESTIONS=N` keeps the first N questions.
//!
//! `cargo run --release -p afm-text --example quant_ppl -- [--adapter DIR] DIR...`

use std::path::PathBuf;

use afm_text::lora::LoraAdapter;
use afm_text::{DType, Logits, TextModel};
use tch::{Device, Kind, Tensor};

const WINDOW: usize = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut adapter = None;
    if let Some(i) = args.iter().position(|a| a == "--adapter") {
        adapter = Some(PathBuf::from(args.remove(i + 1)));
        args.remove(i);
    }
    let corpus = std::env::var("QUANT_PPL_CORPUS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/bench/mgsm/mgsm_en.tsv"
        )
        .into()
    });
    let text = std::fs::read_to_string(&corpus)?;
    let questions: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|q| !q.trim().is_empty())
        .take(
            std::env::var("QUANT_PPL_QUESTIONS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(usize::MAX),
        )
        .collect();
    let joined = questions.join("\n\n");
    let _g = tch::no_grad_guard();
    for dir in &args {
        let t0 = std::time::Instant::now();
        let mut m = TextModel::load(std::path::Path::new(dir), Device::Cpu, DType::F32)?;
        if let Some(a) = &adapter {
            LoraAdapter::load(a, Device::Cpu, Kind::Float)?.activate(&mut m.decoder)?;
        }
        let ids = m.tokenizer()?.encode(&joined)?;
        let (mut nll, mut n) = (0f64, 0usize);
        for w in ids.chunks(WINDOW) {
            if w.len() < 2 {
                continue;
            }
            let t =
                Tensor::from_slice(&w.iter().map(|&x| x as i64).collect::<Vec<_>>()).view([1, -1]);
            let mut cache = m.decoder.new_cache(1);
            let logits = m.decoder.forward(&t, None, &mut cache, Logits::All)?; // [1, s, V]
            let s = w.len() as i64;
            let lp = logits
                .narrow(1, 0, s - 1)
                .log_softmax(-1, Kind::Float)
                .gather(2, &t.narrow(1, 1, s - 1).unsqueeze(-1), false);
            nll -= lp.sum(Kind::Double).double_value(&[]);
            n += (s - 1) as usize;
        }
        println!(
            "{dir}: perplexity {:.3} over {n} tokens ({} questions) in {:.1}s",
            (nll / n as f64).exp(),
            questions.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
