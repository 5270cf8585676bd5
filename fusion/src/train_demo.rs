//! Training the demo checkpoint: a small register-window ViT and the adapter, in front of the
//! real (frozen) SmolLM2-135M-Instruct, on generated scenes and their true captions.
//!
//! Two stages, both with tch autograd and AdamW, reproducible from one seed (scenes, mode
//! choices and initialisation all derive from it):
//! 1. **Encoder pre-training** (cheap, no language model): the encoder's mean token and global
//!    register feed a linear head that predicts, for each of the 24 (colour, shape) pairs, its
//!    count (0–3), and the written word. This stands in for the contrastive pre-training a real
//!    encoder gets, so that stage 2 starts from features that already separate the scenes.
//! 2. **Alignment**: encoder + adapter learn to produce visual tokens from which the frozen text
//!    model, through its chat template, writes the caption (cross-entropy on the caption tokens
//!    and the end-of-turn token). Tiles come from the checkpoint's own tiler in all three modes.
//!    The system-prompt prefix before the image is the same for every example: its KV cache is
//!    computed once and forked for each batch.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tch::{nn, nn::Module, nn::OptimizerConfig, Kind, Reduction, Tensor};

use afm_text::TextModel;
use afm_vision::{TileMode, Tiler, TilerConfig, VitConfig};

use crate::adapter::AdapterConfig;
use crate::config::{ImageLoraConfig, ImageTokenConfig, VlmConfig};
use crate::error::{FusionError, Result};
use crate::model::VisionLanguageModel;
use crate::scene::{generate_scene, SceneConfig, SplitMix64, NUM_PAIR_CLASSES, WORDS};

