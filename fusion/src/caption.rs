//! Parsing and scoring model captions of synthetic scenes (see [`crate::scene`]).
//!
//! [`parse_caption`] reads the canonical caption grammar back, and tolerates what a small
//! model may emit instead: any letter case, counts as words (`one`…`twelve`) or digits,
//! `a`/`an` for one, singular or plural nouns, commas or `and` between groups, stray words
//! (ignored) and repeated groups (counts summed).

use std::collections::BTreeMap;

use crate::scene::{Colour, Shape};

/// What a caption says: (colour, shape, count) groups in caption order (shapes in
/// [`Shape::ALL`] order, then colours in [`Colour::ALL`] order, duplicates summed) and the
/// written word, uppercased.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedCaption {
    pub pairs: Vec<(Colour, Shape, u32)>,
    pub word: Option<String>,
}

fn number(token: &str) -> Option<u32> {
    const NAMES: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    match token {
        "a" | "an" | "single" => Some(1),
        t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
        t => NAMES.iter().position(|n| *n == t).map(|i| i as u32),
    }
}

/// Words that may sit between "word" and the word itself ("the word is CAT").
const WORD_FILLERS: [&str; 6] = ["is", "reads", "says", "written", "the", "shown"];

/// Parses a (model-written) caption; see the module docs for what it tolerates.
///
/// A group is a colour followed (possibly after stray words) by a shape noun; the count is the
/// last number seen since the previous group, or, without one, 1 for a singular noun and 2 for
/// a plural one. Groups with a count of 0 are dropped. The word is the first token after the
/// token `word` (skipping `is`, `reads`, `says`, …), uppercased.
pub fn parse_caption(text: &str) -> ParsedCaption {
    let tokens: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
        .collect();

    let mut word = None;
    let mut word_at = None;
    if let Some(k) = tokens.iter().position(|t| t == "word") {
        if let Some(j) =
            (k + 1..tokens.len()).find(|&j| !WORD_FILLERS.contains(&tokens[j].as_str()))
        {
            if tokens[j].chars().all(char::is_alphabetic) {
                word = Some(tokens[j].to_uppercase());
                word_at = Some(j);
            }
        }
    }

    let mut sums: BTreeMap<(usize, usize), u32> = BTreeMap::new();
    let mut count: Option<u32> = None;
    let mut colour: Option<Colour> = None;
    for (i, t) in tokens.iter().enumerate() {
        if Some(i) == word_at {
            continue;
        }
        if let Some(n) = number(t) {
            count = Some(n);
            colour = None;
        } else if let Some(c) = Colour::from_name(t) {
            colour = Some(c);
        } else if let Some(s) = Shape::from_name(t) {
            if let Some(c) = colour {
                let plural = s.name() != t;
                let n = count.unwrap_or(if plural { 2 } else { 1 });
                *sums.entry((s.index(), c.index())).or_insert(0) += n;
            }
            count = None;
            colour = None;
        }
    }
    let pairs = sums
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|((s, c), n)| (Colour::ALL[c], Shape::ALL[s], n))
        .collect();
    ParsedCaption { pairs, word }
}

/// Pair-level agreement between truth and prediction, summable over scenes with
/// [`PairScore::add`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairScore {
    /// (colour, shape) pairs in both, whatever the counts.
    pub tp: usize,
    /// Predicted pairs not in the truth.
    pub fp: usize,
    /// True pairs not predicted.
    pub fn_: usize,
    /// True pairs predicted with exactly the true count.
    pub exact_count_hits: usize,
    /// True pairs predicted with fewer objects than there are.
    pub counts_too_few: usize,
    /// True pairs predicted with more objects than there are.
    pub counts_too_many: usize,
    /// Distinct true pairs.
    pub truth_pairs: usize,
}

