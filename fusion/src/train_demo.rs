//! Training the demo checkpoint: a small register-window ViT and the adapter, in front of the
//! real (frozen) SmolLM2-135M-Instruct, on generated scenes and their true captions.
//!
//! Two stages, both with tch autograd and AdamW, reproducible from one seed (scenes, mode
//! choices and initialisation all derive from it):
//! 1. **Encoder pre-training** (cheap, no language model): a dense head reads the (colour,
//!    shape) class under every patch from the encoder's tokens (exact shape geometry), and a tile
//!    head reads, from the register and mean tokens, each pair's count (0–3, objects whose
//!    centre the tile shows) and the written word. Steps cycle through rapid, balanced and
//!    high-res tiles. This stands in for the contrastive pre-training a real encoder gets, so
//!    that stage 2 starts from features that already separate the scenes.
//! 2. **Alignment**: encoder + adapter learn to produce visual tokens from which the frozen text
//!    model, through its chat template, writes the caption (cross-entropy on the caption tokens
//!    and the end-of-turn token), plus the tile head's loss read from the adapter's register
//!    token (so the adapter keeps the tile summary). Tiles come from the checkpoint's own tiler
//!    in all three modes.
//!    The system-prompt prefix before the image is the same for every example: its KV cache is
//!    computed once and forked for each batch.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tch::{nn, nn::Module, nn::OptimizerConfig, Kind, Reduction, Tensor};

use afm_text::TextModel;
use afm_vision::{TileKind, TileMeta, TileMode, Tiler, TilerConfig, VitConfig};

use crate::adapter::{AdapterConfig, CountTokenConfig};
use crate::config::{ImageLoraConfig, ImageTokenConfig, VlmConfig};
use crate::error::{FusionError, Result};
use crate::model::VisionLanguageModel;
use crate::scene::{
    generate_scene, pair_class, Colour, SceneConfig, Shape, SplitMix64, NUM_PAIR_CLASSES, WORDS,
};

/// The demo architecture around a text model: a four-layer convolutional stem and a 4-block
/// register-window ViT (width 128, patch 16, 4×4-token windows, global blocks 1 and 3, one
/// register), tiles of 128 px (96 px in rapid mode), an adapter pooling to 3×3 = 9 tokens per
/// tile plus the projected register and a count token over the 24 (colour, shape) pairs (11
/// tokens per tile), and a rank-8 image LoRA on the text model's attention and MLP projections.
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
    Ok(demo_config_for(
        text.config().hidden_size as i64,
        emb_rms,
        text_model,
    ))
}

/// The demo architecture for a text model of width `text_hidden` whose token embeddings have
/// RMS `emb_rms` (the adapter's output norm starts there), at `text_model`.
pub fn demo_config_for(text_hidden: i64, emb_rms: f64, text_model: &str) -> VlmConfig {
    let vision = VitConfig {
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 512,
        patch_size: 16,
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
        // Four stride-2 convolutions: each token sees ~31 px, most of an object, so shape is
        // nearly a local feature (a plain ViT learnt colours here but hardly any shapes).
        conv_stem: vec![32, 64, 96, 128],
    };
    VlmConfig {
        model_type: "afm-vl".into(),
        vision,
        adapter: AdapterConfig {
            text_hidden_size: text_hidden,
            pool: 3,
            keep_registers: true,
            output_norm: true,
            output_norm_init: emb_rms,
            count_token: Some(CountTokenConfig {
                classes: NUM_PAIR_CLASSES as i64,
                max_count: 3,
            }),
        },
        tiler: TilerConfig {
            mode: TileMode::Auto,
            rapid_size: 96,
            tile_size: 128,
            high_res_grid: 2,
            ..TilerConfig::default()
        },
        image_token: ImageTokenConfig::default(),
        // LoRA on the MLPs too: the frozen model has to turn a few visual tokens into words.
        image_lora: Some(ImageLoraConfig {
            targets: afm_text::lora::DEFAULT_TARGETS
                .iter()
                .map(|t| t.to_string())
                .collect(),
            ..ImageLoraConfig::default()
        }),
        text_model: text_model.into(),
        default_prompt: "Describe the image.".into(),
        notes: "afm-vl demo checkpoint: trained only on generated scenes of coloured shapes \
                (circle, square, triangle, star in red, green, blue, yellow, purple, orange) \
                and a few written words; it knows nothing else."
            .into(),
        demo: true,
    }
}

