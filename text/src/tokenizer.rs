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

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    source: PathBuf,
}

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
            inner,
            chat_template: cfg
                .get("chat_template")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
            source: path,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text` (special-token strings in the text are recognised; nothing added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TextError::Tokenizer(format!("{}: {e}", self.source.display())))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TextError::Tokenizer(format!("{}: {e}", self.source.display())))
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