/// The demo architecture around a text model: a 4-block register-window ViT (width 128, patch
/// 8, 4×4-token windows, global blocks 1 and 3, one register), tiles of 128 px (96 px in rapid
/// mode), an adapter pooling to 3×3 = 9 tokens per tile, and a rank-8 image LoRA on the text
/// model's attention projections.
pub fn demo_config(text: &TextModel, text_model: &str) -> Result<VlmConfig> {
    let emb_rms = match text.decoder.embed.weight() {
        Some(w) => w
            .f_to_kind(Kind::Float)?
            .f_square()?
            .f_mean(Kind::Float)?
            .f_sqrt()?
            .double_value(&[]),
        None => 1.0,
    };
    let vision = VitConfig {
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 512,
        patch_size: 8,
        num_channels: 3,
        pretrain_image_size: 128,
        image_size: 128,
        window_size: 4,
        global_block_indices: vec![1, 3],
        num_register_tokens: 1,
        register_two_pass: false,
        layer_norm_eps: 1e-6,
        qkv_bias: true,
        position_cls_slot: false,
        final_layer_norm: true,
    };
    Ok(VlmConfig {
        model_type: "afm-vl".into(),
        vision,
        adapter: AdapterConfig {
            text_hidden_size: text.config().hidden_size as i64,
            pool: 3,
            keep_registers: false,
            output_norm: true,
            output_norm_init: emb_rms,
        },
        tiler: TilerConfig {
            mode: TileMode::Auto,
            rapid_size: 96,
            tile_size: 128,
            high_res_grid: 2,
            ..TilerConfig::default()
        },
        image_token: ImageTokenConfig::default(),
        image_lora: Some(ImageLoraConfig::default()),
        text_model: text_model.into(),
        default_prompt: "Describe the image.".into(),
        notes: "afm-vl demo checkpoint: trained only on generated scenes of coloured shapes \
                (circle, square, triangle, star in red, green, blue, yellow, purple, orange) \
                and a few written words; it knows nothing else."
            .into(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoTrainConfig {
    pub seed: u64,
    pub stage1_steps: usize,
    pub stage1_batch: usize,
    pub stage1_lr: f64,
    pub stage2_steps: usize,
    pub stage2_batch: usize,
    pub stage2_lr: f64,
    /// Sampling weights of rapid, balanced, high-res batches in stage 2.
    pub mode_weights: [f64; 3],
    pub weight_decay: f64,
    pub warmup: usize,
    /// Save the checkpoint every this many stage-2 steps (0: only at the end).
    pub save_every: usize,
    /// Greedy-describe this many held-out scenes every `eval_every` stage-2 steps (logged).
    pub eval_every: usize,
    pub out: PathBuf,
}

impl Default for DemoTrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            stage1_steps: 1500,
            stage1_batch: 24,
            stage1_lr: 1.5e-3,
            stage2_steps: 300,
            stage2_batch: 8,
            stage2_lr: 5e-4,
            mode_weights: [0.3, 0.3, 0.4],
            weight_decay: 0.05,
            warmup: 30,
            save_every: 50,
            eval_every: 50,
            out: PathBuf::from("assets/models/afm-vl-demo"),
        }
    }
}

/// Progress of training, for logs and progress bars.
#[derive(Debug, Clone, Serialize)]
pub struct TrainEvent {
    pub stage: u8,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    /// Stage 1: accuracy of the count head; stage 2: token accuracy on the captions.
    pub accuracy: f64,
    pub elapsed_s: f64,
    pub mode: Option<TileMode>,
    /// Held-out greedy captions scored (F1 of colour+shape pairs), when evaluated this step.
    pub eval_f1: Option<f64>,
}

fn lr_at(step: usize, steps: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps.saturating_sub(warmup)).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Training-scene seeds: stage, step and index mixed with the run seed (all below
/// [`crate::scene::HELDOUT_SEED_BASE`]).
fn scene_seed(run: u64, stage: u64, step: usize, i: usize) -> u64 {
    let s = run
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add(stage << 36)
        .wrapping_add((step as u64) << 12)
        .wrapping_add(i as u64);
    s % crate::scene::HELDOUT_SEED_BASE
}

/// Tiles of `n` scenes: `[n × tiles, 3, S, S]`, plus the scenes.
fn scene_batch(
    tiler: &Tiler,
    seeds: impl Iterator<Item = u64>,
) -> Result<(Tensor, Vec<crate::scene::Scene>)> {
    let cfg = demo_scenes();
    let mut pixels = Vec::new();
    let mut scenes = Vec::new();
    for seed in seeds {
        let scene = generate_scene(&cfg, seed);
        pixels.push(tiler.tile_image(&scene.image)?.to_tensor()?);
        scenes.push(scene);
    }
    Ok((Tensor::f_cat(&pixels, 0)?, scenes))
}

/// Stage 1: encoder pre-training with a count / word head (not saved).
fn stage1(
    model: &VisionLanguageModel,
    cfg: &DemoTrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<()> {
    let device = model.device();
    let width = model.config.vision.hidden_size;
    let head_vs = nn::VarStore::new(device);
    let n_words = WORDS.len() as i64 + 1;
    let head = nn::linear(
        head_vs.root() / "head",
        2 * width,
        NUM_PAIR_CLASSES as i64 * 4 + n_words,
        Default::default(),
    );
    // Dense head: which (colour, shape) covers each patch (0 = background).
    let dense = nn::linear(
        head_vs.root() / "dense",
        width,
        NUM_PAIR_CLASSES as i64 + 1,
        Default::default(),
    );
    let adamw = nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = adamw.build(&model.vs, cfg.stage1_lr)?;
    let mut head_opt = adamw.build(&head_vs, cfg.stage1_lr)?;
    let tilers = [
        model.tiler(TileMode::Rapid)?,
        model.tiler(TileMode::Balanced)?,
    ];
    let t0 = Instant::now();
    for step in 0..cfg.stage1_steps {
        let lr = lr_at(step, cfg.stage1_steps, cfg.warmup, cfg.stage1_lr);
        opt.set_lr(lr);
        head_opt.set_lr(lr);
        let tiler = &tilers[step % 2];
        let seeds = (0..cfg.stage1_batch).map(|i| scene_seed(cfg.seed, 1, step, i));
        let (pixels, scenes) = scene_batch(tiler, seeds)?;
        let out = model.encoder.forward(&pixels.f_to_device(device)?)?;
        let mean = out.tokens.f_mean_dim(1, false, Kind::Float)?; // [B, C]
        let reg = match &out.registers {
            Some(r) => r.f_mean_dim(1, false, Kind::Float)?,
            None => mean.shallow_clone(),
        };
        let logits = head.forward(&Tensor::f_cat(&[mean, reg], 1)?); // [B, 24·4 + words]
        let b = scenes.len() as i64;
        let counts: Vec<i64> = scenes
            .iter()
            .flat_map(|s| s.count_targets().into_iter().map(|c| c.min(3)))
            .collect();
        let words: Vec<i64> = scenes.iter().map(|s| s.word_index()).collect();
        let counts = Tensor::f_from_slice(&counts)?.f_to_device(device)?;
        let words = Tensor::f_from_slice(&words)?.f_to_device(device)?;
        let pair_logits = logits
            .f_narrow(1, 0, NUM_PAIR_CLASSES as i64 * 4)?
            .f_reshape([b * NUM_PAIR_CLASSES as i64, 4])?;
        let word_logits = logits.f_narrow(1, NUM_PAIR_CLASSES as i64 * 4, n_words)?;
        let (gh, gw) = out.grid;
        let labels = Tensor::f_from_slice(&patch_labels(&scenes, gh, gw))?.f_to_device(device)?;
        let dense_logits = dense
            .forward(&out.tokens) // [B, gh·gw, 25]
            .f_reshape([-1, NUM_PAIR_CLASSES as i64 + 1])?;
        let loss = pair_logits
            .f_cross_entropy_loss::<Tensor>(&counts, None, Reduction::Mean, -100, 0.0)?
            .f_mul_scalar(4.0)?
            .f_add(&dense_logits.f_cross_entropy_loss::<Tensor>(
                &labels,
                None,
                Reduction::Mean,
                -100,
                0.0,
            )?)?
            .f_add(&word_logits.f_cross_entropy_loss::<Tensor>(
                &words,
                None,
                Reduction::Mean,
                -100,
                0.0,
            )?)?;
        opt.zero_grad();
        head_opt.zero_grad();
        loss.f_backward()?;
        opt.step();
        head_opt.step();
        let acc = tch::no_grad(|| -> Result<f64> {
            // Scenes whose 24 counts are all right.
            let right = pair_logits
                .f_argmax(1, false)?
                .f_eq_tensor(&counts)?
                .f_reshape([b, NUM_PAIR_CLASSES as i64])?
                .f_all_dim(1, false)?
                .f_to_kind(Kind::Float)?
                .f_mean(Kind::Float)?;
            Ok(right.double_value(&[]))
        })?;
        on_event(&TrainEvent {
            stage: 1,
            step: step + 1,
            steps: cfg.stage1_steps,
            loss: loss.double_value(&[]),
            accuracy: acc,
            elapsed_s: t0.elapsed().as_secs_f64(),
            mode: Some(if step % 2 == 0 {
                TileMode::Rapid
            } else {
                TileMode::Balanced
            }),
            eval_f1: None,
        });
    }
    Ok(())
}

/// For each patch of a `gh × gw` grid over the (square) scene, the class of the object covering
/// the patch centre: `pair_class + 1`, or 0 for background (objects approximated by discs of
/// their size).
fn patch_labels(scenes: &[crate::scene::Scene], gh: i64, gw: i64) -> Vec<i64> {
    let mut out = Vec::with_capacity(scenes.len() * (gh * gw) as usize);
    for s in scenes {
        let (w, h) = (s.image.width() as f32, s.image.height() as f32);
        for i in 0..gh {
            for j in 0..gw {
                let y = (i as f32 + 0.5) * h / gh as f32;
                let x = (j as f32 + 0.5) * w / gw as f32;
                let hit = s.objects.iter().find(|o| {
                    let (dx, dy) = (x - o.cx, y - o.cy);
                    (dx * dx + dy * dy).sqrt() < o.size * 0.9
                });
                out.push(hit.map_or(0, |o| {
                    crate::scene::pair_class(o.colour, o.shape) as i64 + 1
                }));
            }
        }
    }
    out
}

/// The scenes the demo checkpoint is trained and evaluated on: the default generator with
/// objects of 9–15% of the image side (shapes stay recognisable in 96 px rapid tiles).
pub fn demo_scenes() -> SceneConfig {
    SceneConfig {
        min_size_frac: 0.09,
        max_size_frac: 0.15,
        ..SceneConfig::default()
    }
}

/// Per-mode token layout of stage-2 examples.
struct ModeLayout {
    mode: TileMode,
    tiler: Tiler,
    tiles: usize,
    /// Tokens after the visual tokens up to the assistant turn.
    after: Vec<u32>,
}

/// Stage 2: caption loss through the frozen text model.
fn stage2(
    model: &VisionLanguageModel,
    cfg: &DemoTrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<()> {
    let device = model.device();
    let tok = model.text.tokenizer()?;
    let decoder = &model.text.decoder;
    let tpt = model.tokens_per_tile();
    let eos = tok
        .eos_token()
        .ok_or_else(|| FusionError::InvalidArgument("the text model has no EOS token".into()))?
        .to_string();
    let eos_id = tok.token_to_id(&eos).ok_or_else(|| {
        FusionError::InvalidArgument(format!("EOS token `{eos}` is not in the vocabulary"))
    })?;
    // The layout of each mode; the prefix before the image is shared by all.
    let mut layouts = Vec::new();
    let mut prefix: Option<Vec<u32>> = None;
    for mode in TileMode::CONCRETE {
        let tiler = model.tiler(mode)?;
        let tiles = tiler.tile_shape(256, 256).0;
        let layout = model.assemble(None, tiles)?;
        let p = layout.ids[..layout.image_start].to_vec();
        if prefix.as_ref().is_some_and(|q| *q != p) {
            return Err(FusionError::InvalidArgument(
                "prompt prefix differs between modes".into(),
            ));
        }
        prefix = Some(p);
        layouts.push(ModeLayout {
            mode,
            tiler,
            tiles,
            after: layout.ids[layout.image_start + layout.image_len..].to_vec(),
        });
    }
    let prefix = prefix.unwrap_or_default();
    let b = cfg.stage2_batch as i64;
    let prefix_ids: Vec<i64> = prefix.iter().map(|&i| i as i64).collect();
    // The prefix's KV cache (batch 1, repeated): recomputed every step because the image LoRA
    // changes it; no gradient flows through the prefix.
    let prefix_cache = || -> Result<afm_text::KvCache> {
        tch::no_grad(|| {
            let mut cache = decoder.new_cache(1);
            if !prefix_ids.is_empty() {
                let ids =
                    Tensor::f_from_slice(&prefix_ids)?.f_view([1, prefix_ids.len() as i64])?;
                let _ = decoder.forward(&ids, None, &mut cache, afm_text::Logits::Last)?;
            }
            Ok(cache.repeat_batch(b)?)
        })
    };

    let adamw = nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = adamw.build(&model.vs, cfg.stage2_lr)?;
    let mut rng = SplitMix64::from_state(cfg.seed ^ 0x5EED_0002); // mode choices
    let wsum: f64 = cfg.mode_weights.iter().sum();
    let t0 = Instant::now();
    for step in 0..cfg.stage2_steps {
        opt.set_lr(lr_at(step, cfg.stage2_steps, cfg.warmup, cfg.stage2_lr));
        let mut r = rng.f64() * wsum;
        let mut mi = 0;
        while mi + 1 < layouts.len() && r >= cfg.mode_weights[mi] {
            r -= cfg.mode_weights[mi];
            mi += 1;
        }
        let lay = &layouts[mi];
        let seeds = (0..cfg.stage2_batch).map(|i| scene_seed(cfg.seed, 2, step, i));
        let (pixels, scenes) = scene_batch(&lay.tiler, seeds)?;
        let n_vis = (lay.tiles * tpt) as i64;
        let visual = model
            .encode_tiles(&pixels)? // [B·T, tpt, H]
            .f_reshape([b, n_vis, -1])?;
        // ids after the prefix: placeholders, the rest of the user turn, caption, EOS.
        let captions: Vec<Vec<u32>> = scenes
            .iter()
            .map(|s| {
                let mut ids = tok.encode(&s.caption())?;
                ids.push(eos_id);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let base = n_vis as usize + lay.after.len();
        let len = base + captions.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (bi, cap) in captions.iter().enumerate() {
            let mut row: Vec<i64> =
                vec![model.config.image_token.placeholder_id as i64; n_vis as usize];
            row.extend(lay.after.iter().map(|&i| i as i64));
            row.extend(cap.iter().map(|&i| i as i64));
            row.resize(len, 0);
            ids.extend(row);
            for (k, &t) in cap.iter().enumerate() {
                // Hidden state at position base + k − 1 predicts caption token k.
                rows.push((bi * len + base + k - 1) as i64);
                targets.push(t as i64);
            }
        }
        let ids = Tensor::f_from_slice(&ids)?.f_view([b, len as i64])?;
        let x = model.embed_with_image(&ids, &visual, 0)?;
        let mut cache = prefix_cache()?;
        let hidden = decoder.forward_embeds_hidden(&x, None, &mut cache)?; // [B, L, H]
        let h = hidden.size()[2];
        let rows = Tensor::f_from_slice(&rows)?.f_to_device(device)?;
        let targets = Tensor::f_from_slice(&targets)?.f_to_device(device)?;
        let picked = hidden.f_reshape([-1, h])?.f_index_select(0, &rows)?;
        let logits = decoder.lm_head.forward(&picked)?.f_to_kind(Kind::Float)?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0)?;
        opt.zero_grad();
        loss.f_backward()?;
        opt.clip_grad_norm(1.0);
        opt.step();
        let acc = tch::no_grad(|| -> Result<f64> {
            Ok(logits
                .f_argmax(1, false)?
                .f_eq_tensor(&targets)?
                .f_to_kind(Kind::Float)?
                .f_mean(Kind::Float)?
                .double_value(&[]))
        })?;
        let done = step + 1;
        let eval_f1 = if cfg.eval_every > 0 && done % cfg.eval_every == 0 {
            Some(quick_eval(model, 8)?)
        } else {
            None
        };
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done < cfg.stage2_steps {
            model.save(&cfg.out)?;
        }
        on_event(&TrainEvent {
            stage: 2,
            step: done,
            steps: cfg.stage2_steps,
            loss: loss.double_value(&[]),
            accuracy: acc,
            elapsed_s: t0.elapsed().as_secs_f64(),
            mode: Some(lay.mode),
            eval_f1,
        });
    }
    Ok(())
}

/// Greedy captions of `n` held-out scenes in balanced mode: F1 of colour+shape pairs.
fn quick_eval(model: &VisionLanguageModel, n: usize) -> Result<f64> {
    let r = crate::eval_demo::evaluate(model, n, TileMode::Balanced, 40, 0)?;
    Ok(r.score.f1())
}

/// Train both stages, then save the checkpoint into `cfg.out`.
pub fn train_demo(
    model: &VisionLanguageModel,
    cfg: &DemoTrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<()> {
    tracing::info!("training on {:?}", model.device());
    stage1(model, cfg, on_event)?;
    stage2(model, cfg, on_event)?;
    model.save(&cfg.out)
}
