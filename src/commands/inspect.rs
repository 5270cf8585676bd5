//! `afm-vl inspect`: parameters per component, layer layout, KV-cache bytes per token and
//! weight bytes, for a checkpoint directory or a preset (computed from the configuration).

use afm_text::config::TextConfig;
use afm_text::inspect::{human_bytes, human_count, ModelReport};
use afm_text::presets::{preset, PRESETS};
use afm_text::DType;

use super::{default_model_dir, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the converted SmolLM2-135M-Instruct).
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pub model: Option<std::path::PathBuf>,
    /// A named preset (see --list-presets).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Weight and KV-cache dtype for the byte counts: fp32, bf16, fp16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List the presets and exit.
    #[arg(long)]
    pub list_presets: bool,
}

pub fn run(_ctx: &Context, args: Args) -> anyhow::Result<()> {
    if args.list_presets {
        for (name, what) in PRESETS {
            println!("{name:<24} {what}");
        }
        return Ok(());
    }
    let dtype = DType::parse(&args.dtype, tch::Device::Cpu)?;
    let (label, cfg) = match &args.preset {
        Some(p) => (format!("preset {p}"), preset(p)?),
        None => {
            let dir = args.model.clone().unwrap_or_else(default_model_dir);
            (
                dir.display().to_string(),
                TextConfig::from_file(&dir.join("config.json"))?,
            )
        }
    };
    let r = ModelReport::new(&cfg, dtype.bytes());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": label, "config": cfg, "report": r})
            )?
        );
        return Ok(());
    }
    println!("model: {label} ({})", cfg.model_type);
    match r.kv_source_layer {
        Some(src) => println!(
            "layers: {} = {} segment-0 (own K/V) + {} segment-1 (Q/O only, read the K/V of layer {src})",
            r.layers, r.segment0_layers, r.segment1_layers
        ),
        None => println!("layers: {} (all with their own K/V)", r.layers),
    }
    println!(
        "width {}, {} query heads × {}, {} KV heads, FFN {}, vocab {}, {}{}RoPE θ {}, context {}",
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.num_kv_heads(),
        cfg.intermediate_size,
        cfg.vocab_size,
        if cfg.tie_word_embeddings {
            "tied embeddings, "
        } else {
            ""
        },
        if cfg.qk_norm { "QK-norm, " } else { "" },
        cfg.rope_theta,
        cfg.max_position_embeddings
    );
    println!();
    println!("| component | parameters |");
    println!("| --- | ---: |");
    for c in &r.components {
        println!("| {} | {} |", c.name, human_count(c.params));
    }
    println!(
        "| **total** | **{}** ({}) |",
        human_count(r.total_params),
        r.total_params
    );
    println!();
    println!(
        "KV cache per token ({}): {} bytes; same depth without KV reuse: {} bytes; ratio {:.3}",
        dtype.name(),
        r.kv_bytes_per_token,
        r.kv_bytes_per_token_dense,
        r.kv_ratio
    );
    println!(
        "KV cache at the full context ({} tokens): {}",
        cfg.max_position_embeddings,
        human_bytes(r.kv_bytes_per_token * cfg.max_position_embeddings as u64)
    );
    println!(
        "weights ({}): {}",
        dtype.name(),
        human_bytes(r.weight_bytes)
    );
    Ok(())
}
