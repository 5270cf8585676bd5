//! Reading the benchmark formats: real MMLU and MGSM files, MMMLU and JSONL fixtures.

mod common;

use afm_eval::discovery::{load, Filters, LoadOptions};
use afm_eval::item::{Answer, Task};
use afm_eval::mgsm::read_exemplars;

fn opts(filters: Filters) -> LoadOptions {
    LoadOptions {
        filters,
        split: "test".into(),
        mmlu_dev: true,
        ..Default::default()
    }
}

#[test]
fn whole_bench_folder_is_discovered_with_the_documented_counts() {
    let Some(bench) = common::bench() else { return };
    let suite = load(&[bench], &opts(Filters::default())).unwrap();
    let count = |t: Task| suite.items.iter().filter(|i| i.task == t).count();
    assert_eq!(count(Task::Mmlu), 14042, "MMLU test rows (README: 14042)");
    assert_eq!(count(Task::Mgsm), 11 * 250, "MGSM rows");
    assert_eq!(suite.mmlu_dev.len(), 57);
    assert!(suite.mmlu_dev.values().all(|d| d.len() == 5));
    assert_eq!(suite.mgsm.len(), 11);
    // 57 test + 57 dev + 11 TSV + exemplars.json, each with a SHA-256.
    assert_eq!(suite.files.len(), 57 + 57 + 11 + 1);
    assert!(suite.files.iter().all(|f| f.sha256.len() == 64));
    assert!(suite.skipped.is_empty());
    // Canonical order: task, subset, index.
    let keys: Vec<_> = suite
        .items
        .iter()
        .map(|i| (i.task, i.subset.clone(), i.index))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn mmlu_rows_with_quotes_commas_and_newlines_parse_exactly() {
    let Some(bench) = common::bench() else { return };
    let f = Filters {
        subjects: vec!["abstract_algebra".into()],
        ..Default::default()
    };
    let suite = load(&[bench.join("mmlu")], &opts(f)).unwrap();
    assert_eq!(suite.items.len(), 100);
    let first = &suite.items[0];
    assert_eq!(first.key(), "mmlu/abstract_algebra/0");
    assert_eq!(
        first.question,
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    );
    assert_eq!(
        first.answer,
        Answer::Choice {
            choices: vec!["0".into(), "4".into(), "2".into(), "6".into()],
            correct: 1
        }
    );
    assert_eq!(first.line, 1);
    // Every row's line number points at its first line in the file.
    let text = std::fs::read_to_string(&first.path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for it in &suite.items {
        let l = lines[it.line - 1];
        let start: String = it.question.chars().take(10).collect();
        assert!(
            l.trim_start_matches('"').starts_with(&start),
            "line {} of {} ({l:?}) does not start item {}",
            it.line,
            first.path.display(),
            it.key()
        );
    }
}

#[test]
fn mmlu_multiline_fields_survive() {
    let Some(bench) = common::bench() else { return };
    // Some subject has a question with a newline inside a quoted field.
    let suite = load(&[bench.join("mmlu")], &opts(Filters::default())).unwrap();
    let multi = suite
        .items
        .iter()
        .filter(|i| i.question.contains('\n'))
        .count();
    assert!(
        multi > 100,
        "expected many multi-line questions, found {multi}"
    );
}

#[test]
fn mgsm_answers_drop_thousands_commas_and_exemplars_give_language_prefixes() {
    let Some(bench) = common::bench() else { return };
    let f = Filters {
        tasks: vec![Task::Mgsm],
        languages: vec!["en".into()],
        ..Default::default()
    };
    let suite = load(std::slice::from_ref(&bench), &opts(f)).unwrap();
    assert_eq!(suite.items.len(), 250);
    let by_row = |row: usize| match &suite.items[row - 1].answer {
        Answer::Number { value } => value.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(by_row(147), "2125");
    assert_eq!(by_row(202), "114200");
    assert_eq!(by_row(231), "276000");
    assert_eq!(by_row(250), "5600");
    assert_eq!(by_row(1), "18");

    let (styles, _) = read_exemplars(&bench.join("mgsm/exemplars.json")).unwrap();
    let s = |l: &str| {
        (
            styles[l].question_prefix.as_str(),
            styles[l].answer_prefix.as_str(),
        )
    };
    assert_eq!(s("en"), ("Question: ", "Step-by-Step Answer:"));
    assert_eq!(s("fr"), ("Question : ", "Réponse étape par étape :"));
    assert_eq!(s("ja"), ("問題：", "ステップごとの答え："));
    assert_eq!(s("zh"), ("问题：", "逐步解答："));
    assert!(styles.values().all(|st| st.shots.len() == 8));
}

#[test]
fn mgsm_spanish_quotes_are_not_csv_quoting() {
    let Some(bench) = common::bench() else { return };
    let f = Filters {
        tasks: vec![Task::Mgsm],
        languages: vec!["es".into()],
        ..Default::default()
    };
    let suite = load(&[bench], &opts(f)).unwrap();
    assert_eq!(suite.items.len(), 250);
    assert!(
        suite.items[213].question.contains('"'),
        "row 214 keeps its quotes"
    );
}

#[test]
fn mmmlu_fixtures_parse_with_header_language_and_subject() {
    let f = Filters::default();
    let suite = load(&[common::fixtures().join("mmmlu")], &opts(f)).unwrap();
    assert_eq!(suite.items.len(), 8);
    let fr: Vec<_> = suite.items.iter().filter(|i| i.subset == "FR-FR").collect();
    assert_eq!(fr.len(), 5);
    assert_eq!(
        fr[3].question,
        "Laquelle de ces affirmations est vraie, selon la loi d'Ohm ?"
    );
    assert_eq!(
        fr[4].question,
        "Un texte sur\ndeux lignes : quelle est la réponse ?"
    );
    assert_eq!(fr[4].line, 6);
    assert_eq!(fr[4].subject.as_deref(), Some("elementary_mathematics"));
    assert_eq!(
        fr[4].answer,
        Answer::Choice {
            choices: vec![
                "oui".into(),
                "non".into(),
                "peut-être, parfois".into(),
                "jamais".into()
            ],
            correct: 3
        }
    );
    // --languages fr matches FR-FR; --subjects filters on the Subject column.
    let f = Filters {
        languages: vec!["fr".into()],
        subjects: vec!["elementary_mathematics".into()],
        ..Default::default()
    };
    let suite = load(&[common::fixtures().join("mmmlu")], &opts(f)).unwrap();
    let keys: Vec<String> = suite.items.iter().map(|i| i.key()).collect();
    assert_eq!(keys, ["mmmlu/FR-FR/1", "mmmlu/FR-FR/4"]);
}

#[test]
fn jsonl_choice_and_generation_items() {
    let suite = load(
        &[common::fixtures().join("jsonl")],
        &opts(Filters::default()),
    )
    .unwrap();
    let answers: Vec<&Answer> = suite.items.iter().map(|i| &i.answer).collect();
    assert_eq!(suite.items.len(), 5);
    assert!(matches!(answers[0], Answer::Choice { correct: 1, .. }));
    assert!(matches!(answers[1], Answer::Choice { correct: 1, .. }));
    assert!(matches!(answers[2], Answer::Choice { correct: 1, .. }));
    assert_eq!(answers[3], &Answer::Number { value: "8".into() });
    assert_eq!(
        answers[4],
        &Answer::Text {
            value: "Paris".into()
        }
    );
    assert_eq!(
        suite.items[2].line, 4,
        "blank line 3 is skipped, numbering is kept"
    );
}

#[test]
fn filters_and_limit() {
    let Some(bench) = common::bench() else { return };
    let f = Filters {
        tasks: vec![Task::Mmlu, Task::Mgsm],
        subjects: vec!["anatomy".into(), "virology".into()],
        languages: vec!["de".into(), "ja".into()],
        limit: Some(3),
    };
    let suite = load(&[bench], &opts(f)).unwrap();
    let keys: Vec<String> = suite.items.iter().map(|i| i.key()).collect();
    assert_eq!(
        keys,
        [
            "mmlu/anatomy/0",
            "mmlu/anatomy/1",
            "mmlu/anatomy/2",
            "mmlu/virology/0",
            "mmlu/virology/1",
            "mmlu/virology/2",
            "mgsm/de/0",
            "mgsm/de/1",
            "mgsm/de/2",
            "mgsm/ja/0",
            "mgsm/ja/1",
            "mgsm/ja/2",
        ]
    );
}
