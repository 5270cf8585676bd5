//! Prompt assembly: the text model's chat template with one run of image placeholder tokens per
//! tile (in tile order) where the image marker sits, and the splice of visual tokens into the
//! token embeddings. Apart from the model: it only needs the tokenizer and counts.

use tch::Tensor;

use afm_text::tokenizer::{ChatMessage, Tokenizer};

use crate::config::ImageTokenConfig;
use crate::error::{FusionError, Result};

/// Token ids of an assembled prompt and where the visual tokens go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLayout {
    pub ids: Vec<u32>,
    /// First placeholder position.
    pub image_start: usize,
    /// Placeholders: tiles × tokens per tile (contiguous, tile after tile).
    pub image_len: usize,
}

/// The user message with the image marker placed: the user's own marker (exactly one) or, when
/// there is none, the marker on its own line before (`image_first`) or after the text.
pub fn user_message(cfg: &ImageTokenConfig, prompt: &str) -> Result<String> {
    match prompt.matches(cfg.marker.as_str()).count() {
        0 if cfg.image_first => Ok(format!("{}\n{prompt}", cfg.marker)),
        0 => Ok(format!("{prompt}\n{}", cfg.marker)),
        1 => Ok(prompt.to_string()),
        n => Err(FusionError::InvalidArgument(format!(
            "the prompt contains the image marker `{}` {n} times; one image takes one marker",
            cfg.marker
        ))),
    }
}

/// Chat-template the prompt and expand the marker into `tiles × tokens_per_tile` placeholders.
pub fn assemble(
    tok: &Tokenizer,
    cfg: &ImageTokenConfig,
    prompt: &str,
    tiles: usize,
    tokens_per_tile: usize,
) -> Result<PromptLayout> {
    let user = user_message(cfg, prompt)?;
    let text = tok.apply_chat_template(&[ChatMessage::new("user", &user)], true)?;
    let Some((before, after)) = text.split_once(cfg.marker.as_str()) else {
        return Err(FusionError::InvalidArgument(format!(
            "the chat template dropped the image marker `{}`",
            cfg.marker
        )));
    };
    let mut ids = tok.encode(before)?;
    let image_start = ids.len();
    let image_len = tiles * tokens_per_tile;
    ids.extend(std::iter::repeat_n(cfg.placeholder_id, image_len));
    ids.extend(tok.encode(after)?);
    Ok(PromptLayout {
        ids,
        image_start,
        image_len,
    })
}

/// Replace rows `start .. start + n` of `embeds` (`[B, S, H]`) with `visual` (`[B, n, H]`).
/// Differentiable in `visual` (training goes through here too).
pub fn splice(embeds: &Tensor, visual: &Tensor, start: i64) -> Result<Tensor> {
    let (b, s, h) = embeds.size3()?;
    let (vb, n, vh) = visual.size3()?;
    if vb != b || vh != h || start < 0 || start + n > s {
        return Err(FusionError::InvalidArgument(format!(
            "cannot splice visual tokens {:?} into embeddings {:?} at {start}",
            visual.size(),
            embeds.size()
        )));
    }
    let visual = visual.f_to_kind(embeds.kind())?;
    let head = embeds.f_narrow(1, 0, start)?;
    let tail = embeds.f_narrow(1, start + n, s - start - n)?;
    Ok(Tensor::f_cat(&[head, visual, tail], 1)?)
}

/// SmolVLM's text for one image (HF `get_image_prompt_string`): per crop
/// `<fake_token_around_image><row_r_col_c>` + the frame's image tokens, a newline after each
/// row, then a blank line and `<fake_token_around_image><global-img>` + the global image's
/// tokens + `<fake_token_around_image>`; an image that is not split is the global part alone
/// (without the leading newline).
pub fn smolvlm_image_text(rows: usize, cols: usize, t: &crate::smolvlm::ImageTokens) -> String {
    let run = t.image.repeat(t.seq_len);
    let global = format!("{}{}{run}{}", t.fake_around, t.global, t.fake_around);
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut s = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            s.push_str(&format!("{}<row_{r}_col_{c}>{run}", t.fake_around));
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&global);
    s
}
