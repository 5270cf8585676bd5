//! SmolVLM (HF `SmolVLMForConditionalGeneration`, also Idefics3's layout), the second
//! vision-language family next to AFM's: the Idefics3 image processor → the SigLIP encoder
//! ([`afm_vision::siglip`]) → the connector ([`crate::connector`]) → visual tokens written over
//! the prompt's `<image>` tokens → our text decoder (SmolLM2, a Llama) with its KV cache.
//!
//! A checkpoint is a HF directory: `config.json` (`vision_config`, `text_config`,
//! `scale_factor`, `image_token_id`), `model.safetensors` (or shards) with names
//! `model.vision_model.*`, `model.connector.*`, `model.text_model.*`, `lm_head.*`,
//! `tokenizer.json`, `preprocessor_config.json`, `processor_config.json` (`image_seq_len`) and
//! the chat template (`chat_template.jinja`, `chat_template.json` or the tokenizer config's).
//! Names and layouts are translated here, at load time; the modules know no file format.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use afm_text::config::{TextConfig, TokenIds};
use afm_text::generation::{generate_from_logits_lm, CausalLm, GenerateOptions};
use afm_text::weights::WeightMap;
use afm_text::{DType, Logits, TextModel};
use afm_vision::idefics3::{Idefics3Processor, Idefics3ProcessorConfig, ProcessedImage};
use afm_vision::siglip::{SiglipConfig, SiglipEncoder};

use crate::connector::Connector;
use crate::error::{FusionError, Result};
use crate::model::Description;
use crate::prompt::smolvlm_image_text;

/// The instruction when the user gives none.
pub const DEFAULT_PROMPT: &str = "Describe this image.";

/// The special tokens of the prompt format (the processor's defaults).
#[derive(Debug, Clone)]
pub struct ImageTokens {
    pub image: String,
    pub fake_around: String,
    pub global: String,
    pub image_id: u32,
    /// Tokens per frame after the connector.
    pub seq_len: usize,
}

/// `config.json` of a SmolVLM checkpoint.
#[derive(Debug, Clone)]
pub struct SmolVlmConfig {
    pub vision: SiglipConfig,
    pub text: TextConfig,
    pub scale_factor: i64,
    pub image_token_id: u32,
}

/// Top-level keys of HF's config that do not change the computation.
const IGNORED_TOP: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "vocab_size",
    "initializer_range",
    "use_reentrant_checkpointing",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "pruned_heads",
    "tokenizer_class",
    "_attn_implementation_autoset",
    "_pad_token_id",
    // `afm-vl quantize` records its plan here; the tensors say how they are stored.
    "quantization",
];

impl SmolVlmConfig {
    /// Read and check `config.json`: unknown fields, a vision geometry the connector cannot
    /// shuffle, or a model type that is not SmolVLM / Idefics3 are one-line errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| FusionError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| FusionError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("bad JSON: {e}")))?;
        Self::from_json(&v).map_err(err)
    }

    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        match obj.get("model_type").and_then(Value::as_str) {
            Some("smolvlm") | Some("idefics3") => {}
            other => {
                return Err(format!(
                    "model_type {other:?} is not a SmolVLM checkpoint (\"smolvlm\" or \"idefics3\")"
                ))
            }
        }
        const USED: [&str; 4] = [
            "vision_config",
            "text_config",
            "scale_factor",
            "image_token_id",
        ];
        if let Some(k) = obj
            .keys()
            .find(|k| !USED.contains(&k.as_str()) && !IGNORED_TOP.contains(&k.as_str()))
        {
            return Err(format!("unknown field \"{k}\""));
        }
        let vision = SiglipConfig::from_json(obj.get("vision_config").ok_or("no vision_config")?)?;
        let mut tc = obj.get("text_config").ok_or("no text_config")?.clone();
        // A text config inherits the top-level tie flag (HF's composite configs).
        if let (Some(t), Some(tie)) = (tc.as_object_mut(), obj.get("tie_word_embeddings")) {
            t.entry("tie_word_embeddings").or_insert(tie.clone());
        }
        let text =
            TextConfig::from_json_str(&tc.to_string()).map_err(|e| format!("text_config: {e}"))?;
        let scale_factor = match obj.get("scale_factor") {
            None => 2,
            Some(s) => s
                .as_i64()
                .filter(|s| (1..=64).contains(s))
                .ok_or_else(|| format!("scale_factor must be an integer in 1..=64, got {s}"))?,
        };
        let side = vision.patches_per_side();
        if side % scale_factor != 0 {
            return Err(format!(
                "scale_factor {scale_factor} does not divide the {side}×{side} patch grid \
                 (vision_config.image_size {} / patch_size {})",
                vision.image_size, vision.patch_size
            ));
        }
        let image_token_id = match obj.get("image_token_id") {
            None => 128_257,
            Some(i) => i
                .as_u64()
                .filter(|&i| (i as usize) < text.vocab_size)
                .ok_or_else(|| {
                    format!(
                        "image_token_id {i} is not an id of the text model's vocabulary of {}",
                        text.vocab_size
                    )
                })? as u32,
        };
        Ok(Self {
            vision,
            text,
            scale_factor,
            image_token_id,
        })
    }

    /// Visual tokens per frame.
    pub fn tokens_per_frame(&self) -> usize {
        let side = self.vision.patches_per_side();
        (side * side / (self.scale_factor * self.scale_factor)) as usize
    }
}

