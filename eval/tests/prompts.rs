//! Prompt text and answer extraction, exactly.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use afm_eval::discovery::{load, Filters, LoadOptions, Suite};
use afm_eval::item::{Answer, Item, Shot, Task};
use afm_eval::mgsm::MgsmStyle;
use afm_eval::prompt::{build, ChatFrame, Completion, PromptConfig};
use afm_eval::scoring::{argmax, last_number, same_number};

fn mc_item(task: Task, subset: &str, subject: &str) -> Item {
    Item {
        task,
        subset: subset.into(),
        subject: Some(subject.into()),
        index: 0,
        path: PathBuf::from("x.csv"),
        line: 1,
        question: "What is 2+2?".into(),
        answer: Answer::Choice {
            choices: vec!["3".into(), "4".into(), "5".into(), "22".into()],
            correct: 1,
        },
    }
}

fn shot(q: &str, correct: usize) -> Shot {
    Shot {
        question: q.into(),
        choices: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        correct,
        solution: String::new(),
    }
}

fn suite_with_dev() -> Suite {
    let mut dev = BTreeMap::new();
    dev.insert(
        "high_school_mathematics".to_string(),
        vec![shot("Q1?", 0), shot("Q2?", 3), shot("Q3?", 2)],
    );
    Suite {
        mmlu_dev: dev,
        ..Default::default()
    }
}

#[test]
fn mmlu_prompt_is_the_hendrycks_format() {
    let cfg = PromptConfig {
        mmlu_shots: 2,
        ..Default::default()
    };
    let item = mc_item(
        Task::Mmlu,
        "high_school_mathematics",
        "high_school_mathematics",
    );
    let p = build(&item, &suite_with_dev(), &cfg).unwrap();
    assert_eq!(
        p.prefix,
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n\
         Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n\
         Q2?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
    );
    assert_eq!(p.body, "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:");
    assert_eq!(p.group, "mmlu/high_school_mathematics");
    assert_eq!(
        p.completion,
        Completion::Choice {
            continuations: vec![" A".into(), " B".into(), " C".into(), " D".into()]
        }
    );
    // More shots than dev examples is an error naming the item.
    let cfg = PromptConfig {
        mmlu_shots: 5,
        ..Default::default()
    };
    let err = build(&item, &suite_with_dev(), &cfg)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "x.csv:1: 5-shot prompt but subject \"high_school_mathematics\" has 3 dev examples"
    );
}

#[test]
fn mmmlu_is_zero_shot_by_default_and_groups_by_language_and_subject() {
    let item = mc_item(Task::Mmmlu, "FR-FR", "high_school_mathematics");
    let p = build(&item, &suite_with_dev(), &PromptConfig::default()).unwrap();
    assert_eq!(
        p.prefix,
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
    );
    assert_eq!(p.group, "mmmlu/FR-FR/high_school_mathematics");
    let cfg = PromptConfig {
        mmmlu_shots: 1,
        ..Default::default()
    };
    let p = build(&item, &suite_with_dev(), &cfg).unwrap();
    assert!(p
        .prefix
        .ends_with("Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"));
}

#[test]
fn mgsm_prompt_uses_the_language_exemplars_and_prefixes() {
    let Some(bench) = common::bench() else { return };
    let opts = LoadOptions {
        filters: Filters {
            tasks: vec![Task::Mgsm],
            languages: vec!["en".into(), "ja".into()],
            limit: Some(1),
            ..Default::default()
        },
        split: "test".into(),
        ..Default::default()
    };
    let suite = load(&[bench], &opts).unwrap();
    let cfg = PromptConfig::default();
    let en = build(&suite.items[0], &suite, &cfg).unwrap();
    assert!(en.prefix.starts_with(
        "Question: Roger has 5 tennis balls. He buys 2 more cans of tennis balls. Each can has 3 tennis balls. How many tennis balls does he have now?\n\
         Step-by-Step Answer: Roger started with 5 balls. 2 cans of 3 tennis balls each is 6 tennis balls. 5 + 6 = 11. The answer is 11.\n\n\
         Question: There were nine computers"
    ));
    assert_eq!(en.prefix.matches("\nStep-by-Step Answer: ").count(), 8);
    assert!(en.prefix.ends_with("\n\n"));
    assert_eq!(
        en.body,
        format!(
            "Question: {}\nStep-by-Step Answer:",
            suite.items[0].question
        )
    );
    assert_eq!(
        en.completion,
        Completion::Generate {
            stop: vec!["\n\n".into(), "Question:".into()]
        }
    );
    let ja = build(&suite.items[1], &suite, &cfg).unwrap();
    assert!(ja.prefix.starts_with("問題：ロジャーは"));
    assert_eq!(
        ja.body,
        format!("問題：{}\nステップごとの答え：", suite.items[1].question)
    );
    // --shots mgsm=0 keeps the format without exemplars.
    let mut zero = PromptConfig::default();
    zero.set_shots("mgsm=0").unwrap();
    assert_eq!(build(&suite.items[0], &suite, &zero).unwrap().prefix, "");
}

