//! The tokenizer: a `tokenizers` BPE model plus the chat template (Jinja, rendered by
//! minijinja), loaded from `tokenizer.json` + `tokenizer_config.json`, or rebuilt from GGUF
//! metadata.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::error::{Result, TextError};
use crate::gguf::{GgufFile, Value};

/// One chat turn.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How text becomes token ids.
enum Backend {
    /// An HF `tokenizers` model (`tokenizer.json`, or rebuilt from GGUF metadata).
    Hf(Box<tokenizers::Tokenizer>),
    /// A SentencePiece model run natively; `"\n"` is written as the user-defined symbol
    /// `<n>` first when `newline_symbol` (Apple's AFM tokenizer).
    Spm {
        model: Box<crate::spm::SpmModel>,
        newline_symbol: bool,
    },
}

/// How chat turns become a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// The HF Jinja template (`chat_template`), or a plain transcript without one.
    Template,
    /// tamm's AFM v6 format: `<turn_start> role<n>content<turn_end>` turns, the default system
    /// message when none is given, the leading dummy-prefix token dropped and EOS prepended.
    AfmV6,
}

pub struct Tokenizer {
    backend: Backend,
    chat_template: Option<String>,
    chat_format: ChatFormat,
    bos_token: Option<String>,
    eos_token: Option<String>,
    source: PathBuf,
}

/// tamm's AFM v6 chat template (`tamm.preprocessors.instruct_lm.afm.afm_v6`), on one line: tamm
/// renders it with Jinja's block trimming, so no newline between its blocks reaches the text.
pub const AFM_V6_TEMPLATE: &str = "{{- '<turn_start> ' + messages[0]['role'] + '<n>' + messages[0]['content'] -}}\
{% if tools %}{{- ('<n>system tools: ' + (tools | map('tojson') | join('<n>'))) -}}{% endif %}\
{{- '<turn_end>' -}}\
{% for message in messages[1:] %}{{- '<turn_start> ' + message['role'] + '<n>' + message['content'] + '<turn_end>' -}}{% endfor %}\
{% if add_generation_prompt is defined and add_generation_prompt %}{% if messages[-1]['role'] != target_role %}{{- '<turn_start> ' + target_role + '<n>' -}}{% endif %}{% endif %}";

/// The token that opens every turn of the AFM v6 chat format.
pub const AFM_TURN_START: &str = "<turn_start>";
/// tamm's default AFM system message.
pub const AFM_DEFAULT_SYSTEM: &str = "A conversation between a user and a helpful assistant.";

fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        // {"content": "<|im_end|>", ...} form.
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TextError::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| TextError::io(&cfg_path, e))?;
            serde_json::from_str(&t).map_err(|e| {
                TextError::Tokenizer(format!("{}: bad JSON: {e}", cfg_path.display()))
            })?
        } else {
            json!({})
        };
        Ok(Self {
            backend: Backend::Hf(Box::new(inner)),
            chat_format: ChatFormat::Template,
            // transformers ≥ 4.50 saves the template beside the config.
            chat_template: match cfg.get("chat_template").and_then(|c| c.as_str()) {
                Some(t) => Some(t.to_string()),
                None => {
                    let jinja = dir.join("chat_template.jinja");
                    match jinja.is_file() {
                        true => Some(
                            std::fs::read_to_string(&jinja)
                                .map_err(|e| TextError::io(&jinja, e))?,
                        ),
                        false => None,
                    }
                }
            },
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
            source: path,
        })
    }

    /// tamm's `AFMTokenizer`: `tokenizer.model` (SentencePiece) with its user-defined tokens,
    /// `"\n"` written as `<n>`, and the AFM v6 chat format. `config` is tamm's
    /// `tokenizer-config.json` (`{"__tamm_type__": "tokenizers:AFMTokenizerConfig", ...}`), when
    /// the folder has one.
    pub fn from_tamm(model_path: &Path, config: Option<&Path>) -> Result<Self> {
        let mut model = crate::spm::SpmModel::from_file(model_path)?;
        let mut newline_symbol = true;
        if let Some(cp) = config {
            let bad = |m: String| TextError::Tokenizer(format!("{}: {m}", cp.display()));
            let text = std::fs::read_to_string(cp).map_err(|e| TextError::io(cp, e))?;
            let v: Json = serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
            let obj = v
                .as_object()
                .ok_or_else(|| bad("not a JSON object".into()))?;
            let ty = obj
                .get("__tamm_type__")
                .and_then(Json::as_str)
                .unwrap_or("");
            if ty.rsplit(':').next() != Some("AFMTokenizerConfig") {
                return Err(bad(format!(
                    "__tamm_type__ {ty:?} is not supported (afm-vl reads AFMTokenizerConfig)"
                )));
            }
            for (k, val) in obj {
                match k.as_str() {
                    "__tamm_type__" | "vocab_path" | "extra_properties" => {}
                    "user_defined_tokens" if val.is_null() => {}
                    "user_defined_tokens" => {
                        let toks: Vec<String> =
                            serde_json::from_value(val.clone()).map_err(|_| {
                                bad("user_defined_tokens must be a list of strings".into())
                            })?;
                        model.add_user_defined(&toks);
                    }
                    "text_processor" => {
                        let s = val.as_str().unwrap_or("");
                        if val.is_null() {
                            newline_symbol = false;
                        } else if !s.eq_ignore_ascii_case("afm_text_find_and_replace") {
                            return Err(bad(format!("text_processor {val} is not supported")));
                        }
                    }
                    other => {
                        return Err(bad(format!("unknown AFMTokenizerConfig field {other:?}")))
                    }
                }
            }
        }
        if newline_symbol && model.piece_to_id("<n>").is_none() {
            return Err(TextError::Tokenizer(format!(
                "{}: the AFM tokenizer needs the user-defined token <n>",
                model_path.display()
            )));
        }
        let piece = |id: Option<u32>| {
            id.and_then(|i| model.pieces.get(i as usize))
                .map(|p| p.piece.clone())
        };
        Ok(Self {
            bos_token: piece(model.bos_id),
            eos_token: piece(model.eos_id),
            backend: Backend::Spm {
                model: Box::new(model),
                newline_symbol,
            },
            chat_template: Some(AFM_V6_TEMPLATE.to_string()),
            chat_format: ChatFormat::AfmV6,
            source: model_path.to_path_buf(),
        })
    }

    pub fn chat_format(&self) -> ChatFormat {
        self.chat_format
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm { model, .. } => model.len(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Spm { model, .. } => model.piece_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm { model, .. } => model.pieces.get(id as usize).map(|p| p.piece.clone()),
        }
    }

    /// A prompt's token ids: as is with `raw`, else as one user turn in the chat format with
    /// the assistant's turn opened.
    pub fn prompt_ids(&self, prompt: &str, raw: bool) -> Result<Vec<u32>> {
        if raw {
            self.encode(prompt)
        } else {
            self.encode_chat(&[ChatMessage::new("user", prompt)], true)
        }
    }

    /// tamm's AFM tokenizer (SentencePiece, [`Tokenizer::from_tamm`]).
    pub fn is_afm(&self) -> bool {
        matches!(self.backend, Backend::Spm { .. })
    }

    /// The ids that end a generation: EOS, and for AFM chat also `<turn_end>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .eos_token
            .iter()
            .filter_map(|t| self.token_to_id(t))
            .collect();
        if self.chat_format == ChatFormat::AfmV6 {
            v.extend(self.token_to_id("<turn_end>"));
        }
        v
    }

    /// Token ids of a conversation in the model's chat format (what generation is fed).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode_formatted(&self.apply_chat_template(messages, add_generation_prompt)?)
    }

    /// Token ids of text already in the model's chat format (as [`Tokenizer::apply_chat_template`]
    /// renders it), the way [`Tokenizer::encode_chat`] feeds it: for AFM v6, tamm's
    /// preprocessor drops the dummy prefix and starts with EOS; otherwise plain `encode`.
    pub fn encode_formatted(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if self.chat_format == ChatFormat::AfmV6 {
            // tamm: strip_first_token (the dummy prefix) and prepend_eos.
            if !ids.is_empty() {
                ids.remove(0);
            }
            let eos = self
                .eos_token
                .as_deref()
                .and_then(|t| self.token_to_id(t))
                .ok_or_else(|| {
                    TextError::Tokenizer("the AFM chat format needs an EOS token".into())
                })?;
            ids.insert(0, eos);
        }
        Ok(ids)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text` (special-token strings in the text are recognised; nothing added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| TextError::Tokenizer(format!("{}: {e}", self.source.display())))?;
                Ok(enc.get_ids().to_vec())
            }
            Backend::Spm {
                model,
                newline_symbol,
            } => Ok(if *newline_symbol {
                model.encode(&text.replace('\n', "<n>"))
            } else {
                model.encode(text)
            }),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(t) => t
                .decode(ids, skip_special)
                .map_err(|e| TextError::Tokenizer(format!("{}: {e}", self.source.display()))),
            Backend::Spm {
                model,
                newline_symbol,
            } => {
                let text = model.decode(ids);
                Ok(if *newline_symbol {
                    text.replace("<n>", "\n")
                } else {
                    text
                })
            }
        }
    }

    /// Render the chat template (HF semantics: `messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`). Without a template, a plain "role: content" transcript.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            let dir = self.source.parent().unwrap_or(Path::new("."));
            WARNED.call_once(|| {
                tracing::warn!(
                    "{}: no chat template (tokenizer_config.json is missing or has no \"chat_template\"): \
                     chat prompts use a plain \"role: content\" transcript, which changes the model's answers; \
                     add the model's tokenizer_config.json",
                    dir.display()
                )
            });
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            if add_generation_prompt {
                s.push_str("assistant: ");
            }
            return Ok(s);
        };
        let mut messages = messages.to_vec();
        if self.chat_format == ChatFormat::AfmV6 && !messages.iter().any(|m| m.role == "system") {
            messages.insert(0, ChatMessage::new("system", AFM_DEFAULT_SYSTEM));
        }
        self.render(
            template,
            minijinja::Value::from_serialize(&messages),
            add_generation_prompt,
        )
    }

    /// Render the chat template over messages given as JSON (HF's structured content, e.g.
    /// `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "…"}]}]`, as
    /// vision-language templates expect). A tokenizer without a template is an error.
    pub fn apply_chat_template_json(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            TextError::Tokenizer(format!(
                "{}: no chat template (tokenizer_config.json, chat_template.jinja or chat_template.json)",
                self.source.display()
            ))
        })?;
        self.render(
            template,
            minijinja::Value::from_serialize(messages),
            add_generation_prompt,
        )
    }

    /// Replace the chat template (a processor's own, e.g. `chat_template.json` of a VLM).
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    fn render(
        &self,
        template: &str,
        messages: minijinja::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| TextError::Tokenizer(format!("chat template does not parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TextError::Tokenizer(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            target_role => "assistant",
            tools => Option::<Vec<Json>>::None,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| TextError::Tokenizer(format!("chat template failed to render: {e}")))
    }
}

/// The GGUF pre-tokenizer for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Json {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        // SmolLM / SmolLM2: every digit is its own pre-token, then GPT-2 byte-level splitting.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}),
        _ => byte_level,
    }
}

/// Rebuild `tokenizer.json` and `tokenizer_config.json` from a GGUF's `tokenizer.*` metadata
/// (GPT-2-style byte-level BPE: vocab, merges, special tokens, chat template).
pub fn tokenizer_files_from_gguf(g: &GgufFile) -> Result<(Json, Json)> {
    let model = g
        .require("tokenizer.ggml.model")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if model != "gpt2" {
        return Err(TextError::gguf(
            &g.path,
            format!("tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')"),
        ));
    }
    let bad = |what: &str| TextError::gguf(&g.path, format!("tokenizer metadata: {what}"));
    let tokens: Vec<String> = g
        .require("tokenizer.ggml.tokens")?
        .as_array()
        .ok_or_else(|| bad("tokens is not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("a token is not a string"))
        })
        .collect::<Result<_>>()?;
    let merges: Vec<String> = match g.get("tokenizer.ggml.merges") {
        Some(v) => v
            .as_array()
            .ok_or_else(|| bad("merges is not an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("a merge is not a string"))
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
        _ => vec![1; tokens.len()],
    };
    let id_token = |key: &str| -> Option<String> {
        g.get(key)
            .and_then(Value::as_u64)
            .and_then(|i| tokens.get(i as usize).cloned())
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        // 3 = control, 4 = user-defined: matched whole, never split.
        if matches!(types.get(i), Some(3) | Some(4)) {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)}),
            );
        }
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": g.get(&format!("{}.context_length", g.get("general.architecture").and_then(Value::as_str).unwrap_or("llama"))).and_then(Value::as_u64).unwrap_or(4096),
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        "clean_up_tokenization_spaces": false,
    });
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(t) = id_token(key) {
            config[name] = json!(t);
        }
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = json!(t);
    }
    // Fail here, not at load time, if the result is not a valid tokenizer.
    tokenizers::Tokenizer::from_str(&tokenizer.to_string())
        .map_err(|e| TextError::gguf(&g.path, format!("rebuilt tokenizer does not load: {e}")))?;
    Ok((tokenizer, config))
}
