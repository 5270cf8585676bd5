//! Runner properties with a deterministic test double for the model (the hash backend):
//! an interrupted run resumed equals an uninterrupted one, no item is scored twice, shards
//! partition the work and merge into the unsharded result, journals of other runs are refused.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use afm_eval::discovery::{load, Filters, LoadOptions, Suite};
use afm_eval::fake_backend::HashBackend;
use afm_eval::journal::{read_records, JOURNAL};
use afm_eval::merge::merge;
use afm_eval::runner::{run, RunConfig};
use afm_eval::shard::Shard;

/// MMLU (3 subjects x 7), MGSM (en, fr x 7), MMMLU (FR-FR, one subject) and JSONL fixtures.
fn suite() -> Option<Suite> {
    let bench = common::bench()?;
    let opts = LoadOptions {
        filters: Filters {
            subjects: vec![
                "anatomy".into(),
                "virology".into(),
                "elementary_mathematics".into(),
            ],
            languages: vec!["en".into(), "fr".into()],
            limit: Some(7),
            ..Default::default()
        },
        split: "test".into(),
        mmlu_dev: true,
        ..Default::default()
    };
    let dirs = [
        bench.join("mmlu"),
        bench.join("mgsm"),
        common::fixtures().join("mmmlu"),
        common::fixtures().join("jsonl"),
    ];
    Some(load(&dirs, &opts).unwrap())
}

fn cfg(out: &Path) -> RunConfig {
    RunConfig {
        out: out.to_path_buf(),
        batch_size: 3,
        progress: false,
        ..Default::default()
    }
}

/// results.json without the wall-clock figures.
fn comparable(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("timings");
    v
}

fn journal_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(JOURNAL))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_and_scores_nothing_twice() {
    let Some(suite) = suite() else { return };
    let n = suite.items.len();
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));

    let mut backend = HashBackend::default();
    let results = run(&suite, &mut backend, &cfg(&full)).unwrap();
    assert_eq!(backend.scored, n);
    assert_eq!(results.items.len(), n);

    // The "kill": the backend dies after 10 items (batches of up to 3 within a prompt group,
    // so 10 are journaled), and the last journal line is torn, as a kill during a write
    // leaves it.
    let mut dying = HashBackend {
        fail_after: Some(10),
        ..Default::default()
    };
    let err = run(&suite, &mut dying, &cfg(&cut)).unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    let done = journal_lines(&cut).len();
    assert_eq!(done, 10);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cut.join(JOURNAL))
        .unwrap();
    f.write_all(b"{\"key\":\"mmlu/virology/3\",\"task\":\"mm")
        .unwrap();
    drop(f);
    assert!(!cut.join("results.json").exists());

    // Without --resume the journal is protected.
    let err = run(&suite, &mut HashBackend::default(), &cfg(&cut)).unwrap_err();
    assert!(err.to_string().contains("add --resume"), "{err}");

    let mut again = HashBackend::default();
    let resume = RunConfig {
        resume: true,
        ..cfg(&cut)
    };
    run(&suite, &mut again, &resume).unwrap();
    assert_eq!(again.scored, n - done, "only the missing items are scored");
    assert_eq!(comparable(&cut), comparable(&full));
    let lines = journal_lines(&cut);
    assert_eq!(lines.len(), n, "torn line cut, every item once");
    let (records, _) = read_records(&cut.join(JOURNAL)).unwrap();
    assert_eq!(records.len(), n);

    // Resuming a finished run scores nothing and changes nothing.
    let mut idle = HashBackend::default();
    run(&suite, &mut idle, &resume).unwrap();
    assert_eq!(idle.scored, 0);
    assert_eq!(comparable(&cut), comparable(&full));
}

#[test]
fn resume_refuses_a_different_run() {
    let Some(suite) = suite() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    run(
        &suite,
        &mut HashBackend {
            fail_after: Some(4),
            ..Default::default()
        },
        &cfg(&out),
    )
    .unwrap_err();
    let mut other = RunConfig {
        resume: true,
        ..cfg(&out)
    };
    other.prompt.mmlu_shots = 3;
    let err = run(&suite, &mut HashBackend::default(), &other).unwrap_err();
    assert!(
        err.to_string().contains("belongs to a different run"),
        "{err}"
    );
    let other_shard = RunConfig {
        resume: true,
        shard: "1/2".parse().unwrap(),
        ..cfg(&out)
    };
    assert!(run(&suite, &mut HashBackend::default(), &other_shard).is_err());
    // Batch size and prefix reuse only change speed: resuming with others is fine.
    let faster = RunConfig {
        resume: true,
        batch_size: 5,
        reuse_prefix: false,
        ..cfg(&out)
    };
    run(&suite, &mut HashBackend::default(), &faster).unwrap();
}