/// Whether `dir` holds a SmolVLM / Idefics3 checkpoint (by `config.json`'s `model_type`).
pub fn is_smolvlm_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .is_some_and(|t| t == "smolvlm" || t == "idefics3")
}

/// A loaded SmolVLM.
pub struct SmolVlm {
    pub config: SmolVlmConfig,
    pub processor: Idefics3Processor,
    pub encoder: SiglipEncoder,
    pub connector: Connector,
    /// The text model (our decoder, SmolVLM's tokenizer and chat template).
    pub text: TextModel,
    pub tokens: ImageTokens,
    pub dir: PathBuf,
}

impl std::fmt::Debug for SmolVlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmolVlm").field("dir", &self.dir).finish()
    }
}

/// A JSON file of the checkpoint, or `None` when absent.
fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| FusionError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| FusionError::Config {
            path: path.to_path_buf(),
            msg: format!("bad JSON: {e}"),
        })
}

/// The image processor of a checkpoint and its tokens per frame, checked against the model:
/// transformers ≥ 5 keeps the processor's settings in processor_config.json
/// (`"image_processor"`), earlier versions in preprocessor_config.json.
fn read_processor(dir: &Path, config: &SmolVlmConfig) -> Result<(Idefics3Processor, usize)> {
    let pre_path = dir.join("preprocessor_config.json");
    let proc_path = dir.join("processor_config.json");
    let processor_json = read_json(&proc_path)?;
    let (image_cfg, image_cfg_path) = match read_json(&pre_path)? {
        Some(v) => (v, pre_path),
        None => match processor_json
            .as_ref()
            .and_then(|v| v.get("image_processor"))
        {
            Some(v) => (v.clone(), proc_path.clone()),
            None => {
                return Err(FusionError::checkpoint(
                    dir,
                    "no image processor settings (preprocessor_config.json, or \
                     processor_config.json with \"image_processor\")",
                ))
            }
        },
    };
    let cfg_err = |path: &Path, msg: String| FusionError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let processor = Idefics3Processor::new(
        Idefics3ProcessorConfig::from_json(&image_cfg).map_err(|m| cfg_err(&image_cfg_path, m))?,
    );
    let per_frame = config.tokens_per_frame();
    let seq_len = match processor_json.as_ref().and_then(|v| v.get("image_seq_len")) {
        None => per_frame,
        Some(n) => n.as_u64().map(|n| n as usize).ok_or_else(|| {
            cfg_err(
                &proc_path,
                format!("image_seq_len must be an integer, got {n}"),
            )
        })?,
    };
    if seq_len != per_frame {
        return Err(cfg_err(
            &proc_path,
            format!(
                "image_seq_len {seq_len} differs from the {per_frame} tokens a frame gives \
                 (({} / {})² / {}²)",
                config.vision.image_size, config.vision.patch_size, config.scale_factor
            ),
        ));
    }
    if processor.config.max_image_size != config.vision.image_size as usize {
        return Err(cfg_err(
            &image_cfg_path,
            format!(
                "max_image_size {} differs from the encoder's image_size {}",
                processor.config.max_image_size, config.vision.image_size
            ),
        ));
    }
    Ok((processor, seq_len))
}

