//! Apple's AFM tokenizer and chat format (issue 19, acceptance 3), with tamm as the oracle:
//! SentencePiece models trained inside the test (unigram and BPE, byte fallback, `<n>`), in the
//! toolkit's layout (`tokenizer.model` + tamm's `tokenizer-config.json` adding `<turn_start>` /
//! `<turn_end>`), read by our native SentencePiece implementation. Token ids must equal tamm's
//! `AFMTokenizer` on 220 strings (scripts, digits, runs of spaces and newlines, emoji, byte
//! fallback) and tamm's AFM v6 chat preprocessor on 24 conversations; decoding round-trips as
//! tamm's does.

mod common;

use afm_text::{ChatMessage, Tokenizer};
use common::*;

#[test]
fn afm_tokenizer_and_chat_format_equal_tamm() {
    let py = venv_python_with("sentencepiece").expect("sentencepiece is a pinned test requirement");
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new(py)
        .arg(repo_root().join("text/tests/reference/tamm_tokenizer.py"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "reference script failed");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("reference.json")).unwrap())
            .unwrap();
    let strings: Vec<String> = serde_json::from_value(r["strings"].clone()).unwrap();
    let convs: Vec<Vec<ChatMessage>> = r["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect()
        })
        .collect();
    assert!(strings.len() >= 200 && convs.len() >= 20);
    for kind in ["unigram", "bpe"] {
        let d = dir.path().join(kind);
        let tok = Tokenizer::from_tamm(
            &d.join("tokenizer.model"),
            Some(&d.join("tokenizer-config.json")),
        )
        .unwrap();
        let m = &r["models"][kind];
        assert_eq!(tok.vocab_size() as u64, m["vocab_size"].as_u64().unwrap());
        let mut mismatches = Vec::new();
        for (i, s) in strings.iter().enumerate() {
            let want: Vec<u32> = serde_json::from_value(m["ids"][i].clone()).unwrap();
            let got = tok.encode(s).unwrap();
            if got != want {
                mismatches.push(format!("{s:?}: ours {got:?} tamm {want:?}"));
            }
            let dec = tok.decode(&got, true).unwrap();
            assert_eq!(
                dec,
                m["decoded"][i].as_str().unwrap(),
                "{kind}: decode of {s:?}"
            );
        }
        assert!(
            mismatches.is_empty(),
            "{kind}: {} of {} strings differ:\n{}",
            mismatches.len(),
            strings.len(),
            mismatches.join("\n")
        );
        for (i, c) in convs.iter().enumerate() {
            let want: Vec<u32> = serde_json::from_value(m["chat"][i].clone()).unwrap();
            assert_eq!(
                tok.encode_chat(c, true).unwrap(),
                want,
                "{kind}: conversation {i}"
            );
        }
    }
}