/// What the stage-1 tile head reads from each tile's encoder output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TileFeature {
    /// The register token alone (the default): it reaches the text model as one token, so it
    /// learns to hold the tile's counts.
    Register,
    /// The register token next to the mean token (the first two demo runs).
    RegisterMean,
}

impl TileFeature {
    /// Width of the feature for an encoder of width `c`.
    fn width(self, c: i64) -> i64 {
        match self {
            Self::Register => c,
            Self::RegisterMean => 2 * c,
        }
    }
}

impl std::str::FromStr for TileFeature {
    type Err = FusionError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "register" => Ok(Self::Register),
            "register-mean" => Ok(Self::RegisterMean),
            _ => Err(FusionError::InvalidArgument(format!(
                "unknown tile feature `{s}` (expected register or register-mean)"
            ))),
        }
    }
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
    /// Weight of the count words (`one`, `two`, …) in the stage-2 caption loss, relative to the
    /// other caption tokens (1: plain mean).
    pub count_weight: f64,
    /// Weight of the stage-2 tile read-out (counts, word) from the adapter's register token.
    pub aux_weight: f64,
    /// Weight of the count token's detector losses in stage 2 (object centres per patch and
    /// soft counts per tile; stage 1 always trains them).
    pub detector_weight: f64,
    /// Input of the stage-1 tile head.
    pub tile_feature: TileFeature,
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
            stage1_steps: 4000,
            stage1_batch: 24,
            stage1_lr: 1.5e-3,
            stage2_steps: 600,
            stage2_batch: 8,
            stage2_lr: 5e-4,
            mode_weights: [0.3, 0.3, 0.4],
            weight_decay: 0.05,
            warmup: 30,
            count_weight: 3.0,
            aux_weight: 2.0,
            detector_weight: 1.0,
            tile_feature: TileFeature::Register,
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
    /// Stage 1: tiles whose 24 (colour, shape) counts the tile head gets all right; stage 2:
    /// token accuracy on the captions.
    pub accuracy: f64,
    /// Stage 1: shape accuracy of the dense head on patches that show an object; stage 2: tiles whose
    /// counts the read-out of the adapter's register token gets all right.
    pub aux_accuracy: Option<f64>,
    pub elapsed_s: f64,
    pub mode: Option<TileMode>,
    /// Held-out greedy captions scored (F1 of colour+shape pairs), when evaluated this step.
    pub eval_f1: Option<f64>,
    /// The same captions' exact-count rate (true pairs described with the right count).
    pub eval_counts: Option<f64>,
    /// Tiles whose 24 counts the count token's soft counts, rounded, get all right (with a
    /// count token).
    pub token_counts: Option<f64>,
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

/// Generated scenes tiled for training.
struct SceneBatch {
    /// `[n_tiles, 3, S, S]`, scene after scene, each scene's tiles in tiler order.
    pixels: Tensor,
    scenes: Vec<crate::scene::Scene>,
    /// Each tile's scene index and metadata, in the order of `pixels`.
    tiles: Vec<(usize, TileMeta)>,
}

/// Tiles of the scenes drawn from `seeds`.
fn scene_batch(tiler: &Tiler, seeds: impl Iterator<Item = u64>) -> Result<SceneBatch> {
    let cfg = demo_scenes();
    let mut pixels = Vec::new();
    let mut scenes = Vec::new();
    let mut tiles = Vec::new();
    for seed in seeds {
        let scene = generate_scene(&cfg, seed);
        let tiled = tiler.tile_image(&scene.image)?;
        pixels.push(tiled.to_tensor()?);
        tiles.extend(tiled.tiles.iter().map(|m| (scenes.len(), *m)));
        scenes.push(scene);
    }
    Ok(SceneBatch {
        pixels: Tensor::f_cat(&pixels, 0)?,
        scenes,
        tiles,
    })
}

/// What each tile of a batch shows, for the auxiliary heads.
struct TileTargets {
    /// Per patch of the `gh × gw` grid (row-major, tile after tile): `pair_class + 1` of the
    /// object under the patch centre, 0 for background and padding (empty without a grid).
    dense: Vec<i64>,
    /// Per patch, like `dense`: `pair_class + 1` of an object whose centre lies in the patch,
    /// else 0 (what counting is built from).
    centres: Vec<i64>,
    /// Per tile, [`NUM_PAIR_CLASSES`] counts (capped at 3) of the objects whose centre lies in
    /// the part of the image the tile shows.
    counts: Vec<i64>,
    /// Per tile: the word index ([`Scene::word_index`]) for tiles of the whole image, -100
    /// (ignored) for crops, which may cut the word.
    words: Vec<i64>,
}

