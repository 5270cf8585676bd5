//! `afm-vl generate` and `afm-vl chat`.

use std::io::BufRead;

use anyhow::Context as _;

use afm_text::{ChatMessage, GenerateOptions, SamplingConfig};

use super::{Context, ModelArgs};

/// Sampling and stopping flags shared by generate and chat.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy (default); > 0 samples.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below min_p × the top probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears (repeatable). `\n`, `\t` and `\\` are read as a newline,
    /// a tab and a backslash, so `--stop '\n\n'` stops at a blank line.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Print prefill and decode tokens/s to stderr.
    #[arg(long)]
    pub stats: bool,
}

impl SamplingArgs {
    pub fn options(&self) -> anyhow::Result<GenerateOptions> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature must be ≥ 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            anyhow::bail!("--min-p must be in [0, 1], got {}", self.min_p);
        }
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            anyhow::bail!(
                "--repetition-penalty must be > 0, got {}",
                self.repetition_penalty
            );
        }
        let stop_strings = self
            .stop
            .iter()
            .map(|s| unescape_stop(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_strings,
            stop_on_eos: true,
        })
    }
}

/// A `--stop` value with `\n`, `\t`, `\r` and `\\` read as escapes; an empty string (which
/// would stop before the first token) and an unknown escape are errors.
pub fn unescape_stop(s: &str) -> anyhow::Result<String> {
    if s.is_empty() {
        anyhow::bail!("--stop needs a non-empty string (an empty one would stop at once)");
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                anyhow::bail!("--stop {s:?}: unknown escape '\\{o}' (known: \\n, \\t, \\r, \\\\)")
            }
            None => anyhow::bail!("--stop {s:?}: ends with a lone backslash (write \\\\)"),
        }
    }
    Ok(out)
}

