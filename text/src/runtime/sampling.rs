//! Turning logits into the next token: greedy, or sampling with temperature, top-k, top-p,
//! min-p and a repetition penalty (HF order: penalty → temperature → top-k → top-p → min-p),
//! from a seeded generator so runs repeat exactly.

/// Sampling settings. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the top probability (0 = off).
    pub min_p: f32,
    /// HF repetition penalty over the context (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    cfg: SamplingConfig,
    rng: Rng,
}

/// Index of the largest value (first on ties, NaN never wins).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in xs.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        Self { cfg, rng }
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// Apply the repetition penalty in place: positive logits divided, negative multiplied.
    fn penalise(&self, logits: &mut [f32], context: &[u32]) {
        let p = self.cfg.repetition_penalty;
        if p == 1.0 {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        for &t in context {
            if let Some(l) = logits.get_mut(t as usize) {
                if seen.insert(t) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
    }

    /// The distribution the next token is drawn from (after the repetition penalty and every
    /// filter; one-hot on the argmax when greedy), most likely first. Speculative decoding
    /// compares the draft's and the target's through this.
    pub fn distribution(&self, logits: &[f32], context: &[u32]) -> Vec<(usize, f64)> {
        let mut logits = logits.to_vec();
        self.penalise(&mut logits, context);
        if self.cfg.is_greedy() {
            return vec![(argmax(&logits), 1.0)];
        }
        self.probabilities(&logits)
    }

    /// Draw from a distribution given as (index, probability) pairs.
    pub fn draw(&mut self, dist: &[(usize, f64)]) -> u32 {
        let total: f64 = dist.iter().map(|d| d.1).sum();
        let r = self.rng.next_f64() * total;
        let mut acc = 0.0;
        for &(i, p) in dist {
            acc += p;
            if r < acc {
                return i as u32;
            }
        }
        dist.last().map_or(0, |d| d.0 as u32)
    }

    /// Uniform in [0, 1) from the sampler's generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The next token given the last position's logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.penalise(&mut logits, context);
        if self.cfg.is_greedy() {
            return argmax(&logits) as u32;
        }
        let probs = self.probabilities(&logits);
        let r = self.rng.next_f64();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, p) in probs {
            acc += p;
            last = i;
            if r < acc {
                return i as u32;
            }
        }
        last as u32
    }

    /// The filtered, renormalised distribution (index, probability), most likely first.
    /// Exposed so speculative decoding can use the exact same distribution.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        let t = self.cfg.temperature.max(1e-6) as f64;
        let mut idx: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i, l as f64 / t))
            .collect();
        idx.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        if self.cfg.top_k > 0 && idx.len() > self.cfg.top_k {
            idx.truncate(self.cfg.top_k);
        }
        let Some(&(_, max)) = idx.first() else {
            return vec![(0, 1.0)];
        };
        let mut probs: Vec<(usize, f64)> =
            idx.into_iter().map(|(i, l)| (i, (l - max).exp())).collect();
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p.1;
                if acc >= self.cfg.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        if self.cfg.min_p > 0.0 {
            let floor = probs[0].1 * self.cfg.min_p as f64;
            probs.retain(|p| p.1 >= floor);
        }
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        probs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..SamplingConfig::greedy()
        });
        // 3.0 / 2 = 1.5 < 2.9
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[1]), 3);
    }

    #[test]
    fn filters_keep_what_they_should() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 3,
            ..SamplingConfig::greedy()
        };
        let logits = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        let p = Sampler::new(cfg.clone()).probabilities(&logits);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 3, 2]);
        assert!((p.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        // top-p 0.5 over softmax([4,3,2]) = [.665, .245, .09] keeps only the first.
        let p = Sampler::new(SamplingConfig {
            top_p: 0.5,
            ..cfg.clone()
        })
        .probabilities(&logits);
        assert_eq!(p.len(), 1);
        // min-p 0.3 keeps tokens with p ≥ 0.3 × 0.665 = 0.2: [4, 3].
        let p = Sampler::new(SamplingConfig { min_p: 0.3, ..cfg }).probabilities(&logits);
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 3]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_repeats_with_the_seed() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            seed: 7,
            ..SamplingConfig::greedy()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(cfg.clone());
        let draws: Vec<u32> = (0..20_000).map(|_| s.sample(&logits, &[])).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.015, "{ones}");
        let mut s2 = Sampler::new(cfg);
        let again: Vec<u32> = (0..20_000).map(|_| s2.sample(&logits, &[])).collect();
        assert_eq!(draws, again);
    }
}