impl PairScore {
    /// Adds `other`'s counts to this score.
    pub fn add(&mut self, other: &PairScore) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.exact_count_hits += other.exact_count_hits;
        self.counts_too_few += other.counts_too_few;
        self.counts_too_many += other.counts_too_many;
        self.truth_pairs += other.truth_pairs;
    }

    /// tp / (tp + fp); 0 when nothing was predicted.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// tp / (tp + fn); 0 when the truth is empty.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// exact_count_hits / truth_pairs; 0 when the truth is empty.
    pub fn exact_count_rate(&self) -> f64 {
        ratio(self.exact_count_hits, self.truth_pairs)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn merge(pairs: &[(Colour, Shape, u32)]) -> BTreeMap<(Shape, Colour), u32> {
    let mut m = BTreeMap::new();
    for &(c, s, n) in pairs {
        *m.entry((s, c)).or_insert(0) += n;
    }
    m
}

/// Scores predicted groups against the truth. A pair is a true positive when its colour and
/// shape appear in both (whatever the counts) and an exact count hit when the counts are also
/// equal. Repeated pairs within either list are summed first.
pub fn score_pairs(
    truth: &[(Colour, Shape, u32)],
    predicted: &[(Colour, Shape, u32)],
) -> PairScore {
    let truth = merge(truth);
    let predicted = merge(predicted);
    let mut score = PairScore {
        truth_pairs: truth.len(),
        ..PairScore::default()
    };
    for (key, n) in &truth {
        match predicted.get(key) {
            Some(m) => {
                score.tp += 1;
                match m.cmp(n) {
                    std::cmp::Ordering::Equal => score.exact_count_hits += 1,
                    std::cmp::Ordering::Less => score.counts_too_few += 1,
                    std::cmp::Ordering::Greater => score.counts_too_many += 1,
                }
            }
            None => score.fn_ += 1,
        }
    }
    score.fp = predicted.keys().filter(|k| !truth.contains_key(k)).count();
    score
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{generate_scene, SceneConfig, HELDOUT_SEED_BASE};

    #[test]
    fn scene_caption_round_trip() {
        for seed in 0..500u64 {
            let s = generate_scene(&SceneConfig::varied(seed), HELDOUT_SEED_BASE + seed);
            let p = parse_caption(&s.caption());
            assert_eq!(p.pairs, s.pair_counts(), "{}", s.caption());
            assert_eq!(p.word, s.word, "{}", s.caption());
        }
    }

    #[test]
    fn scene_parser_tolerance() {
        let p = parse_caption("Two red circles and a blue square.");
        assert_eq!(
            p.pairs,
            vec![
                (Colour::Red, Shape::Circle, 2),
                (Colour::Blue, Shape::Square, 1)
            ]
        );
        assert_eq!(p.word, None);

        let p = parse_caption("3 GREEN triangles");
        assert_eq!(p.pairs, vec![(Colour::Green, Shape::Triangle, 3)]);

        // Stray words, duplicates merged, an "an", a plural without a count, canonical order.
        let p = parse_caption(
            "I see an orange star, one red circle,and two big red circles; also purple stars!! \
             the word is \"milk\"",
        );
        assert_eq!(
            p.pairs,
            vec![
                (Colour::Red, Shape::Circle, 3),
                (Colour::Purple, Shape::Star, 2),
                (Colour::Orange, Shape::Star, 1),
            ]
        );
        assert_eq!(p.word.as_deref(), Some("MILK"));

        // Shapes without colours and colours without shapes are ignored; zero counts dropped.
        let p =
            parse_caption("a circle, some blue, zero yellow squares. The word \"SUN\" is written.");
        assert_eq!(p.pairs, vec![]);
        assert_eq!(p.word.as_deref(), Some("SUN"));

        assert_eq!(parse_caption(""), ParsedCaption::default());
        assert_eq!(
            parse_caption("One Yellow Star.").pairs,
            vec![(Colour::Yellow, Shape::Star, 1)]
        );
    }

    #[test]
    fn scene_score_pairs_exact_numbers() {
        let truth = [
            (Colour::Red, Shape::Circle, 2),
            (Colour::Blue, Shape::Square, 1),
            (Colour::Green, Shape::Triangle, 3),
        ];
        let predicted = [
            (Colour::Red, Shape::Circle, 2),
            (Colour::Blue, Shape::Square, 2),
            (Colour::Yellow, Shape::Star, 1),
        ];
        let s = score_pairs(&truth, &predicted);
        assert_eq!(
            s,
            PairScore {
                tp: 2,
                fp: 1,
                fn_: 1,
                exact_count_hits: 1,
                counts_too_few: 0,
                counts_too_many: 1,
                truth_pairs: 3
            }
        );
        assert!((s.precision() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.exact_count_rate() - 1.0 / 3.0).abs() < 1e-12);
        let fewer = score_pairs(&truth, &[(Colour::Green, Shape::Triangle, 1)]);
        assert_eq!((fewer.counts_too_few, fewer.counts_too_many), (1, 0));

        // Perfect match; duplicates in the prediction are summed before comparing.
        let one = [(Colour::Yellow, Shape::Star, 2)];
        let dup = [
            (Colour::Yellow, Shape::Star, 1),
            (Colour::Yellow, Shape::Star, 1),
        ];
        let p = score_pairs(&one, &dup);
        assert_eq!(
            p,
            PairScore {
                tp: 1,
                fp: 0,
                fn_: 0,
                exact_count_hits: 1,
                counts_too_few: 0,
                counts_too_many: 0,
                truth_pairs: 1
            }
        );

        // Empty prediction.
        let e = score_pairs(&truth, &[]);
        assert_eq!(
            (e.tp, e.fp, e.fn_, e.exact_count_hits, e.truth_pairs),
            (0, 0, 3, 0, 3)
        );
        assert_eq!(e.precision(), 0.0);
        assert_eq!(e.recall(), 0.0);

        let mut total = PairScore::default();
        total.add(&s);
        total.add(&p);
        total.add(&e);
        assert_eq!(
            total,
            PairScore {
                tp: 3,
                fp: 1,
                fn_: 4,
                exact_count_hits: 2,
                counts_too_few: 0,
                counts_too_many: 1,
                truth_pairs: 7
            }
        );
        assert!((total.precision() - 0.75).abs() < 1e-12);
        assert!((total.recall() - 3.0 / 7.0).abs() < 1e-12);
        assert!((total.exact_count_rate() - 2.0 / 7.0).abs() < 1e-12);
    }
}