/// Tell the user (stderr) when a generation ended because the context was full.
pub fn notice_stop(quiet: bool, reason: afm_text::StopReason, context: usize) {
    if !quiet && reason == afm_text::StopReason::ContextFull {
        eprintln!("note: generation stopped at the end of the model's context ({context} tokens)");
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt (wrapped in the model's chat template unless --raw).
    pub prompt: String,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Speculative decoding: a draft model directory (same tokenizer; an adapter-toolkit folder
    /// gives its `draft-model-*`) or `self:N` (the target's own first N layers).
    #[arg(long, value_name = "DIR|self:N")]
    pub draft: Option<String>,
    /// A LoRA adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors) or,
    /// on a tamm model, an adapter-toolkit checkpoint (`.pt`, or a folder with adapter.pt).
    #[arg(long, value_name = "PATH")]
    pub adapter: Option<std::path::PathBuf>,
    /// Fold the adapter into the base weights instead of running it as an overlay.
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
    /// Tokens the draft proposes per target forward.
    #[arg(long, default_value_t = 5)]
    pub draft_tokens: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// System prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// A LoRA adapter for the whole conversation: a PEFT directory or, on a tamm model, an
    /// adapter-toolkit checkpoint (`.pt`, or a folder with adapter.pt).
    #[arg(long, value_name = "PATH")]
    pub adapter: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn print_stats(s: &afm_text::generation::GenerationStats) {
    eprintln!(
        "prefill: {} tokens in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s)",
        s.prompt_tokens,
        s.prefill_secs,
        s.prefill_tok_s(),
        s.generated_tokens,
        s.decode_secs,
        s.decode_tok_s()
    );
}

fn run_speculative(
    ctx: &Context,
    args: &GenerateArgs,
    model: &afm_text::TextModel,
    spec: &str,
) -> anyhow::Result<()> {
    use afm_text::speculative::{generate_speculative, parse_self_draft, Draft};
    let opts = args.sampling.options()?;
    let draft_model;
    let draft = match parse_self_draft(spec) {
        Some(n) => Draft::SelfPrefix(n?),
        None => {
            let dir = std::path::Path::new(spec);
            // The adapter toolkit's folder carries its draft as draft-model-*.
            draft_model = if afm_text::tamm::draft_files(dir).is_some() {
                afm_text::TextModel::load_tamm_draft(dir, ctx.device()?, model.dtype)
                    .with_context(|| format!("loading the draft in {}", dir.display()))?
            } else {
                super::load_model_dir(dir, ctx.device()?, model.dtype)?
            };
            Draft::Model(&draft_model.decoder)
        }
    };
    let ids = model.prompt_ids(&args.prompt, args.raw)?;
    let (g, st) = generate_speculative(
        &model.decoder,
        draft,
        model.tokenizer.as_ref(),
        &ids,
        &opts,
        args.draft_tokens,
    )?;
    print_speculative(args, &g, &st)
}

fn print_speculative(
    args: &GenerateArgs,
    g: &afm_text::Generation,
    st: &afm_text::speculative::SpeculativeStats,
) -> anyhow::Result<()> {
    outln!("{}", g.text)?;
    if args.sampling.stats {
        print_stats(&g.stats);
        eprintln!(
            "speculative: {} proposed, {} accepted ({:.1}%), {:.2} tokens per target forward ({} target forwards)",
            st.proposed,
            st.accepted,
            100.0 * st.acceptance_rate(),
            g.tokens.len() as f64 / st.target_forwards.max(1) as f64,
            st.target_forwards
        );
    }
    Ok(())
}

/// `generate` on the server model: a PEFT adapter under our PT-MoE names (or a toolkit `.pt` on
/// a tamm folder), `--draft self:N`
/// (its first N track blocks) for speculative decoding.
fn run_generate_ptmoe(
    ctx: &Context,
    args: &GenerateArgs,
    mut m: afm_text::ptmoe_model::PtMoeModel,
) -> anyhow::Result<()> {
    use afm_text::speculative::{generate_speculative, parse_self_draft, Draft};
    let opts = args.sampling.options()?;
    if let Some(dir) = &args.adapter {
        let adapter = m.load_adapter(dir)?;
        adapter.activate(&mut m.model)?;
        if args.merge_adapter {
            afm_text::lora::merge_active(&mut m.model)?;
        }
    }
    if let Some(spec) = &args.draft {
        let n = parse_self_draft(spec).ok_or_else(|| {
            anyhow::anyhow!(
                "--draft {spec}: a PT-MoE model drafts with its own first track blocks (self:N)"
            )
        })??;
        let ids = m.prompt_ids(&args.prompt, args.raw)?;
        let (g, st) = generate_speculative(
            &m.model,
            Draft::<afm_text::PtMoe>::SelfPrefix(n),
            m.tokenizer.as_ref(),
            &ids,
            &opts,
            args.draft_tokens,
        )?;
        return print_speculative(args, &g, &st);
    }
    let context = m.model.cfg.max_position_embeddings;
    stream_generation(ctx, args, context, &mut |on_text| {
        m.generate_text(&args.prompt, args.raw, &opts, on_text)
    })
}

/// One generation, streaming text pieces.
type StreamFn<'a> = dyn FnMut(&mut dyn FnMut(&str)) -> afm_text::Result<afm_text::Generation> + 'a;

/// Stream one generation to stdout, then the context notice and the stats.
fn stream_generation(
    ctx: &Context,
    args: &GenerateArgs,
    context: usize,
    generate: &mut StreamFn<'_>,
) -> anyhow::Result<()> {
    let mut sink = super::output::StreamSink::default();
    let out = generate(&mut |piece| sink.write(piece))?;
    sink.finish()?;
    outln!()?;
    notice_stop(ctx.quiet, out.stop_reason, context);
    if args.sampling.stats {
        print_stats(&out.stats);
    }
    Ok(())
}

pub fn run_generate(ctx: &Context, args: GenerateArgs) -> anyhow::Result<()> {
    let opts = args.sampling.options()?;
    if let Some(m) = args.model.load_ptmoe(ctx)? {
        return run_generate_ptmoe(ctx, &args, m);
    }
    let mut model = args.model.load(ctx)?;
    if let Some(dir) = &args.adapter {
        let adapter = model.load_adapter(dir)?;
        adapter.activate(&mut model.decoder)?;
        if args.merge_adapter {
            afm_text::lora::merge_active(&mut model.decoder)?;
        }
        tracing::info!(
            "adapter {} (rank {}) on {} modules",
            dir.display(),
            adapter.rank,
            adapter.modules().count()
        );
    }
    if let Some(spec) = &args.draft {
        return run_speculative(ctx, &args, &model, spec);
    }
    let context = model.decoder.cfg.max_position_embeddings;
    stream_generation(ctx, &args, context, &mut |on_text| {
        model.generate_text(&args.prompt, args.raw, &opts, on_text)
    })
}

pub fn run_chat(ctx: &Context, args: ChatArgs) -> anyhow::Result<()> {
    let opts = args.sampling.options()?;
    if let Some(mut m) = args.model.load_ptmoe(ctx)? {
        if let Some(path) = &args.adapter {
            m.load_adapter(path)?.activate(&mut m.model)?;
        }
        let tok = m.tokenizer()?;
        let context = m.model.cfg.max_position_embeddings;
        return chat_loop(ctx, &args, tok, &m.source, context, &mut |ids, on_text| {
            m.generate_ids(ids, &opts, on_text)
        });
    }
    let mut model = args.model.load(ctx)?;
    if let Some(path) = &args.adapter {
        model.load_adapter(path)?.activate(&mut model.decoder)?;
    }
    let tok = model.tokenizer()?;
    let context = model.decoder.cfg.max_position_embeddings;
    chat_loop(
        ctx,
        &args,
        tok,
        &model.source,
        context,
        &mut |ids, on_text| {
            afm_text::generation::generate(&model.decoder, Some(tok), ids, &opts, on_text)
        },
    )
}

/// One answer from prompt ids, streaming text pieces.
type GenerateFn<'a> =
    dyn FnMut(&[u32], &mut dyn FnMut(&str)) -> afm_text::Result<afm_text::Generation> + 'a;

/// The chat session: read a line, answer it with the whole history in the chat format.
fn chat_loop(
    ctx: &Context,
    args: &ChatArgs,
    tok: &afm_text::Tokenizer,
    source: &std::path::Path,
    context: usize,
    generate: &mut GenerateFn<'_>,
) -> anyhow::Result<()> {
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &args.system {
        history.push(ChatMessage::new("system", s));
    }
    eprintln!(
        "chat with {} — /reset clears the history, /exit or Ctrl-D quits",
        source.display()
    );
    let stdin = std::io::stdin();
    let mut sink = super::output::StreamSink::default();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let ids = tok.encode_chat(&history, true)?;
        let out = generate(&ids, &mut |piece| sink.write(piece));
        sink.finish()?;
        outln!()?;
        match out {
            Ok(g) => {
                notice_stop(ctx.quiet, g.stop_reason, context);
                if args.sampling.stats {
                    print_stats(&g.stats);
                }
                history.push(ChatMessage::new("assistant", &g.text));
            }
            Err(e) => {
                // Keep the session: drop the turn that failed (e.g. context full).
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unescape_stop;

    #[test]
    fn stop_escapes() {
        assert_eq!(unescape_stop("\\n\\n").unwrap(), "\n\n");
        assert_eq!(unescape_stop("a\\tb\\\\n").unwrap(), "a\tb\\n");
        assert_eq!(unescape_stop("plain").unwrap(), "plain");
        assert!(unescape_stop("").is_err());
        assert!(unescape_stop("\\x").is_err());
        assert!(unescape_stop("end\\").is_err());
    }
}
