//! Turning model outputs into verdicts.

use crate::item::{letter, Answer, Item};
use crate::journal::ItemResult;
use crate::mgsm::normalise_number;

/// Index of the highest log-likelihood (the first on ties).
pub fn argmax(lls: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in lls.iter().enumerate() {
        match best {
            Some(b) if v <= lls[b] => {}
            _ => best = Some(i),
        }
    }
    best
}

/// The last number in `text`, commas removed (`"… is 1,250."` → `"1250"`), as MGSM scores.
/// A number is an optional `-`, digits with `,` or `.` between them.
pub fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut last = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = if i > 0 && chars[i - 1] == '-' {
                i - 1
            } else {
                i
            };
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || ((chars[j] == ',' || chars[j] == '.')
                        && chars.get(j + 1).is_some_and(char::is_ascii_digit)))
            {
                j += 1;
            }
            last = Some(
                chars[start..j]
                    .iter()
                    .filter(|&&c| c != ',')
                    .collect::<String>(),
            );
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

/// Do two numbers written as text agree (`"18"` = `"18.0"`)?
pub fn same_number(a: &str, b: &str) -> bool {
    match (normalise_number(a), normalise_number(b)) {
        (Some(x), Some(y)) => x == y || x.parse::<f64>().ok() == y.parse::<f64>().ok(),
        _ => false,
    }
}

/// Score a multiple-choice item from its continuation log-likelihoods.
pub fn score_choice(item: &Item, lls: Vec<f64>) -> ItemResult {
    let pred = argmax(&lls);
    let correct = match &item.answer {
        Answer::Choice { correct, .. } => pred == Some(*correct),
        _ => false,
    };
    ItemResult {
        prediction: pred.map(letter).unwrap_or_default(),
        correct,
        logliks: Some(lls),
        generation: None,
        ..ItemResult::for_item(item)
    }
}

/// Score a generation item: the last number (numeric answers) or the first line (text).
pub fn score_generation(item: &Item, text: String) -> ItemResult {
    let (prediction, correct) = match &item.answer {
        Answer::Number { value } => {
            let got = last_number(&text);
            let ok = got.as_deref().is_some_and(|g| same_number(g, value));
            (got.unwrap_or_default(), ok)
        }
        Answer::Text { value } => {
            let got = text.trim().lines().next().unwrap_or("").trim().to_string();
            let ok = got == *value;
            (got, ok)
        }
        Answer::Choice { .. } => (String::new(), false),
    };
    ItemResult {
        prediction,
        correct,
        logliks: None,
        generation: Some(text),
        ..ItemResult::for_item(item)
    }
}
