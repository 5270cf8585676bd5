//! Acceptance demo for LoRA training: teach SmolLM2-135M-Instruct an answer format it never
//! uses ("#### <number>" for arithmetic questions), then measure on held-out questions how
//! often the base and the adapted model answer in that format.
//!
//! `cargo run --release -p afm-text --example lora_format_demo -- [MODEL_DIR] [STEPS] [OUT_DIR]`
use std::path::PathBuf;

use afm_text::generation::generate;
use afm_text::lora::{deactivate, LoraAdapter};
use afm_text::train_lora::{train, Example, LoraTrainConfig};
use afm_text::{ChatMessage, DType, GenerateOptions, TextModel};
use tch::{Device, Kind};

fn question(i: u32) -> (String, u32) {
    let (a, b) = (i * 7 % 50 + 1, i * 13 % 40 + 2);
    match i % 3 {
        0 => (format!("What is {a} plus {b}?"), a + b),
        1 => (format!("Add {a} and {b}. What do you get?"), a + b),
        _ => (format!("Compute {a} + {b}."), a + b),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or("assets/models/smollm2-135m-instruct".into()),
    );
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(60);
    let out = PathBuf::from(
        args.get(3).cloned().unwrap_or(
            std::env::temp_dir()
                .join("afm-lora-format")
                .display()
                .to_string(),
        ),
    );
    let mut m = TextModel::load(&dir, Device::Cpu, DType::F32)?;
    let tok = m.tokenizer.take().ok_or("the model has no tokenizer")?;
    let encode = |q: &str, a: Option<&str>| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let mut msgs = vec![ChatMessage::new("user", q)];
        if let Some(a) = a {
            msgs.push(ChatMessage::new("assistant", a));
        }
        Ok(tok.encode(&tok.apply_chat_template(&msgs, a.is_none())?)?)
    };
    let mut data = Vec::new();
    for i in 0..120 {
        let (q, ans) = question(i);
        let prompt_len = encode(&q, None)?.len();
        data.push(Example {
            ids: encode(&q, Some(&format!("#### {ans}")))?,
            prompt_len,
        });
    }
    let held_out: Vec<(String, u32)> = (1000..1030).map(question).collect();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..GenerateOptions::default()
    };
    let score = |m: &TextModel| -> Result<(usize, usize, Vec<String>), Box<dyn std::error::Error>> {
        let (mut fmt, mut right, mut samples) = (0, 0, Vec::new());
        for (q, ans) in &held_out {
            let ids = encode(q, None)?;
            let g = generate(&m.decoder, Some(&tok), &ids, &opts, &mut |_| {})?;
            let t = g.text.trim().to_string();
            if t.starts_with("####") {
                fmt += 1;
            }
            if t == format!("#### {ans}") {
                right += 1;
            }
            if samples.len() < 3 {
                samples.push(format!("{q} → {t:?}"));
            }
        }
        Ok((fmt, right, samples))
    };
    let base = score(&m)?;
    let cfg = LoraTrainConfig {
        rank: 16,
        alpha: 32.0,
        lr: 1e-3,
        steps,
        batch_size: 4,
        save_every: 0,
        ..LoraTrainConfig::default()
    };
    let t0 = std::time::Instant::now();
    let (_, losses) = train(&mut m.decoder, &data, cfg, &out, false, None, |s, l| {
        if s % 10 == 0 {
            eprintln!("step {s}: loss {l:.4}");
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let adapter = LoraAdapter::load(&out, Device::Cpu, Kind::Float)?;
    adapter.activate(&mut m.decoder)?;
    let tuned = score(&m)?;
    deactivate(&mut m.decoder)?;
    let n = held_out.len();
    println!(
        "LoRA format task: 120 training pairs, {steps} steps ({secs:.0}s), final loss {:.3}",
        losses.last().unwrap_or(&0.0)
    );
    println!("\n| model | answers in the '#### N' format | exact '#### N' answers |");
    println!("| --- | ---: | ---: |");
    println!("| base | {}/{n} | {}/{n} |", base.0, base.1);
    println!("| base + LoRA | {}/{n} | {}/{n} |", tuned.0, tuned.1);
    println!(
        "\nbase samples: {:?}\nadapted samples: {:?}",
        base.2, tuned.2
    );
    Ok(())
}