/// Targets of every tile of `batch`; dense ones only when the encoder's token `grid` is given.
fn tile_targets(batch: &SceneBatch, grid: Option<(i64, i64)>) -> TileTargets {
    let n = batch.tiles.len();
    let (gh, gw) = grid.unwrap_or((0, 0));
    let label = |o: &crate::scene::SceneObject| pair_class(o.colour, o.shape) as i64 + 1;
    let mut t = TileTargets {
        dense: Vec::with_capacity(n * (gh * gw) as usize),
        centres: Vec::with_capacity(n * (gh * gw) as usize),
        counts: Vec::with_capacity(n * NUM_PAIR_CLASSES),
        words: Vec::with_capacity(n),
    };
    for (si, meta) in &batch.tiles {
        let scene = &batch.scenes[*si];
        let [c0, c1, c2, c3] = meta.content_box.map(|v| v as f32);
        let [s0, s1, s2, s3] = meta.source_box;
        let (sx, sy) = (
            (s2 - s0) / (c2 - c0).max(1.0),
            (s3 - s1) / (c3 - c1).max(1.0),
        );
        let side = meta.size as f32;
        for i in 0..gh {
            for j in 0..gw {
                let v = (i as f32 + 0.5) * side / gh as f32;
                let u = (j as f32 + 0.5) * side / gw as f32;
                let label = if u >= c0 && u < c2 && v >= c1 && v < c3 {
                    let (x, y) = (s0 + (u - c0) * sx, s1 + (v - c1) * sy);
                    scene
                        .objects
                        .iter()
                        .find(|o| o.contains(x, y))
                        .map_or(0, label)
                } else {
                    0
                };
                t.dense.push(label);
            }
        }
        if gh > 0 && gw > 0 {
            let start = t.centres.len();
            t.centres.resize(start + (gh * gw) as usize, 0);
            for o in &scene.objects {
                // The object's centre in tile pixels, then its patch.
                let u = c0 + (o.cx - s0) / sx;
                let v = c1 + (o.cy - s1) / sy;
                if u >= c0 && u < c2 && v >= c1 && v < c3 {
                    let j = ((u / side * gw as f32) as i64).clamp(0, gw - 1);
                    let i = ((v / side * gh as f32) as i64).clamp(0, gh - 1);
                    t.centres[start + (i * gw + j) as usize] = label(o);
                }
            }
        }
        let mut counts = [0i64; NUM_PAIR_CLASSES];
        for o in &scene.objects {
            if o.cx >= s0 && o.cx < s2 && o.cy >= s1 && o.cy < s3 {
                counts[pair_class(o.colour, o.shape)] += 1;
            }
        }
        t.counts.extend(counts.map(|c| c.min(3)));
        t.words.push(match meta.kind {
            TileKind::Crop { .. } => -100,
            TileKind::Whole | TileKind::Thumbnail => scene.word_index(),
        });
    }
    t
}

/// A linear read-out of one tile-level feature: per (colour, shape) count logits (0–3) and
/// word logits.
struct TileHead {
    linear: nn::Linear,
}

/// Losses and accuracies of a [`TileHead`] on a batch.
struct TileHeadOut {
    counts_loss: Tensor,
    words_loss: Tensor,
    /// Tiles whose 24 counts are all right.
    exact: f64,
}

impl TileHead {
    const WORD_CLASSES: i64 = WORDS.len() as i64 + 1;

    fn new(p: nn::Path, width: i64) -> Self {
        let out = NUM_PAIR_CLASSES as i64 * 4 + Self::WORD_CLASSES;
        Self {
            linear: nn::linear(p, width, out, Default::default()),
        }
    }