/// The checkpoint's tensors split by owner: `(vision + connector under their HF names, the
/// text model under the decoder's names)` (`model.text_model.X` → `model.X`, `lm_head.*` as
/// is, in whatever encoding they are stored).
fn split_weights(dir: &Path, device: Device, dtype: DType) -> Result<(WeightMap, WeightMap)> {
    let mut weights = afm_text::checkpoint::load_weights(dir, device, dtype.kind())?;
    let names: Vec<String> = weights.names().cloned().collect();
    let mut text = WeightMap::new(device, dtype.kind());
    let file = text.add_file(&weights.file_of(names.first().map_or("", String::as_str)));
    for name in &names {
        let ours = match name.strip_prefix("model.text_model.") {
            Some(rest) => format!("model.{rest}"),
            None if name.starts_with("lm_head.") => name.clone(),
            None => continue,
        };
        if let Some((t, _)) = weights.remove(name) {
            text.insert(ours, t, file);
        }
    }
    if weights.is_empty() {
        return Err(FusionError::checkpoint(
            dir,
            "no model.vision_model.* tensors: not a SmolVLM checkpoint",
        ));
    }
    Ok((weights, text))
}

/// The checkpoint's tokenizer with its chat template: the processor's (chat_template.json)
/// wins over the tokenizer's own.
fn read_tokenizer(dir: &Path) -> Result<afm_text::tokenizer::Tokenizer> {
    let mut tokenizer = afm_text::tokenizer::Tokenizer::from_dir(dir)?;
    if let Some(t) = read_json(&dir.join("chat_template.json"))?.and_then(|v| {
        v.get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
    }) {
        tokenizer.set_chat_template(t);
    }
    if tokenizer.chat_template().is_none() {
        return Err(FusionError::checkpoint(
            dir,
            "no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)",
        ));
    }
    Ok(tokenizer)
}

/// The prompt's image tokens, all present in the tokenizer, `<image>` the config's id.
fn image_tokens(
    dir: &Path,
    tokenizer: &afm_text::tokenizer::Tokenizer,
    config: &SmolVlmConfig,
    seq_len: usize,
) -> Result<ImageTokens> {
    let token = |s: &str| -> Result<u32> {
        tokenizer.token_to_id(s).ok_or_else(|| {
            FusionError::checkpoint(dir.join("tokenizer.json"), format!("no {s} token"))
        })
    };
    let tokens = ImageTokens {
        image_id: token("<image>")?,
        image: "<image>".into(),
        fake_around: "<fake_token_around_image>".into(),
        global: "<global-img>".into(),
        seq_len,
    };
    token(&tokens.fake_around)?;
    token(&tokens.global)?;
    if tokens.image_id != config.image_token_id {
        return Err(FusionError::Config {
            path: dir.join("config.json"),
            msg: format!(
                "image_token_id {} is not the tokenizer's <image> ({})",
                config.image_token_id, tokens.image_id
            ),
        });
    }
    Ok(tokens)
}

/// Where generation stops: the text config's EOS, generation_config.json's EOS ids and the
/// end of the turn (`<end_of_utterance>`).
fn stop_ids(
    dir: &Path,
    text: &TextConfig,
    tokenizer: &afm_text::tokenizer::Tokenizer,
) -> Result<TokenIds> {
    let mut stops = text.eos_ids();
    if let Some(g) = read_json(&dir.join("generation_config.json"))? {
        if let Some(ids) = g
            .get("eos_token_id")
            .and_then(|e| serde_json::from_value::<TokenIds>(e.clone()).ok())
        {
            stops.extend(ids.to_vec());
        }
    }
    stops.extend(tokenizer.token_to_id("<end_of_utterance>"));
    stops.sort_unstable();
    stops.dedup();
    Ok(TokenIds::Many(stops))
}

