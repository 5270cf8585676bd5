//! `afm-vl inspect`: parameters per component, layer layout, KV-cache bytes per token and
//! weight bytes, for a checkpoint directory or a preset (computed from the configuration).

use afm_text::config::TextConfig;
use afm_text::inspect::PtMoeReport;
use afm_text::inspect::{human_bytes, human_count, ModelReport};
use afm_text::presets::{preset, PRESETS};
use afm_text::ptmoe::measure_local_kv_bytes;
use afm_text::ptmoe_config::{is_ptmoe_preset, ptmoe_preset, PtMoeConfig, PTMOE_PRESETS};
use afm_text::DType;

use super::Context;

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
    /// Also measure the KV cache with 8-bit K/V (int8 codes plus a scale per head and token).
    #[arg(long, value_parser = clap::value_parser!(u8).range(8..=16))]
    pub kv_bits: Option<u8>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List the presets and exit.
    #[arg(long)]
    pub list_presets: bool,
}

pub fn run(_ctx: &Context, args: Args) -> anyhow::Result<()> {
    if args.list_presets {
        for (name, what) in PRESETS.iter().chain(PTMOE_PRESETS) {
            outln!("{name:<24} {what}")?;
        }
        return Ok(());
    }
    let dtype = DType::parse(&args.dtype, tch::Device::Cpu)?;
    if let Some(p) = args.preset.as_deref().filter(|p| is_ptmoe_preset(p)) {
        return inspect_ptmoe(p, &ptmoe_preset(p)?, dtype, args.json);
    }
    if let Some(dir) = &args.model {
        if let Some((cfg_path, _)) = afm_text::tamm_ptmoe::tamm_ptmoe_files(dir) {
            let t = afm_text::tamm_ptmoe::TammPtMoe::read(&cfg_path)?;
            return inspect_ptmoe(&dir.display().to_string(), &t.cfg, dtype, args.json);
        }
        // A PT-MoE checkpoint directory (model_type afm_ptmoe).
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        if text.contains("\"afm_ptmoe\"") {
            let cfg = PtMoeConfig::from_json_str(&text)
                .map_err(|msg| anyhow::anyhow!("{}: bad config: {msg}", dir.display()))?;
            return inspect_ptmoe(&dir.display().to_string(), &cfg, dtype, args.json);
        }
    }
    let (label, cfg, stored) = match &args.preset {
        Some(p) => (format!("preset {p}"), preset(p)?, None),
        None => {
            let dir = super::model_or_default(&args.model)?;
            let cfg = afm_text::TextModel::dir_config(&dir)?;
            // How a safetensors directory stores its weights (a tamm folder holds a `.pt`).
            let stored = match afm_text::tamm::tamm_files(&dir) {
                Some(_) => None,
                None => Some(afm_text::checkpoint::stored_encodings(&dir)?),
            };
            (dir.display().to_string(), cfg, stored)
        }
    };
    let r = ModelReport::new(&cfg, dtype.bytes());
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": label, "config": cfg, "report": r,
                "stored": stored.as_ref().map(|(bytes, enc)| {
                    serde_json::json!({"bytes": bytes, "tensors_by_encoding": enc})
                }),
            }))?
        )?;
        return Ok(());
    }
    outln!("model: {label} ({})", cfg.model_type)?;
    match r.kv_source_layer {
        Some(src) => outln!(
            "layers: {} = {} segment-0 (own K/V) + {} segment-1 (Q/O only, read the K/V of layer {src})",
            r.layers, r.segment0_layers, r.segment1_layers
        )?,
        None => outln!("layers: {} (all with their own K/V)", r.layers)?,
    }
    outln!(
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
        match (cfg.qk_norm, cfg.qk_norm_after_rope) {
            (false, _) => "",
            (true, false) => "QK-norm, ",
            (true, true) => "QK-norm after RoPE, ",
        },
        cfg.rope_theta,
        cfg.max_position_embeddings
    )?;
    outln!()?;
    outln!("| component | parameters |")?;
    outln!("| --- | ---: |")?;
    for c in &r.components {
        outln!("| {} | {} |", c.name, human_count(c.params))?;
    }
    outln!(
        "| **total** | **{}** ({}) |",
        human_count(r.total_params),
        r.total_params
    )?;
    outln!()?;
    outln!(
        "KV cache per token ({}): {} bytes; same depth without KV reuse: {} bytes; ratio {:.3}",
        dtype.name(),
        r.kv_bytes_per_token,
        r.kv_bytes_per_token_dense,
        r.kv_ratio
    )?;
    outln!(
        "KV cache at the full context ({} tokens): {}",
        cfg.max_position_embeddings,
        human_bytes(r.kv_bytes_per_token * cfg.max_position_embeddings as u64)
    )?;
    if let Some(bits) = args.kv_bits {
        let full = measured_kv_bytes_per_token(&cfg, dtype, 16)?;
        let q = measured_kv_bytes_per_token(&cfg, dtype, bits)?;
        outln!(
            "KV cache per token, measured on a cache: {} bytes in {}; {} bytes with --kv-bits {bits} \
             ({:.3}× of {}; int8 codes + a {} scale per head and token)",
            full,
            dtype.name(),
            q,
            q as f64 / full as f64,
            dtype.name(),
            dtype.name()
        )?;
    }
    outln!(
        "weights ({}): {}",
        dtype.name(),
        human_bytes(r.weight_bytes)
    )?;
    if let Some((bytes, enc)) = stored {
        let parts: Vec<String> = enc.iter().map(|(e, n)| format!("{e} ×{n}")).collect();
        outln!(
            "weights as stored: {} ({})",
            human_bytes(bytes),
            parts.join(", ")
        )?;
    }
    Ok(())
}