    /// `feature`: `[tiles, width]`.
    fn forward(&self, feature: &Tensor, t: &TileTargets) -> Result<TileHeadOut> {
        let device = feature.device();
        let n = feature.size()[0];
        let k = NUM_PAIR_CLASSES as i64;
        let logits = self.linear.forward(feature).f_to_kind(Kind::Float)?;
        let count_logits = logits.f_narrow(1, 0, k * 4)?.f_reshape([n * k, 4])?;
        let word_logits = logits.f_narrow(1, k * 4, Self::WORD_CLASSES)?;
        let counts = Tensor::f_from_slice(&t.counts)?.f_to_device(device)?;
        let words = Tensor::f_from_slice(&t.words)?.f_to_device(device)?;
        let counts_loss = count_logits.f_cross_entropy_loss::<Tensor>(
            &counts,
            None,
            Reduction::Mean,
            -100,
            0.0,
        )?;
        let words_loss = if t.words.iter().any(|&w| w >= 0) {
            word_logits.f_cross_entropy_loss::<Tensor>(&words, None, Reduction::Mean, -100, 0.0)?
        } else {
            Tensor::f_zeros([], (Kind::Float, device))?
        };
        let exact = tch::no_grad(|| -> Result<f64> {
            Ok(count_logits
                .f_argmax(1, false)?
                .f_eq_tensor(&counts)?
                .f_reshape([n, k])?
                .f_all_dim(1, false)?
                .f_to_kind(Kind::Float)?
                .f_mean(Kind::Float)?
                .double_value(&[]))
        })?;
        Ok(TileHeadOut {
            counts_loss,
            words_loss,
            exact,
        })
    }
}

/// The tile-level feature of the encoder: its (first) register token (`[tiles, C]`; the mean
/// token without registers), or with [`TileFeature::RegisterMean`] the register next to the
/// mean token (`[tiles, 2·C]`).
fn encoder_tile_feature(out: &afm_vision::EncoderOutput, feature: TileFeature) -> Result<Tensor> {
    let mean = || out.tokens.f_mean_dim(1, false, Kind::Float);
    let reg = match &out.registers {
        Some(r) => r.f_select(1, 0)?,
        None => mean()?,
    };
    Ok(match feature {
        TileFeature::Register => reg,
        TileFeature::RegisterMean => Tensor::f_cat(&[reg, mean()?], 1)?,
    })
}

/// Object-centre targets of the count token's detector (or of a stand-in head) and its losses.
struct Detector<'a> {
    adapter: &'a crate::adapter::Adapter,
    /// Class weights of the centre cross-entropy: "nothing" weighs 0.1.
    weights: Tensor,
}

impl<'a> Detector<'a> {
    fn new(adapter: &'a crate::adapter::Adapter, device: tch::Device) -> Result<Self> {
        let mut w = vec![1.0f32; NUM_PAIR_CLASSES + 1];
        w[NUM_PAIR_CLASSES] = 0.1;
        Ok(Self {
            adapter,
            weights: Tensor::f_from_slice(&w)?.f_to_device(device)?,
        })
    }

    /// Centre cross-entropy of per-patch logits (`[…, classes + 1]`, "nothing" last).
    fn centre_loss(&self, logits: &Tensor, t: &TileTargets) -> Result<Tensor> {
        // Targets: `pair_class + 1` (0: none) → class index, "nothing" last.
        let k = NUM_PAIR_CLASSES as i64;
        let centres: Vec<i64> = t
            .centres
            .iter()
            .map(|&c| if c == 0 { k } else { c - 1 })
            .collect();
        let centres = Tensor::f_from_slice(&centres)?.f_to_device(logits.device())?;
        Ok(logits.f_reshape([-1, k + 1])?.f_cross_entropy_loss(
            &centres,
            Some(&self.weights),
            Reduction::Mean,
            -100,
            0.0,
        )?)
    }

    /// The count token's losses on encoder tokens `[T, gh, gw, Cv]`: centre cross-entropy plus
    /// the squared error of the soft counts against each tile's counts, and the share of tiles
    /// whose rounded soft counts are all right; `None` without a count token.
    fn loss(&self, grid: &Tensor, t: &TileTargets) -> Result<Option<(Tensor, f64)>> {
        let adapter = self.adapter;
        let Some(logits) = adapter.count_logits(grid)? else {
            return Ok(None);
        };
        let counts = adapter.soft_counts(&logits)?; // [T, K]
        let truth = Tensor::f_from_slice(&t.counts)?
            .f_to_device(grid.device())?
            .f_to_kind(Kind::Float)?
            .f_view_as(&counts)?;
        let mse = counts.f_mse_loss(&truth, Reduction::Mean)?;
        // Per tile the squared errors sum over 24 classes; the mean divides by them.
        let mse = mse.f_mul_scalar(NUM_PAIR_CLASSES as f64)?;
        let exact = tch::no_grad(|| -> Result<f64> {
            Ok(counts
                .f_round()?
                .f_eq_tensor(&truth)?
                .f_all_dim(1, false)?
                .f_to_kind(Kind::Float)?
                .f_mean(Kind::Float)?
                .double_value(&[]))
        })?;
        Ok(Some((self.centre_loss(&logits, t)?.f_add(&mse)?, exact)))
    }
}

