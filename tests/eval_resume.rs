//! `afm-vl eval` as a process: kill -9 in the middle of a run, then `--resume`, gives the
//! results.json of an uninterrupted run; malformed data exits 1 naming file and line.
//! Uses the hidden `--backend hash` test double (no model), slowed down so it can be killed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afm-vl"))
}

fn write_data(dir: &Path) {
    let mut jsonl = String::new();
    for i in 0..60 {
        jsonl.push_str(&format!(
            "{{\"question\": \"Item {i}: which is right?\", \"choices\": [\"w{i}\", \"x{i}\", \"y{i}\", \"z{i}\"], \"answer\": {}}}\n",
            i % 4
        ));
    }
    for i in 0..20 {
        jsonl.push_str(&format!(
            "{{\"question\": \"What is {i} + 1?\", \"answer\": {}}}\n",
            i + 1
        ));
    }
    std::fs::write(dir.join("items.jsonl"), jsonl).unwrap();
}

fn eval_cmd(data: &Path, out: &Path, delay_ms: u32) -> Command {
    let mut c = bin();
    c.args([
        "-q",
        "eval",
        "--backend",
        "hash",
        "--batch-size",
        "2",
        "--out",
    ])
    .arg(out)
    .arg(data)
    .arg(format!("--fake-delay-ms={delay_ms}"))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn results_without_timings(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("timings");
    v
}

fn journal_len(out: &Path) -> usize {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn kill_9_then_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data);
    let (full, killed) = (tmp.path().join("full"), tmp.path().join("killed"));

    let st = eval_cmd(&data, &full, 15).status().unwrap();
    assert!(st.success());

    let mut child = eval_cmd(&data, &killed, 15).spawn().unwrap();
    let start = Instant::now();
    while journal_len(&killed) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = journal_len(&killed);
    assert!((20..80).contains(&done), "killed after {done} of 80 items");
    assert!(!killed.join("results.json").exists());

    let out = eval_cmd(&data, &killed, 15)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(journal_len(&killed), 80, "no item scored twice");
    assert_eq!(
        results_without_timings(&killed),
        results_without_timings(&full)
    );
}

#[test]
fn malformed_data_exits_1_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tsv = tmp.path().join("mgsm_en.tsv");
    std::fs::write(&tsv, "One?\t1\nTwo?\ttwo\n").unwrap();
    let out = bin()
        .args(["eval", "--backend", "hash", "--out"])
        .arg(tmp.path().join("out"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2: answer \"two\" is not a number",
            tsv.display()
        )),
        "{err}"
    );
    let out = bin()
        .args([
            "-q",
            "eval",
            "--backend",
            "hash",
            "--shots",
            "mgsm=0",
            "--skip-bad",
            "--out",
        ])
        .arg(tmp.path().join("out2"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = std::fs::read_to_string(tmp.path().join("out2/results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&results).unwrap();
    assert_eq!(v["skipped"][0]["line"], 2);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
}

#[test]
fn merge_subcommand_combines_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data);
    let mut dirs = Vec::new();
    for k in 0..2 {
        let out = tmp.path().join(format!("s{k}"));
        let st = eval_cmd(&data, &out, 0)
            .args(["--shard", &format!("{k}/2")])
            .status()
            .unwrap();
        assert!(st.success());
        dirs.push(out);
    }
    let merged = tmp.path().join("merged");
    let st = bin()
        .args(["-q", "eval", "merge", "--out"])
        .arg(&merged)
        .args(&dirs)
        .status()
        .unwrap();
    assert!(st.success());
    let v = results_without_timings(&merged);
    assert_eq!(v["items"].as_array().unwrap().len(), 80);
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
}