#[test]
fn shards_partition_and_merge_to_the_unsharded_result() {
    let Some(suite) = suite() else { return };
    let n = suite.items.len();
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    run(&suite, &mut HashBackend::default(), &cfg(&whole)).unwrap();

    let count = 3;
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut seen = Vec::new();
    for k in 0..count {
        let dir = tmp.path().join(format!("shard{k}"));
        let shard = Shard { index: k, count };
        let r = run(
            &suite,
            &mut HashBackend::default(),
            &RunConfig { shard, ..cfg(&dir) },
        )
        .unwrap();
        assert!(r.items.len() == n / 3 || r.items.len() == n / 3 + 1);
        seen.extend(r.items.iter().map(|i| i.key.clone()));
        dirs.push(dir);
    }
    let mut all: Vec<String> = suite.items.iter().map(|i| i.key()).collect();
    all.sort();
    seen.sort();
    assert_eq!(seen, all, "every item in exactly one shard");

    // Shards given in any order merge to the unsharded results.
    let merged = tmp.path().join("merged");
    dirs.reverse();
    let m = merge(&dirs, &merged).unwrap();
    assert_eq!(m.shards.len(), 3);
    let mut a = comparable(&merged);
    let mut b = comparable(&whole);
    a.as_object_mut().unwrap().remove("shards");
    b.as_object_mut().unwrap().remove("shards");
    assert_eq!(a, b);

    // Missing, duplicated and incomplete shards are refused.
    assert!(merge(&dirs[..2], &tmp.path().join("m2"))
        .unwrap_err()
        .to_string()
        .contains("2 shards given"));
    let dup = [dirs[0].clone(), dirs[0].clone(), dirs[1].clone()];
    assert!(merge(&dup, &tmp.path().join("m3"))
        .unwrap_err()
        .to_string()
        .contains("given twice"));
    let partial = tmp.path().join("partial");
    let shard = Shard { index: 1, count };
    let _ = run(
        &suite,
        &mut HashBackend {
            fail_after: Some(3),
            ..Default::default()
        },
        &RunConfig {
            shard,
            ..cfg(&partial)
        },
    );
    let mixed = [dirs[0].clone(), partial, dirs[2].clone()];
    let err = merge(&mixed, &tmp.path().join("m4"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("incomplete"), "{err}");
}

#[test]
fn shard_ranges() {
    for total in [0usize, 1, 7, 44, 14042] {
        for count in 1..6 {
            let mut next = 0;
            for index in 0..count {
                let r = Shard { index, count }.range(total);
                assert_eq!(r.start, next);
                assert!(r.len() == total / count || r.len() == total / count + 1);
                next = r.end;
            }
            assert_eq!(next, total);
        }
    }
    assert!("3/3".parse::<Shard>().is_err());
    assert!("1/0".parse::<Shard>().is_err());
    assert_eq!(
        "2/4".parse::<Shard>().unwrap(),
        Shard { index: 2, count: 4 }
    );
}

#[test]
fn reports_summarise_by_task_subset_and_subject() {
    let Some(suite) = suite() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let r = run(&suite, &mut HashBackend::default(), &cfg(tmp.path())).unwrap();
    let keys: Vec<&str> = r.tasks.keys().map(|t| t.name()).collect();
    assert_eq!(keys, ["mmlu", "mmmlu", "mgsm", "jsonl"]);
    let mmlu = &r.tasks[&afm_eval::item::Task::Mmlu];
    assert_eq!(mmlu.n, 21);
    let subj: Vec<&String> = mmlu.subsets.keys().collect();
    assert_eq!(subj, ["anatomy", "elementary_mathematics", "virology"]);
    let correct: usize = mmlu.subsets.values().map(|t| t.correct).sum();
    assert_eq!(correct, mmlu.correct);
    assert!((mmlu.micro - mmlu.correct as f64 / 21.0).abs() < 1e-12);
    let macro_ = mmlu.subsets.values().map(|t| t.accuracy).sum::<f64>() / 3.0;
    assert!((mmlu.macro_ - macro_).abs() < 1e-12);
    let mmmlu = &r.tasks[&afm_eval::item::Task::Mmmlu];
    assert_eq!(
        mmmlu.subsets.keys().collect::<Vec<_>>(),
        ["FR-FR"],
        "--languages en,fr"
    );
    assert_eq!(
        mmmlu.subjects.keys().collect::<Vec<_>>(),
        ["elementary_mathematics"]
    );
    // Generations are cut at the stop string and scored by their last number.
    let g = r.items.iter().find(|i| i.key == "mgsm/en/0").unwrap();
    let text = g.generation.as_deref().unwrap();
    assert!(!text.contains("\n\n") && text.ends_with('.'), "{text:?}");
    assert_eq!(
        Some(g.prediction.clone()),
        afm_eval::scoring::last_number(text)
    );
    // The checksums of every file read are reported.
    assert!(r
        .data
        .iter()
        .any(|d| d.path.ends_with("anatomy_test.csv") && d.sha256.len() == 64));

    let md = std::fs::read_to_string(tmp.path().join("results.md")).unwrap();
    let header = "| Model | MMLU | MMMLU | MGSM | JSONL |\n| --- | ---: | ---: | ---: | ---: |\n| hash-backend |";
    assert!(md.contains(header), "{md}");
    assert!(md.contains("## MMLU, 5-shot\n\n21 items: micro"));
    assert!(md.contains("| Subject | Items | Correct | Accuracy |"));
    assert!(md.contains("## MGSM, 8-shot chain of thought"));
    assert!(md.contains(
        "| Language | Items | Correct | Accuracy |\n| --- | ---: | ---: | ---: |\n| en | 7 |"
    ));
}