/// Stage 1: encoder pre-training with dense (per-patch class) and tile (counts, word) heads;
/// the heads are not saved. Steps cycle through rapid, balanced and high-res tiles, so the
/// encoder sees objects at all three scales; high-res steps draw a quarter of the scenes (five
/// tiles each).
fn stage1(
    model: &VisionLanguageModel,
    cfg: &DemoTrainConfig,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<()> {
    let device = model.device();
    let width = model.config.vision.hidden_size;
    let head_vs = nn::VarStore::new(device);
    let tile_head = TileHead::new(head_vs.root() / "tile", cfg.tile_feature.width(width));
    // Dense heads, factorised so that shape is not drowned by the background: colour (or
    // background) on every patch, shape on object patches only, and object centres (class or
    // none, background down-weighted).
    // Labels are `pair_class + 1` = shape · colours + colour + 1 (0: background).
    let (n_col, n_shape) = (Colour::ALL.len() as i64, Shape::ALL.len() as i64);
    let dense = nn::linear(
        head_vs.root() / "dense",
        width,
        n_col + 1 + n_shape,
        Default::default(),
    );
    // Object centres: the count token's detector when the adapter has one (trained here with
    // its soft counts), else a throw-away head. The head is made either way: its initialisation
    // draws from the global RNG, and the committed checkpoint's run drew it.
    let centre = nn::linear(
        head_vs.root() / "centre",
        width,
        NUM_PAIR_CLASSES as i64 + 1,
        Default::default(),
    );
    let detector = Detector::new(&model.adapter, device)?;
    let adamw = nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = adamw.build(&model.vs, cfg.stage1_lr)?;
    let mut head_opt = adamw.build(&head_vs, cfg.stage1_lr)?;
    let modes = [TileMode::Rapid, TileMode::Balanced, TileMode::HighRes];
    let tilers = modes
        .iter()
        .map(|&m| model.tiler(m))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    for step in 0..cfg.stage1_steps {
        let lr = lr_at(step, cfg.stage1_steps, cfg.warmup, cfg.stage1_lr);
        opt.set_lr(lr);
        head_opt.set_lr(lr);
        let m = step % modes.len();
        let n = if modes[m] == TileMode::HighRes {
            (cfg.stage1_batch / 4).max(1)
        } else {
            cfg.stage1_batch
        };
        let seeds = (0..n).map(|i| scene_seed(cfg.seed, 1, step, i));
        let batch = scene_batch(&tilers[m], seeds)?;
        let out = model.encoder.forward(&batch.pixels.f_to_device(device)?)?;
        let (gh, gw) = out.grid;
        let targets = tile_targets(&batch, Some((gh, gw)));
        let tile = tile_head.forward(&encoder_tile_feature(&out, cfg.tile_feature)?, &targets)?;
        let labels = Tensor::f_from_slice(&targets.dense)?.f_to_device(device)?;
        let on = labels.f_gt(0)?;
        let colours = labels
            .f_sub_scalar(1)?
            .f_remainder(n_col)?
            .f_add_scalar(1)?
            .f_mul(&on)?; // 0 background, 1–6 colours
        let ignore = Tensor::f_full_like(&labels, -100)?;
        let shapes = labels
            .f_sub_scalar(1)?
            .f_floor_divide_scalar(n_col)?
            .f_where_self(&on, &ignore)?;
        let d = dense
            .forward(&out.tokens)
            .f_reshape([-1, n_col + 1 + n_shape])?; // [T·gh·gw, 7 + 4]
        let shape_logits = d.f_narrow(1, n_col + 1, n_shape)?;
        let colour_loss = d
            .f_narrow(1, 0, n_col + 1)?
            .f_cross_entropy_loss::<Tensor>(&colours, None, Reduction::Mean, -100, 0.0)?;
        let shape_loss = shape_logits.f_cross_entropy_loss::<Tensor>(
            &shapes,
            None,
            Reduction::Mean,
            -100,
            0.0,
        )?;
        let (centre_loss, token_counts) = match detector.loss(&out.grid_tokens()?, &targets)? {
            Some((l, exact)) => (l, Some(exact)),
            None => (
                detector.centre_loss(&centre.forward(&out.tokens), &targets)?,
                None,
            ),
        };
        let loss = tile
            .counts_loss
            .f_mul_scalar(4.0)?
            .f_add(&colour_loss)?
            .f_add(&shape_loss)?
            .f_add(&centre_loss)?
            .f_add(&tile.words_loss.f_mul_scalar(0.5)?)?;
        opt.zero_grad();
        head_opt.zero_grad();
        loss.f_backward()?;
        opt.clip_grad_norm(1.0);
        opt.step();
        head_opt.step();
        // Shape accuracy of the dense head on patches that show an object.
        let object_acc = tch::no_grad(|| -> Result<f64> {
            let right = shape_logits
                .f_argmax(1, false)?
                .f_eq_tensor(&shapes)?
                .f_sum(Kind::Float)?
                .double_value(&[]);
            Ok(right / on.f_sum(Kind::Float)?.double_value(&[]).max(1.0))
        })?;
        on_event(&TrainEvent {
            stage: 1,
            step: step + 1,
            steps: cfg.stage1_steps,
            loss: loss.double_value(&[]),
            accuracy: tile.exact,
            aux_accuracy: Some(object_acc),
            elapsed_s: t0.elapsed().as_secs_f64(),
            mode: Some(modes[m]),
            eval_f1: None,
            eval_counts: None,
            token_counts,
        });
    }
    Ok(())
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
    // Count words weigh `count_weight` in the caption loss: the count is decided before the
    // colour and shape it counts, and is what the captions got wrong most.
    let mut is_count = std::collections::HashMap::<u32, bool>::new();
    let mut token_weight = |id: u32| -> Result<f32> {
        let count = match is_count.get(&id) {
            Some(&c) => c,
            None => {
                let text = tok.decode(&[id], true)?.trim().to_lowercase();
                let c = (1..=12).any(|n| crate::scene::count_word(n) == text);
                is_count.insert(id, c);
                c
            }
        };
        Ok(if count { cfg.count_weight as f32 } else { 1.0 })
    };
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
    let aux_vs = nn::VarStore::new(device);
    let aux_head = TileHead::new(aux_vs.root() / "aux", model.config.adapter.text_hidden_size);
    let mut aux_opt = adamw.build(&aux_vs, 1e-3)?;
    let detector = Detector::new(&model.adapter, device)?;
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
        let batch = scene_batch(&lay.tiler, seeds)?;
        let scenes = &batch.scenes;
        let n_vis = (lay.tiles * tpt) as i64;
        let out = model.encoder.forward(&batch.pixels.f_to_device(device)?)?;
        let grid = out.grid_tokens()?; // [B·T, gh, gw, Cv]
        let tokens = model.adapter.forward(&grid, out.registers.as_ref())?; // [B·T, tpt, H]
        let targets = tile_targets(&batch, Some(out.grid));
        // The auxiliary read-out: counts and word from each tile's (first) register token (the
        // mean token when registers are not kept), so the adapter keeps the encoder's tile
        // summary.
        let pool = model.config.adapter.pool;
        let feature = if model.config.adapter.keep_registers {
            tokens.f_select(1, pool * pool)?
        } else {
            tokens.f_mean_dim(1, false, Kind::Float)?
        };
        let aux = aux_head.forward(&feature, &targets)?;
        let (detector_loss, token_counts) = match detector.loss(&grid, &targets)? {
            Some((l, exact)) => (l.f_mul_scalar(cfg.detector_weight)?, Some(exact)),
            None => (Tensor::f_zeros([], (Kind::Float, device))?, None),
        };
        let visual = tokens.f_reshape([b, n_vis, -1])?;
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
        let (mut ids, mut rows, mut targets, mut weights) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
                weights.push(token_weight(t)?);
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
        let weights = Tensor::f_from_slice(&weights)?.f_to_device(device)?;
        let caption_loss = logits
            .f_cross_entropy_loss::<Tensor>(&targets, None, Reduction::None, -100, 0.0)?
            .f_mul(&weights)?
            .f_sum(Kind::Float)?
            .f_div(&weights.f_sum(Kind::Float)?)?;
        let loss = caption_loss
            .f_add(
                &aux.counts_loss
                    .f_add(&aux.words_loss.f_mul_scalar(0.25)?)?
                    .f_mul_scalar(cfg.aux_weight)?,
            )?
            .f_add(&detector_loss)?;
        opt.zero_grad();
        aux_opt.zero_grad();
        loss.f_backward()?;
        opt.clip_grad_norm(1.0);
        opt.step();
        aux_opt.step();
        let acc = tch::no_grad(|| -> Result<f64> {
            Ok(logits
                .f_argmax(1, false)?
                .f_eq_tensor(&targets)?
                .f_to_kind(Kind::Float)?
                .f_mean(Kind::Float)?
                .double_value(&[]))
        })?;
        let done = step + 1;
        let quick = if cfg.eval_every > 0 && done % cfg.eval_every == 0 {
            Some(quick_eval(model, 24)?)
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
            loss: caption_loss.double_value(&[]),
            accuracy: acc,
            aux_accuracy: Some(aux.exact),
            elapsed_s: t0.elapsed().as_secs_f64(),
            mode: Some(lay.mode),
            eval_f1: quick.map(|q| q.0),
            eval_counts: quick.map(|q| q.1),
            token_counts,
        });
    }
    Ok(())
}