/// The encoder's dtype for a model loaded in `dtype` on `device` (see [`SmolVlm::load`]).
pub fn vision_dtype(device: Device, dtype: DType) -> DType {
    match (device, dtype) {
        (Device::Cpu, DType::BF16) if afm_text::model::cpu_has_bf16() => DType::BF16,
        (Device::Cpu, _) => DType::F32,
        _ => dtype,
    }
}

/// The text and encoder dtypes a `--dtype` names: `auto` is the decode default for the text
/// model ([`DType::auto_decode`]: fp32 on a CPU) and [`DType::auto`] for the encoder, whose
/// matrix products are the bulk of the work (bf16 on an accelerator and on a CPU where bf16
/// products measure faster than fp32 ones); an explicit dtype applies to both, as
/// [`vision_dtype`] allows.
pub fn parse_dtypes(s: &str, device: Device) -> afm_text::Result<(DType, DType)> {
    if s.eq_ignore_ascii_case("auto") {
        let vision = vision_dtype(device, DType::auto(device));
        Ok((DType::auto_decode(device), vision))
    } else {
        let d = DType::parse(s, device)?;
        Ok((d, vision_dtype(device, d)))
    }
}

impl SmolVlm {
    /// Load a HF SmolVLM directory, the text model in `dtype`. The encoder and connector run
    /// in `dtype` on an accelerator and on a CPU with native bf16 arithmetic (AVX512-BF16 /
    /// AMX: there a bf16 matrix product is ~3× an fp32 one), else in fp32 (bf16 is emulated,
    /// and slower, on other CPUs).
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        Self::load_with(dir, device, dtype, vision_dtype(device, dtype))
    }

    /// Load with the text model in `text` and the encoder and connector in `vision` (see
    /// [`parse_dtypes`]).
    pub fn load_with(dir: &Path, device: Device, text: DType, vision: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(FusionError::checkpoint(dir, "model directory not found"));
        }
        let config = SmolVlmConfig::from_file(&dir.join("config.json"))?;
        let (processor, seq_len) = read_processor(dir, &config)?;
        let (vision_w, text_w) = split_weights(dir, device, text)?;
        let vision_kind = vision.kind();
        let name_err = |e: afm_text::TextError| match e {
            afm_text::TextError::Checkpoint { msg, .. } => FusionError::checkpoint(dir, msg),
            e => e.into(),
        };
        let encoder = SiglipEncoder::from_tensors(&config.vision, &mut |name, shape| {
            vision_w
                .get_kind(&format!("model.vision_model.{name}"), shape, vision_kind)
                .map_err(|e| match e {
                    afm_text::TextError::Checkpoint { msg, .. } => {
                        afm_vision::VisionError::Checkpoint {
                            path: dir.to_path_buf(),
                            message: msg,
                        }
                    }
                    e => afm_vision::VisionError::Config(e.to_string()),
                })
        })?;
        let vw = config.vision.hidden_size * config.scale_factor * config.scale_factor;
        let proj = vision_w
            .get_kind(
                "model.connector.modality_projection.proj.weight",
                &[config.text.hidden_size as i64, vw],
                vision_kind,
            )
            .map_err(name_err)?;
        let connector = Connector::new(config.scale_factor, proj);
        let mut decoder =
            afm_text::decoder::Decoder::new(&config.text, &text_w).map_err(name_err)?;
        let tokenizer = read_tokenizer(dir)?;
        let tokens = image_tokens(dir, &tokenizer, &config, seq_len)?;
        decoder.cfg.eos_token_id = Some(stop_ids(dir, &decoder.cfg, &tokenizer)?);
        // A bf16 checkpoint's text weights widened to fp32 go back to bf16 storage: the same
        // results (see `Linear::store_bf16`), half the bytes each decode step reads.
        decoder.store_weights_bf16(true)?;
        let text = TextModel {
            decoder,
            tokenizer: Some(tokenizer),
            dtype: text,
            source: dir.to_path_buf(),
            tamm: None,
        };
        Ok(Self {
            config,
            processor,
            encoder,
            connector,
            text,
            tokens,
            dir: dir.to_path_buf(),
        })
    }

    /// Decode and process an image file (crops + global image, normalised).
    pub fn process_path(&self, path: &Path) -> Result<ProcessedImage> {
        let img = self.processor.process_path(path)?;
        self.check_grid(&img)?;
        Ok(img)
    }

    /// The prompt needs a `<row_r_col_c>` token for every crop.
    fn check_grid(&self, img: &ProcessedImage) -> Result<()> {
        if img.rows == 0 {
            return Ok(());
        }
        let last = format!("<row_{}_col_{}>", img.rows, img.cols);
        let tok = self.text.tokenizer()?;
        if tok.token_to_id(&last).is_none() {
            return Err(FusionError::InvalidArgument(format!(
                "the image splits into {}×{} crops, but the tokenizer has no {last} token \
                 (lower size.longest_edge in preprocessor_config.json)",
                img.rows, img.cols
            )));
        }
        Ok(())
    }

    /// The visual tokens of a processed image: `[frames · tokens_per_frame, text_hidden]`.
    pub fn encode(&self, img: &ProcessedImage) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.encoder.forward(&img.to_tensor()?)?; // [F, N, Cv]
        let v = self.connector.forward(&hidden)?; // [F, N / s², H]
        let (f, n, h) = v.size3()?;
        Ok(v.f_reshape([f * n, h])?)
    }

    /// The chat-template text of one user turn (the image, then the instruction) with the
    /// assistant's turn opened, before the image is expanded.
    pub fn prompt_text(&self, prompt: Option<&str>) -> Result<String> {
        let messages = serde_json::json!([{
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt.unwrap_or(DEFAULT_PROMPT)}],
        }]);
        Ok(self
            .text
            .tokenizer()?
            .apply_chat_template_json(&messages, true)?)
    }

    /// Token ids of the prompt with the image expanded (HF's processor: every `<image>` of the
    /// text becomes the crops' and global image's tokens).
    pub fn prompt_ids(&self, prompt: Option<&str>, img: &ProcessedImage) -> Result<Vec<u32>> {
        let text = self.prompt_text(prompt)?;
        let parts: Vec<&str> = text.split(self.tokens.image.as_str()).collect();
        if parts.len() != 2 {
            return Err(FusionError::InvalidArgument(format!(
                "the prompt must hold one image, found {} {} tokens",
                parts.len() - 1,
                self.tokens.image
            )));
        }
        let expanded = format!(
            "{}{}{}",
            parts[0],
            smolvlm_image_text(img.rows, img.cols, &self.tokens),
            parts[1]
        );
        Ok(self.text.tokenizer()?.encode(&expanded)?)
    }

    /// Token embeddings of `ids` (`[1, S]`) with the rows of the image tokens replaced by
    /// `visual` (`[n, H]`, in order): `[1, S, H]`.
    pub fn embed_with_image(&self, ids: &[u32], visual: &Tensor) -> Result<Tensor> {
        let net = &self.text.decoder;
        let emb =
            net.embed_ids(&afm_text::generation::ids_tensor(ids)?.f_to_device(net.lm_device())?)?;
        let at: Vec<i64> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.tokens.image_id)
            .map(|(i, _)| i as i64)
            .collect();
        let n = visual.size()[0];
        if at.len() as i64 != n {
            return Err(FusionError::InvalidArgument(format!(
                "the prompt has {} image tokens for {n} visual tokens",
                at.len()
            )));
        }
        let idx = Tensor::f_from_slice(&at)?.f_to_device(emb.device())?;
        let rows = emb.f_select(0, 0)?.f_index_copy(
            0,
            &idx,
            &visual.f_to_kind(emb.kind())?.f_to_device(emb.device())?,
        )?;
        Ok(rows.f_unsqueeze(0)?)
    }

    /// Logits of every prompt position for an image (`[S, vocab]`, fp32): the full forward the
    /// parity tests compare.
    pub fn prompt_logits(&self, prompt: Option<&str>, img: &ProcessedImage) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let ids = self.prompt_ids(prompt, img)?;
        let x = self.embed_with_image(&ids, &self.encode(img)?)?;
        let net = &self.text.decoder;
        let mut cache = net.new_lm_cache(1);
        let logits = net.forward_embeds_lm(&x, None, &mut cache, Logits::All)?;
        Ok(logits.f_select(0, 0)?.f_to_kind(Kind::Float)?)
    }

    /// Describe a processed image.
    pub fn describe_processed(
        &self,
        img: &ProcessedImage,
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Description> {
        let _guard = tch::no_grad_guard();
        self.check_grid(img)?;
        let ids = self.prompt_ids(prompt, img)?;
        let net = &self.text.decoder;
        let ctx = net.context_len();
        if ids.len() >= ctx {
            return Err(afm_text::TextError::ContextOverflow {
                tokens: ids.len(),
                requested: opts.max_new_tokens,
                context: ctx,
            }
            .into());
        }
        let t0 = Instant::now();
        let visual = self.encode(img)?;
        let encode_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let x = self.embed_with_image(&ids, &visual)?;
        let mut cache = net.new_lm_cache(1);
        let logits = net.forward_embeds_lm(&x, None, &mut cache, Logits::Last)?;
        let prefill_s = t1.elapsed().as_secs_f64();
        let mut generation = generate_from_logits_lm(
            net,
            self.text.tokenizer.as_ref(),
            &mut cache,
            &logits,
            &ids,
            opts,
            on_text,
        )?;
        generation.stats.prompt_tokens = ids.len();
        generation.stats.prefill_secs = prefill_s;
        let visual_tokens = visual.size()[0] as usize;
        let mode = if img.rows == 0 {
            "single".to_string()
        } else {
            format!("{}x{}+global", img.rows, img.cols)
        };
        Ok(Description::new(
            generation,
            mode,
            img.frames,
            visual_tokens,
            encode_s,
        ))
    }

    /// Describe an image file.
    pub fn describe_path(
        &self,
        path: &Path,
        prompt: Option<&str>,
        opts: &GenerateOptions,
    ) -> Result<Description> {
        let t0 = Instant::now();
        // describe_processed checks the crop grid against the tokenizer.
        let img = self.processor.process_path(path)?;
        let tile_s = t0.elapsed().as_secs_f64();
        let mut d = self.describe_processed(&img, prompt, opts, &mut |_| {})?;
        d.timings.tile_s = tile_s;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_decodes_in_fp32_on_a_cpu_and_encodes_in_bf16_where_faster() {
        let native = afm_text::model::cpu_has_bf16();
        let bf16_if_native = if native { DType::BF16 } else { DType::F32 };
        let faster = afm_text::model::cpu_bf16_matmul_is_faster();
        assert!(
            native || !faster,
            "bf16 measured faster without native bf16"
        );
        assert_eq!(
            parse_dtypes("auto", Device::Cpu).unwrap(),
            (DType::F32, if faster { DType::BF16 } else { DType::F32 })
        );
        assert_eq!(
            parse_dtypes("AUTO", Device::Cuda(0)).unwrap(),
            (DType::BF16, DType::BF16)
        );
        assert_eq!(
            parse_dtypes("fp32", Device::Cpu).unwrap(),
            (DType::F32, DType::F32)
        );
        // An explicit bf16 keeps the encoder in fp32 where bf16 would be emulated.
        assert_eq!(
            parse_dtypes("bf16", Device::Cpu).unwrap(),
            (DType::BF16, bf16_if_native)
        );
        assert!(parse_dtypes("fp8", Device::Cpu).is_err());
        // The text-only default agrees.
        assert_eq!(
            DType::parse_decode("auto", Device::Cpu).unwrap(),
            DType::F32
        );
        assert_eq!(
            DType::parse_decode("bf16", Device::Cpu).unwrap(),
            DType::BF16
        );
    }
}