/// The server decoder (PT-MoE): total vs active parameters, sync points per forward, KV bytes
/// per token of local vs global layers and local-layer KV at 1×, 4×, 16× the window.
fn inspect_ptmoe(label: &str, cfg: &PtMoeConfig, dtype: DType, json: bool) -> anyhow::Result<()> {
    let r = PtMoeReport::new(cfg, dtype.bytes());
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"model": label, "config": cfg, "report": r})
            )?
        )?;
        return Ok(());
    }
    outln!("model: {label} ({})", cfg.model_type)?;
    outln!(
        "PT-MoE: {} track blocks × {} tracks × {} layers ({} layers per track path, {} in all), merge {:?}",
        r.track_blocks, r.tracks, r.track_block_depth, r.track_depth, r.total_layers, cfg.track_merge
    )?;
    outln!(
        "per track path: {} sliding-window layers (window {} keys: tamm's local_attention_window_size {} + the current token; RoPE) + {} global (NoPE); {} MoE layers ({} experts, top-{}) + {} dense",
        r.local_layers_per_track,
        cfg.sliding_window,
        cfg.sliding_window.saturating_sub(1),
        r.global_layers_per_track,
        r.moe_layers_per_track,
        cfg.num_local_experts,
        cfg.num_experts_per_tok,
        r.track_depth - r.moe_layers_per_track
    )?;
    outln!(
        "width {}, {} query heads × {}, {} KV heads, dense FFN {}, expert FFN {}, vocab {}, context {}",
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.num_kv_heads(),
        cfg.intermediate_size,
        cfg.moe_intermediate_size,
        cfg.vocab_size,
        cfg.max_position_embeddings
    )?;
    outln!()?;
    outln!("| component | parameters |")?;
    outln!("| --- | ---: |")?;
    for c in &r.components {
        outln!("| {} | {} |", c.name, human_count(c.params))?;
    }
    outln!(
        "| **total** | **{}** ({}) |",
        human_count(r.total_params),
        r.total_params
    )?;
    outln!(
        "| **active per token** | **{}** ({}) |",
        human_count(r.active_params_per_token),
        r.active_params_per_token
    )?;
    outln!()?;
    outln!(
        "sync points per forward: {} (one per track block) vs {} for tensor parallelism (2 per layer × {} layers)",
        r.sync_points_per_forward, r.sync_points_tensor_parallel, r.track_depth
    )?;
    outln!(
        "KV cache per token ({}): local (sliding-window) layers {} bytes, global layers {} bytes",
        dtype.name(),
        r.kv_bytes_per_token_local,
        r.kv_bytes_per_token_global
    )?;
    outln!()?;
    outln!("| tokens | local-layer KV | local-layer KV, measured | global-layer KV |")?;
    outln!("| ---: | ---: | ---: | ---: |")?;
    for (i, (tokens, l, g)) in r.kv_bytes_at_window_multiples.iter().enumerate() {
        // A real ring of this geometry, filled to `tokens`, times the local layers.
        let measured = measure_local_kv_bytes(cfg, *tokens, dtype.kind())?;
        outln!(
            "| {tokens} ({}× window) | {} | {} | {} |",
            [1, 4, 16][i.min(2)],
            human_bytes(*l),
            human_bytes(measured),
            human_bytes(*g)
        )?;
    }
    outln!(
        "weights ({}): {}",
        dtype.name(),
        human_bytes(r.weight_bytes)
    )?;
    Ok(())
}

/// Bytes per token of a real cache for `cfg` with `bits`-bit K/V: 256 tokens appended to
/// every layer that owns K/V, allocated bytes divided by 256.
fn measured_kv_bytes_per_token(cfg: &TextConfig, dtype: DType, bits: u8) -> anyhow::Result<u64> {
    use afm_text::kv_cache::{CacheKind, KvCache};
    let src = cfg.kv_source();
    let kinds: Vec<CacheKind> = (0..cfg.num_hidden_layers)
        .map(|l| {
            if cfg.is_segment1(l) {
                CacheKind::Shared(src)
            } else {
                CacheKind::Normal
            }
        })
        .collect();
    let n = afm_text::kv_cache::DEFAULT_CHUNK;
    let mut cache = KvCache::with_kinds_bits(&kinds, 1, tch::Device::Cpu, bits);
    let _ = cache.begin_step(n, None)?;
    let kv = tch::Tensor::f_ones(
        [1, cfg.num_kv_heads() as i64, n, cfg.head_dim() as i64],
        (dtype.kind(), tch::Device::Cpu),
    )?;
    for (l, k) in kinds.iter().enumerate() {
        if *k == CacheKind::Normal {
            let _ = cache.append(l, &kv, &kv)?;
        }
    }
    Ok(cache.allocated_bytes() as u64 / n as u64)
}