/// Greedy captions of `n` held-out scenes in balanced mode: F1 of colour+shape pairs and the
/// exact-count rate.
fn quick_eval(model: &VisionLanguageModel, n: usize) -> Result<(f64, f64)> {
    let r = crate::eval_demo::evaluate(model, n, TileMode::Balanced, 40, 0)?;
    Ok((r.score.f1(), r.exact_counts))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense targets line up with the tiles: where a patch is labelled with an object, the
    /// tile's (de-normalised) pixel at the patch centre has that object's colour, in every mode.
    #[test]
    fn dense_targets_line_up_with_the_tile_pixels() {
        for mode in TileMode::CONCRETE {
            let cfg = TilerConfig {
                mode,
                rapid_size: 96,
                tile_size: 128,
                high_res_grid: 2,
                ..TilerConfig::default()
            };
            let (mean, std) = (cfg.image_mean, cfg.image_std);
            let tiler = Tiler::new(cfg).unwrap();
            let batch = scene_batch(&tiler, 0..12u64).unwrap();
            let side = batch.tiles[0].1.size as i64;
            let patch = 16;
            let (gh, gw) = (side / patch, side / patch);
            let t = tile_targets(&batch, Some((gh, gw)));
            let px = batch.pixels.contiguous();
            let (mut labelled, mut agree) = (0, 0);
            for (ti, (si, _)) in batch.tiles.iter().enumerate() {
                for i in 0..gh {
                    for j in 0..gw {
                        let label = t.dense[(ti as i64 * gh * gw + i * gw + j) as usize];
                        if label == 0 {
                            continue;
                        }
                        let class = (label - 1) as usize;
                        let o = batch.scenes[*si]
                            .objects
                            .iter()
                            .find(|o| pair_class(o.colour, o.shape) == class)
                            .unwrap();
                        let (y, x) = (i * patch + patch / 2, j * patch + patch / 2);
                        let rgb = o.colour.rgb();
                        let close = (0..3usize).all(|c| {
                            let v = px.double_value(&[ti as i64, c as i64, y, x]) * std[c] as f64
                                + mean[c] as f64;
                            (v * 255.0 - f64::from(rgb[c])).abs() < 45.0
                        });
                        labelled += 1;
                        agree += usize::from(close);
                    }
                }
            }
            assert!(labelled > 50, "{mode:?}: {labelled} labelled patches");
            assert!(
                agree as f64 >= 0.85 * labelled as f64,
                "{mode:?}: {agree}/{labelled} labelled patch centres show the object's colour"
            );
            // Tile counts: whole-image tiles count every object.
            for (ti, (si, meta)) in batch.tiles.iter().enumerate() {
                if !matches!(meta.kind, TileKind::Crop { .. }) {
                    let n: i64 = t.counts[ti * NUM_PAIR_CLASSES..(ti + 1) * NUM_PAIR_CLASSES]
                        .iter()
                        .sum();
                    let truth: i64 = batch.scenes[*si]
                        .count_targets()
                        .iter()
                        .map(|c| c.min(&3))
                        .sum();
                    assert_eq!(n, truth);
                }
            }
        }
    }
}
