//! A deterministic stand-in model for testing the runner (resume, shards, merge, reports):
//! bytes are tokens, a log-likelihood is a hash of the tokens, a generation is a number
//! derived from a hash. It is a test double, not a model.

use std::time::Duration;

use crate::backend::{cut_at_stop, ChoiceRequest, EvalBackend, GenerateRequest};
use crate::error::{EvalError, Result};

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct HashBackend {
    /// Fail (as a crashed process would stop) once this many items were scored.
    pub fail_after: Option<usize>,
    /// Sleep this long per item (to make a subprocess killable mid-run).
    pub delay: Duration,
    /// Items scored so far.
    pub scored: usize,
    /// A context limit to report (tests of the prompt-length check).
    pub context: Option<usize>,
}

fn fnv(parts: &[&[u32]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &t in *p {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl HashBackend {
    fn tick(&mut self, n: usize) -> Result<()> {
        if let Some(limit) = self.fail_after {
            if self.scored + n > limit {
                return Err(EvalError::Backend(format!(
                    "simulated crash after {limit} items"
                )));
            }
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay * n as u32);
        }
        self.scored += n;
        Ok(())
    }
}

impl EvalBackend for HashBackend {
    fn model_name(&self) -> String {
        "hash-backend".into()
    }

    fn context_len(&self) -> Option<usize> {
        self.context
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn chat_wrap(&self, user_text: &str) -> Result<String> {
        Ok(format!("<user>\n{user_text}</user>\n<assistant>\n"))
    }

    fn choice_loglikelihoods(
        &mut self,
        prefix: &[u32],
        requests: &[ChoiceRequest],
        _reuse_prefix: bool,
    ) -> Result<Vec<Vec<f64>>> {
        self.tick(requests.len())?;
        Ok(requests
            .iter()
            .map(|r| {
                r.continuations
                    .iter()
                    .map(|c| -((fnv(&[prefix, &r.body, c]) % 10_000) as f64) / 1000.0)
                    .collect()
            })
            .collect())
    }

    fn generate_greedy(
        &mut self,
        prefix: &[u32],
        requests: &[GenerateRequest],
        _reuse_prefix: bool,
    ) -> Result<Vec<String>> {
        self.tick(requests.len())?;
        Ok(requests
            .iter()
            .map(|r| {
                let h = fnv(&[prefix, &r.body]);
                let text = format!(
                    " We add {} and {}, which gives 1,{:03}. The answer is {}.\n\nQuestion: more",
                    h % 7,
                    h % 11,
                    h % 1000,
                    h % 12
                );
                cut_at_stop(&text, &r.stop).0
            })
            .collect())
    }
}