#[test]
fn mgsm_without_exemplars_needs_zero_shots() {
    let item = Item {
        task: Task::Mgsm,
        subset: "xx".into(),
        subject: None,
        index: 0,
        path: PathBuf::from("mgsm_xx.tsv"),
        line: 3,
        question: "Q".into(),
        answer: Answer::Number { value: "1".into() },
    };
    let err = build(&item, &Suite::default(), &PromptConfig::default()).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("mgsm_xx.tsv:3: no exemplars for language \"xx\""));
    let mut cfg = PromptConfig::default();
    cfg.set_shots("mgsm=0").unwrap();
    let p = build(&item, &Suite::default(), &cfg).unwrap();
    assert_eq!(p.body, "Question: Q\nStep-by-Step Answer:");
    let _ = MgsmStyle::english_default();
}

#[test]
fn shots_option() {
    let mut c = PromptConfig::default();
    c.set_shots("3").unwrap();
    assert_eq!((c.mmlu_shots, c.mmmlu_shots, c.mgsm_shots), (3, 3, 3));
    c.set_shots("mmlu=0, mmmlu=5").unwrap();
    assert_eq!((c.mmlu_shots, c.mmmlu_shots, c.mgsm_shots), (0, 5, 3));
    assert!(c.set_shots("x=1").is_err());
    assert!(c.set_shots("mmlu=-1").is_err());
}

#[test]
fn chat_frame_shares_the_prefix() {
    let wrap = |u: &str| {
        Ok(format!(
            "<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"
        ))
    };
    let frame = ChatFrame::new(wrap).unwrap();
    let cfg = PromptConfig {
        mmlu_shots: 1,
        chat: true,
        ..Default::default()
    };
    let item = mc_item(
        Task::Mmlu,
        "high_school_mathematics",
        "high_school_mathematics",
    );
    let mut p = build(&item, &suite_with_dev(), &cfg).unwrap();
    let plain = format!("{}{}", p.prefix, p.body);
    frame.apply(&mut p);
    assert_eq!(format!("{}{}", p.prefix, p.body), wrap(&plain).unwrap());
    assert!(p.prefix.starts_with("<|im_start|>user\nThe following"));
    assert!(p
        .body
        .ends_with("Answer:<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(
        p.completion,
        Completion::Choice {
            continuations: vec!["A".into(), "B".into(), "C".into(), "D".into()]
        }
    );
}

#[test]
fn last_number_extraction() {
    let cases = [
        ("The answer is 18.", Some("18")),
        ("5 + 6 = 11. The answer is 1,250.", Some("1250")),
        ("She owes -3 dollars", Some("-3")),
        ("It costs $3.50 in total", Some("3.50")),
        ("答えは11です。", Some("11")),
        ("1, 2, and 3", Some("3")),
        ("no digits here", None),
        ("Ends with a full stop 42.", Some("42")),
    ];
    for (text, want) in cases {
        assert_eq!(last_number(text).as_deref(), want, "{text:?}");
    }
    assert!(same_number("18", "18.0"));
    assert!(same_number("1,250", "1250"));
    assert!(!same_number("18", "19"));
    assert_eq!(argmax(&[-1.0, -0.5, -0.5, -2.0]), Some(1), "first on ties");
    assert_eq!(argmax(&[]), None);
}

#[test]
fn mmmlu_few_shot_takes_english_dev_of_the_row_subject() {
    let Some(bench) = common::bench() else { return };
    let opts = LoadOptions {
        filters: Filters {
            tasks: vec![Task::Mmmlu],
            languages: vec!["fr".into()],
            ..Default::default()
        },
        split: "test".into(),
        mmmlu_dev: true,
        dev_dir: Some(bench.join("mmlu/dev")),
        ..Default::default()
    };
    let suite = load(&[common::fixtures().join("mmmlu")], &opts).unwrap();
    assert_eq!(
        suite.items.len(),
        5,
        "MMLU test items are not loaded for --tasks mmmlu"
    );
    assert_eq!(suite.mmlu_dev.len(), 57);
    let mut cfg = PromptConfig::default();
    cfg.set_shots("mmmlu=5").unwrap();
    let item = &suite.items[1];
    assert_eq!(item.subject.as_deref(), Some("elementary_mathematics"));
    let p = build(item, &suite, &cfg).unwrap();
    let dev = &suite.mmlu_dev["elementary_mathematics"];
    assert!(p.prefix.starts_with(
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    ));
    assert!(p.prefix.contains(&dev[4].question));
    assert_eq!(p.prefix.matches("\nAnswer: ").count(), 5);
    assert_eq!(
        p.body,
        "Combien de côtés a un hexagone ?\nA. 4\nB. 5\nC. 6\nD. 8\nAnswer:"
    );
}
