//! Malformed inputs: an error naming file and line, or with `--skip-bad` a record of the bad
//! row and the rest evaluated.

use std::path::{Path, PathBuf};

use afm_eval::discovery::{load, Filters, LoadOptions, Suite};
use afm_eval::EvalError;

fn write(dir: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn opts(skip_bad: bool) -> LoadOptions {
    LoadOptions {
        filters: Filters::default(),
        split: "test".into(),
        skip_bad,
        ..Default::default()
    }
}

fn try_load(dir: &Path, skip_bad: bool) -> Result<Suite, EvalError> {
    load(&[dir.to_path_buf()], &opts(skip_bad))
}

const GOOD: &str = "\"What is 1+1?\",1,2,3,4,B\n";

fn mmlu_with(bad_row: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.extend_from_slice(b"\"A question\nover two lines\",a,b,c,d,A\n");
    bytes.extend_from_slice(bad_row);
    bytes.extend_from_slice(b"Last,1,2,3,4,D\n");
    let p = write(dir.path(), "test/toy_test.csv", &bytes);
    (dir, p)
}

fn assert_error(dir: &Path, expected: String) {
    let err = try_load(dir, false).unwrap_err();
    assert_eq!(err.to_string(), expected);
}

fn assert_skipped(dir: &Path, path: &Path, line: usize, keys: &[&str]) {
    let suite = try_load(dir, true).unwrap();
    assert_eq!(suite.skipped.len(), 1, "{:?}", suite.skipped);
    assert_eq!(suite.skipped[0].path, path.display().to_string());
    assert_eq!(suite.skipped[0].line, line);
    let got: Vec<String> = suite.items.iter().map(|i| i.key()).collect();
    assert_eq!(
        got, keys,
        "the bad row keeps its slot: later keys do not shift"
    );
}

#[test]
fn csv_row_with_five_columns() {
    let (dir, p) = mmlu_with(b"Q,1,2,3,C\n");
    assert_error(
        dir.path(),
        format!(
            "{}:4: expected 6 columns (question,A,B,C,D,answer), found 5",
            p.display()
        ),
    );
    assert_skipped(
        dir.path(),
        &p,
        4,
        &["mmlu/toy/0", "mmlu/toy/1", "mmlu/toy/3"],
    );
}

#[test]
fn answer_e() {
    let (dir, p) = mmlu_with(b"Q,1,2,3,4,E\n");
    assert_error(
        dir.path(),
        format!("{}:4: answer \"E\" is not one of A, B, C, D", p.display()),
    );
    assert_skipped(
        dir.path(),
        &p,
        4,
        &["mmlu/toy/0", "mmlu/toy/1", "mmlu/toy/3"],
    );
}

#[test]
fn non_utf8_row() {
    let (dir, p) = mmlu_with(b"Caf\xe9 au lait?,1,2,3,4,A\n");
    assert_error(
        dir.path(),
        format!("{}:4: invalid UTF-8 (byte 4 of the field)", p.display()),
    );
    assert_skipped(
        dir.path(),
        &p,
        4,
        &["mmlu/toy/0", "mmlu/toy/1", "mmlu/toy/3"],
    );
}

#[test]
fn empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = load(std::slice::from_ref(&empty), &opts(false)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no benchmark files found (expected an MMLU folder with dev/ and test/, \
             mmlu_XX-YY.csv, mgsm_xx.tsv or *.jsonl)",
            empty.display()
        )
    );
    // Skipped alongside a good folder, the good one is evaluated.
    let good = dir.path().join("good");
    write(&good, "mgsm_en.tsv", b"How many?\t3\n");
    let suite = load(&[empty.clone(), good], &opts(true)).unwrap();
    assert_eq!(suite.items.len(), 1);
    assert_eq!(suite.skipped[0].path, empty.display().to_string());
    assert_eq!(suite.skipped[0].line, 0);
    // Nothing at all to evaluate is an error even with --skip-bad.
    assert!(load(&[empty], &opts(true)).is_err());
}

#[test]
fn tsv_with_non_numeric_answer() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mgsm_en.tsv",
        b"One?\t1\nTwo?\ttwelve\nThree?\t3,000\n",
    );
    assert_error(
        dir.path(),
        format!("{}:2: answer \"twelve\" is not a number", p.display()),
    );
    assert_skipped(dir.path(), &p, 2, &["mgsm/en/0", "mgsm/en/2"]);
    let suite = try_load(dir.path(), true).unwrap();
    assert_eq!(suite.items[1].target(), "3000");
}

#[test]
fn tsv_with_three_columns_and_non_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mgsm_de.tsv",
        b"Eins?\t1\nZwei?\t2\textra\n\xff\xfe?\t3\n",
    );
    assert_error(
        dir.path(),
        format!(
            "{}:2: expected 2 tab-separated columns (question, answer), found 3",
            p.display()
        ),
    );
    let suite = try_load(dir.path(), true).unwrap();
    let lines: Vec<usize> = suite.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [2, 3]);
    assert_eq!(suite.items.len(), 1);
}

#[test]
fn mmmlu_bad_header_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mmlu_FR-FR.csv",
        b",Question,A,B,C,D,Subject\n0,Q,1,2,3,4,x\n",
    );
    assert_error(
        dir.path(),
        format!(
            "{}:1: header has no `Answer` column (expected `,Question,A,B,C,D,Answer,Subject`)",
            p.display()
        ),
    );
    let p = write(
        dir.path(),
        "mmlu_FR-FR.csv",
        b",Question,A,B,C,D,Answer,Subject\n0,Q,1,2,3,4,A,x\n1,Q,1,2,3,4,x\n",
    );
    assert_error(
        dir.path(),
        format!(
            "{}:3: expected 8 columns like the header, found 7",
            p.display()
        ),
    );
}

#[test]
fn jsonl_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "qa.jsonl",
        b"{\"question\": \"a?\", \"choices\": [\"x\", \"y\"], \"answer\": 0}\n{\"question\": \"b?\", \"choices\": [\"x\", \"y\"], \"answer\": \"E\"}\n{not json\n",
    );
    assert_error(
        dir.path(),
        format!(
            "{}:2: answer \"E\" is not a choice index, letter A..B or choice text",
            p.display()
        ),
    );
    let suite = try_load(dir.path(), true).unwrap();
    assert_eq!(suite.skipped.len(), 2);
    assert_eq!(suite.skipped[1].line, 3);
    assert!(suite.skipped[1].problem.starts_with("invalid JSON"));
}
