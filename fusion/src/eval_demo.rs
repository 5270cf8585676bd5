//! Caption accuracy of a checkpoint on held-out generated scenes (`afm-vl eval-demo`).
//!
//! Scenes `HELDOUT_SEED_BASE + offset + i` (never used in training) are tiled in one mode,
//! described greedily in batches (all scenes of a mode have the same number of tiles, so their
//! prompts have the same length), parsed with [`crate::caption::parse_caption`] and scored
//! against the truth: precision / recall of (colour, shape) pairs, exact counts, the word.

use std::time::Instant;

use serde::Serialize;
use tch::{Kind, Tensor};

use afm_text::Logits;
use afm_vision::{TileMode, TiledImage};

use crate::caption::{parse_caption, score_pairs, PairScore};
use crate::error::{FusionError, Result};
use crate::model::VisionLanguageModel;
use crate::scene::{generate_scene, HELDOUT_SEED_BASE};

/// One scored scene.
#[derive(Debug, Clone, Serialize)]
pub struct EvalExample {
    pub seed: u64,
    pub truth: String,
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub mode: TileMode,
    pub scenes: usize,
    pub tiles_per_scene: usize,
    pub visual_tokens: usize,
    #[serde(skip)]
    pub score: PairScore,
    pub precision: f64,
    pub recall: f64,
    pub exact_counts: f64,
    /// Scenes whose caption is exactly the true caption.
    pub exact_captions: usize,
    /// Scenes with a word, and those whose word was read right.
    pub word_scenes: usize,
    pub words_right: usize,
    /// Words claimed where the scene has none.
    pub words_invented: usize,
    pub seconds: f64,
    /// Every scene's true and generated caption, in seed order.
    pub examples: Vec<EvalExample>,
}

/// Greedy descriptions of same-shaped tiled images, batched: one prefill for all, then one
/// decode step per token for all. Returns the texts (EOS excluded).
pub fn describe_batch_greedy(
    model: &VisionLanguageModel,
    images: &[TiledImage],
    prompt: Option<&str>,
    max_tokens: usize,
) -> Result<Vec<String>> {
    let _guard = tch::no_grad_guard();
    let Some(first) = images.first() else {
        return Ok(Vec::new());
    };
    if images
        .iter()
        .any(|t| t.num_tiles() != first.num_tiles() || t.tile_size != first.tile_size)
    {
        return Err(FusionError::InvalidArgument(
            "a greedy batch needs images with the same tiles".into(),
        ));
    }
    let b = images.len() as i64;
    let pixels = images
        .iter()
        .map(|t| Ok(t.to_tensor()?))
        .collect::<Result<Vec<_>>>()?;
    let layout = model.assemble(prompt, first.num_tiles())?;
    let visual = model
        .encode_tiles(&Tensor::f_cat(&pixels, 0)?)?
        .f_reshape([b, layout.image_len as i64, -1])?;
    let decoder = &model.text.decoder;
    let tok = model.text.tokenizer()?;
    let eos: Vec<i64> = tok
        .eos_token()
        .and_then(|e| tok.token_to_id(e))
        .map(|i| vec![i as i64])
        .unwrap_or_default();
    let ids: Vec<i64> = layout.ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::f_from_slice(&ids)?
        .f_view([1, ids.len() as i64])?
        .f_repeat([b, 1])?;
    let x = model.embed_with_image(&ids, &visual, layout.image_start as i64)?;
    let mut cache = decoder.new_cache(b);
    let ctx = model.text.config().max_position_embeddings;
    let mut logits = decoder.forward_embeds(&x, None, &mut cache, Logits::Last)?;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); images.len()];
    let mut done = vec![false; images.len()];
    for _ in 0..max_tokens {
        if layout.ids.len() + out[0].len() + 1 >= ctx {
            break;
        }
        let next = logits.f_select(1, 0)?.f_argmax(1, false)?; // [B]
        let next_v = Vec::<i64>::try_from(&next.f_to_kind(Kind::Int64)?)?;
        for (i, &t) in next_v.iter().enumerate() {
            if done[i] {
                continue;
            }
            if eos.contains(&t) {
                done[i] = true;
            } else {
                out[i].push(t as u32);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        logits = decoder.forward(&next.f_view([b, 1])?, None, &mut cache, Logits::Last)?;
    }
    out.iter()
        .map(|ids| Ok(tok.decode(ids, true)?.trim().to_string()))
        .collect()
}

/// Describe and score `n` held-out scenes in `mode`.
pub fn evaluate(
    model: &VisionLanguageModel,
    n: usize,
    mode: TileMode,
    max_tokens: usize,
    offset: u64,
) -> Result<EvalReport> {
    evaluate_with_progress(model, n, mode, max_tokens, offset, &mut |_| {})
}

/// [`evaluate`], calling `progress(scenes_done)` after every batch of scenes.
pub fn evaluate_with_progress(
    model: &VisionLanguageModel,
    n: usize,
    mode: TileMode,
    max_tokens: usize,
    offset: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let tiler = model.tiler(mode)?;
    let cfg = crate::train_demo::demo_scenes();
    let mut report = EvalReport {
        mode,
        scenes: n,
        tiles_per_scene: 0,
        visual_tokens: 0,
        score: PairScore::default(),
        precision: 0.0,
        recall: 0.0,
        exact_counts: 0.0,
        exact_captions: 0,
        word_scenes: 0,
        words_right: 0,
        words_invented: 0,
        seconds: 0.0,
        examples: Vec::new(),
    };
    const CHUNK: usize = 25;
    let seeds: Vec<u64> = (0..n as u64)
        .map(|i| HELDOUT_SEED_BASE + offset + i)
        .collect();
    let mut done = 0;
    for chunk in seeds.chunks(CHUNK) {
        done += chunk.len();
        let scenes: Vec<_> = chunk.iter().map(|&s| generate_scene(&cfg, s)).collect();
        let tiled = scenes
            .iter()
            .map(|s| Ok(tiler.tile_image(&s.image)?))
            .collect::<Result<Vec<_>>>()?;
        report.tiles_per_scene = tiled[0].num_tiles();
        report.visual_tokens = report.tiles_per_scene * model.tokens_per_tile();
        let texts = describe_batch_greedy(model, &tiled, None, max_tokens)?;
        for ((scene, text), &seed) in scenes.iter().zip(texts).zip(chunk) {
            let parsed = parse_caption(&text);
            report
                .score
                .add(&score_pairs(&scene.pair_counts(), &parsed.pairs));
            let truth = scene.caption();
            if text == truth {
                report.exact_captions += 1;
            }
            match (&scene.word, &parsed.word) {
                (Some(w), Some(p)) => {
                    report.word_scenes += 1;
                    report.words_right += usize::from(w == p);
                }
                (Some(_), None) => report.word_scenes += 1,
                (None, Some(_)) => report.words_invented += 1,
                (None, None) => {}
            }
            report.examples.push(EvalExample {
                seed,
                truth,
                output: text,
            });
        }
        progress(done);
    }
    report.precision = report.score.precision();
    report.recall = report.score.recall();
    report.exact_counts = report.score.exact_count_rate();
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}
