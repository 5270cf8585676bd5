//! The new-user audit's defects (issue 18), one test each, through the CLI as a user meets
//! them: nothing already written is lost, nothing crashes, nothing is silently wrong. Every
//! refusal is one line on stderr that names the file or flag, with exit code 1.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afm-vl"));
    c.env_remove("AFM_VL_MODEL").env_remove("AFM_VL_VLM");
    c
}

fn afm(args: &[&str]) -> Output {
    bin().args(args).output().expect("run afm-vl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Exit code 1, no panic, a single line on stderr containing every needle.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn default_model() -> PathBuf {
    let d = repo().join("assets/models/smollm2-135m-instruct");
    assert!(
        d.join("model.safetensors").exists(),
        "default model missing (run `make setup`)"
    );
    d
}

fn demo_model() -> PathBuf {
    let d = repo().join("assets/models/afm-vl-demo");
    assert!(d.join("config.json").exists(), "demo checkpoint missing");
    default_model();
    d
}

/// A model folder `dir` holding symlinks to some files of the default model.
fn linked_default_model(dir: &Path, files: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::os::unix::fs::symlink(default_model().join(f), dir.join(f)).unwrap();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model directory (tiny-dense geometry, random weights) with a stand-in
/// tokenizer.json and tokenizer_config.json, as `quantize` copies them.
fn tiny_model_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = afm_text::presets::preset("tiny-dense").unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty()).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = afm_text::decoder::weight_shapes(&cfg)
        .into_iter()
        .map(|(n, sh)| {
            (
                n,
                tch::Tensor::randn(sh.as_slice(), (tch::Kind::Float, tch::Device::Cpu)),
            )
        })
        .collect();
    afm_text::checkpoint::write_safetensors(&dir.join("model.safetensors"), &tensors, None)
        .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"stand-in\": true}\n").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\"chat_template\": \"x\"}\n",
    )
    .unwrap();
}

/// Every file of a directory with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Run `args` under a file-size limit of `blocks` × 512 bytes: a write past it kills the
/// process (SIGXFSZ), the way a full disk or a crash stops a write half-way.
fn run_with_file_size_limit(blocks: u32, args: &[&str]) -> std::process::ExitStatus {
    let mut line = format!("ulimit -f {blocks}; exec \"$0\"");
    for i in 0..args.len() {
        line.push_str(&format!(" \"${}\"", i + 1));
    }
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .arg(env!("CARGO_BIN_EXE_afm-vl"))
        .args(args)
        .env_remove("AFM_VL_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

// 1. Data loss: quantize into its own input; interrupted writes.

#[test]
fn d01_quantize_into_its_input_is_refused_and_the_input_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    tiny_model_dir(&input);
    let before = snapshot(&input);
    std::os::unix::fs::symlink(&input, tmp.path().join("link")).unwrap();
    for out in [
        input.clone(),
        input.join("."),
        input.join("sub"),
        tmp.path().join("link"),
        tmp.path().join("link/deeper/out"),
    ] {
        let o = afm(&["quantize", s(&input), s(&out)]);
        assert_one_line_error(&o, &["input directory", "quantize"]);
    }
    assert_eq!(snapshot(&input), before, "the input changed");
    assert!(!input.join("sub").exists());

    // A hard-linked tokenizer in OUT is replaced, never written through.
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::hard_link(input.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let o = afm(&[
        "-q",
        "quantize",
        s(&input),
        s(&out),
        "--bits",
        "8",
        "--method",
        "rtn",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(snapshot(&input), before);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(input.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn d01_interrupted_writes_keep_the_previous_files() {
    let tmp = tempfile::tempdir().unwrap();
    // tile --out over an existing file, killed while writing (file-size limit): the old file
    // stays as it was.
    let image = repo().join("assets/images/landscape.jpg");
    let out = tmp.path().join("tiles.safetensors");
    let o = afm(&["-q", "tile", s(&image), "--out", s(&out), "--mode", "rapid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let good = std::fs::read(&out).unwrap();
    let st = run_with_file_size_limit(64, &["-q", "tile", s(&image), "--out", s(&out)]);
    assert!(!st.success(), "the limited write should have been stopped");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        good,
        "tile --out lost the old file"
    );

    // quantize over an existing output model: its files stay whole.
    let input = tmp.path().join("in");
    tiny_model_dir(&input);
    let q = tmp.path().join("q");
    let o = afm(&[
        "-q",
        "quantize",
        s(&input),
        s(&q),
        "--bits",
        "8",
        "--method",
        "rtn",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&q);
    let st = run_with_file_size_limit(8, &["-q", "quantize", s(&input), s(&q)]);
    assert!(!st.success());
    let after: Vec<_> = snapshot(&q)
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".partial"))
        .collect();
    assert_eq!(after, before, "quantize lost files of the previous output");
}

// 2. train demo has no default output (it used to overwrite the shipped checkpoint).

#[test]
fn d02_train_demo_needs_out() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["train", "demo", "--stage1-steps", "1"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_one_line_error(&o, &["--out"]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

// 3 and 4. Evaluation folders: a lock, resume checks, journal checks.

fn write_eval_data(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut jsonl = String::new();
    for i in 0..n {
        jsonl.push_str(&format!(
            "{{\"question\": \"Item {i}: which?\", \"choices\": [\"a{i}\", \"b{i}\", \"c{i}\", \"d{i}\"], \"answer\": {}}}\n",
            i % 4
        ));
    }
    std::fs::write(dir.join("items.jsonl"), jsonl).unwrap();
}

fn eval_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
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
    .args(extra);
    c
}

fn journal_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn d03_two_evals_on_one_out_the_second_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_eval_data(&data, 60);
    let out = tmp.path().join("out");
    // Slow enough (60 items × 150 ms) that the first run is still going while the others start,
    // even on a loaded machine.
    let mut first = eval_cmd(&data, &out, &["--fake-delay-ms=150"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while journal_lines(&out).len() < 4 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A second run (other options) and a second --resume are both refused while it runs.
    for extra in [&["--limit", "10"][..], &["--resume"][..]] {
        let o = eval_cmd(&data, &out, extra).output().unwrap();
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before the second started; the test needs a slower first run"
        );
        assert_one_line_error(&o, &[s(&out), "in use", &format!("pid {}", first.id())]);
    }
    assert!(first.wait().unwrap().success());
    // The first run's results are complete and consistent: 60 journal lines, 60 keys.
    let lines = journal_lines(&out);
    assert_eq!(lines.len(), 60);
    let keys: std::collections::BTreeSet<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].to_string())
        .collect();
    assert_eq!(keys.len(), 60);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        results["items"].as_array().map(Vec::len),
        Some(60),
        "{results}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["items_shard"], 60);
}

#[test]
fn d04_resume_checks_the_manifest_and_every_journal_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_eval_data(&data, 8);
    let out = tmp.path().join("out");
    assert!(eval_cmd(&data, &out, &[]).status().unwrap().success());
    let lines = journal_lines(&out);
    let mut recs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // A journal without run.json is not resumed.
    std::fs::remove_file(out.join("run.json")).unwrap();
    let o = eval_cmd(&data, &out, &["--resume"]).output().unwrap();
    assert_one_line_error(&o, &["journal.jsonl", "run.json is missing"]);

    // A forged verdict (correct = true for a wrong prediction) is refused, naming its line.
    assert!(eval_cmd(&data, &tmp.path().join("fresh"), &[])
        .status()
        .unwrap()
        .success());
    let out = tmp.path().join("fresh");
    let wrong = recs
        .iter()
        .position(|r| r["correct"] == false)
        .expect("the hash backend gets some wrong");
    recs[wrong]["correct"] = serde_json::Value::Bool(true);
    let forged: String = recs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(out.join("journal.jsonl"), &forged).unwrap();
    let o = eval_cmd(&data, &out, &["--resume"]).output().unwrap();
    assert_one_line_error(
        &o,
        &[&format!("journal.jsonl:{}", wrong + 1), "correct=true"],
    );

    // A prediction changed to the target (and correct set to match): the stored
    // log-likelihoods give another answer, so it is refused too.
    recs[wrong]["prediction"] = recs[wrong]["target"].clone();
    let forged: String = recs.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(out.join("journal.jsonl"), &forged).unwrap();
    let o = eval_cmd(&data, &out, &["--resume"]).output().unwrap();
    assert_one_line_error(&o, &[&format!("journal.jsonl:{}", wrong + 1)]);

    // Garbage in the middle: the line is named; the valid lines after it are not thrown away.
    let mut with_garbage: Vec<String> = lines.clone();
    with_garbage.insert(3, "this is not JSON".into());
    std::fs::write(out.join("journal.jsonl"), with_garbage.join("\n") + "\n").unwrap();
    let o = eval_cmd(&data, &out, &["--resume"]).output().unwrap();
    assert_one_line_error(&o, &["journal.jsonl:4", "not a journal entry"]);
    assert_eq!(
        journal_lines(&out).len(),
        lines.len() + 1,
        "lines were discarded"
    );

    // The genuine journal with a torn last line still resumes to the full result.
    let mut torn = lines.join("\n") + "\n";
    torn.push_str("{\"key\": \"jso");
    std::fs::write(out.join("journal.jsonl"), torn).unwrap();
    let o = eval_cmd(&data, &out, &["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(journal_lines(&out), lines);
}

// 5. Thread counts.

#[test]
fn d05_absurd_thread_counts_are_refused() {
    for n in ["0", "100000", "4294967295", "-1", "x"] {
        let o = afm(&["--threads", n, "inspect", "--preset", "tiny-dense"]);
        assert_one_line_error(&o, &["--threads"]);
    }
    let o = afm(&["--threads", "1", "inspect", "--preset", "tiny-dense"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

// 6. Closed and full stdout.

#[test]
fn d06_broken_pipe_ends_quietly_and_a_full_stdout_is_an_error() {
    let model = default_model();
    let args = [
        "generate",
        "--model",
        s(&model),
        "--max-tokens",
        "40",
        "Tell me a long story about a cat.",
    ];
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 5];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // The pipe is closed here (`| head -c 5`).
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert!(
        o.status.success() || o.status.signal() == Some(13),
        "{:?} {err}",
        o.status
    );

    for cmd in [&args[..], &["inspect", "--preset", "tiny-dense"][..]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = bin().args(cmd).stdout(full).output().unwrap();
        assert_one_line_error(&o, &["writing to stdout", "No space left"]);
    }
}

// 7. Sizes from configs are bounded before anything is allocated.

#[test]
fn d07_absurd_config_sizes_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let image = repo().join("assets/images/landscape.jpg");
    let cfg = tmp.path().join("tiler.json");
    std::fs::write(&cfg, r#"{"tile_size": 100000}"#).unwrap();
    let out = tmp.path().join("t.safetensors");
    let t0 = Instant::now();
    let o = afm(&["tile", s(&image), "--config", s(&cfg), "--out", s(&out)]);
    assert_one_line_error(&o, &["tile_size 100000", "limit"]);
    std::fs::write(&cfg, r#"{"tile_size": 4096, "high_res_grid": 8}"#).unwrap();
    let o = afm(&["tile", s(&image), "--config", s(&cfg), "--out", s(&out)]);
    assert_one_line_error(&o, &["MiB", "limit"]);

    // Text model geometry.
    for (field, value) in [
        ("vocab_size", "1000000000"),
        ("num_hidden_layers", "100000"),
        ("max_position_embeddings", "1000000000000"),
        ("hidden_size", "10000000"),
    ] {
        let dir = tmp.path().join(format!("m-{field}"));
        tiny_model_dir(&dir);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
        for cmd in ["inspect", "generate"] {
            let o =
                afm(&[cmd, "--model", s(&dir), "--raw", "hi"]
                    [..if cmd == "inspect" { 3 } else { 5 }]);
            assert_one_line_error(&o, &["config.json", field]);
        }
    }

    // A vision-language checkpoint whose tiler section asks for huge tiles.
    let vlm = tmp.path().join("vlm");
    std::fs::create_dir(&vlm).unwrap();
    let demo = demo_model();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("config.json")).unwrap()).unwrap();
    v["tiler"]["tile_size"] = 100000.into();
    v["text_model"] = s(&default_model()).into();
    std::fs::write(vlm.join("config.json"), v.to_string()).unwrap();
    std::fs::copy(
        demo.join("vision_adapter.safetensors"),
        vlm.join("vision_adapter.safetensors"),
    )
    .unwrap();
    let o = afm(&["describe", "--model", s(&vlm), s(&image)]);
    assert_one_line_error(&o, &["config.json", "tile_size 100000"]);
    assert!(t0.elapsed() < Duration::from_secs(120));
}

// 8. LoRA hyper-parameters (the diverging-loss stop is tested in text/tests/train_lora.rs).

#[test]
fn d08_bad_lora_hyper_parameters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n").unwrap();
    let out = tmp.path().join("out");
    for (flag, value) in [
        ("--rank", "0"),
        ("--lr", "NaN"),
        ("--lr", "0"),
        ("--lr", "inf"),
        ("--alpha", "0"),
        ("--steps", "0"),
        ("--batch-size", "0"),
    ] {
        let o = afm(&[
            "train",
            "lora",
            "--data",
            s(&data),
            "--out",
            s(&out),
            flag,
            value,
        ]);
        assert_one_line_error(&o, &[flag]);
    }
    assert!(!out.exists());
}

// 9. The demo checkpoint says what it is.

#[test]
fn d09_demo_checkpoint_notice() {
    let image = repo().join("assets/images/landscape.jpg");
    let demo = demo_model();
    let args = [
        "describe",
        "--model",
        s(&demo),
        "--max-tokens",
        "4",
        s(&image),
    ];
    let o = afm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("demo checkpoint").count(), 1, "{err}");
    assert!(err.contains("--model"), "{err}");
    // It names the way to real descriptions: a SmolVLM checkpoint.
    assert!(err.contains("SmolVLM"), "{err}");
    let mut quiet = vec!["-q"];
    quiet.extend(args);
    let o = afm(&quiet);
    assert!(o.status.success());
    assert!(!stderr(&o).contains("demo checkpoint"));
}

// 10. A model without tokenizer_config.json.

#[test]
fn d10_missing_chat_template_is_announced() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    linked_default_model(&m, &["config.json", "model.safetensors", "tokenizer.json"]);
    let o = afm(&["generate", "--model", s(&m), "--max-tokens", "2", "Hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("no chat template") && err.contains("role: content"),
        "{err}"
    );
    // With the chat template present, no warning.
    let o = afm(&[
        "generate",
        "--model",
        s(&default_model()),
        "--max-tokens",
        "2",
        "Hi",
    ]);
    assert!(!stderr(&o).contains("no chat template"), "{}", stderr(&o));
}

// 11. An eval item longer than the context.

#[test]
fn d11_too_long_eval_items_are_named_and_skippable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_eval_data(&data, 6);
    let long = format!(
        "{{\"question\": \"{}\", \"choices\": [\"a\", \"b\"], \"answer\": 0}}\n",
        "very long ".repeat(100)
    );
    let mut text = std::fs::read_to_string(data.join("items.jsonl")).unwrap();
    text.push_str(&long);
    std::fs::write(data.join("items.jsonl"), text).unwrap();
    let out = tmp.path().join("out");
    let o = eval_cmd(&data, &out, &["--fake-context", "300"])
        .output()
        .unwrap();
    assert_one_line_error(
        &o,
        &["items.jsonl:7", "tokens", "context of 300", "--skip-bad"],
    );
    assert!(!out.join("results.json").exists());
    let o = eval_cmd(&data, &out, &["--fake-context", "300", "--skip-bad"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["items"].as_array().map(Vec::len), Some(6));
    let skipped = results["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{results}");
    assert_eq!(skipped[0]["line"], 7);
}

// 12. --stop escapes.

#[test]
fn d12_stop_strings_read_escapes_and_empty_is_refused() {
    let o = afm(&["generate", "--preset", "tiny-dense", "--stop", "", "x"]);
    assert_one_line_error(&o, &["--stop", "non-empty"]);
    let o = afm(&["generate", "--preset", "tiny-dense", "--stop", "\\q", "x"]);
    assert_one_line_error(&o, &["--stop", "unknown escape"]);
    // `--stop '\n'`: the text stops before its first newline.
    let model = default_model();
    let prompt = "Write a poem of five lines about the sea.";
    let free = afm(&[
        "generate",
        "--model",
        s(&model),
        "--max-tokens",
        "60",
        prompt,
    ]);
    assert!(free.status.success());
    let free_text = stdout(&free);
    assert!(
        free_text.trim_end().contains('\n'),
        "the model writes several lines: {free_text}"
    );
    let o = afm(&[
        "generate",
        "--model",
        s(&model),
        "--max-tokens",
        "60",
        "--stop",
        "\\n",
        prompt,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(
        text.trim_end_matches('\n'),
        free_text.split('\n').next().unwrap()
    );
}

// 13. --mean / --std with commas.

#[test]
fn d13_tile_mean_and_std_take_commas() {
    let tmp = tempfile::tempdir().unwrap();
    let image = repo().join("assets/images/chart.png");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = afm(&[
        "-q",
        "tile",
        s(&image),
        "--mode",
        "rapid",
        "--out",
        s(&a),
        "--mean",
        "0.485,0.456,0.406",
        "--std",
        "0.229,0.224,0.225",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = tmp.path().join("c.json");
    std::fs::write(
        &cfg,
        r#"{"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}"#,
    )
    .unwrap();
    let o = afm(&[
        "-q",
        "tile",
        s(&image),
        "--mode",
        "rapid",
        "--out",
        s(&b),
        "--config",
        s(&cfg),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let o = afm(&["tile", s(&image), "--out", s(&a), "--mean", "0.5,0.5"]);
    assert_one_line_error(&o, &["--mean", "three values"]);
}

// 14. Paths that are not UTF-8.

#[test]
fn d14_describe_takes_non_utf8_paths_and_keeps_them_in_json() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"sc\xffene.png");
    let path = tmp.path().join(name);
    std::fs::copy(repo().join("assets/images/scenes-a.png"), &path).unwrap();
    let o = bin()
        .args(["-q", "describe", "--max-tokens", "4", "--json", "--model"])
        .arg(demo_model())
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let b64 = v["image_b64"]
        .as_str()
        .expect("image_b64 for a non-UTF-8 path");
    assert_eq!(b64, base64(path.as_os_str().as_bytes()));
    assert!(v["description"].is_string());
}

fn base64(bytes: &[u8]) -> String {
    // Reference encoder (Python's base64 module would do the same).
    let out = Command::new(repo().join(".venv/bin/python"))
        .args([
            "-c",
            "import sys,base64;print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())",
        ])
        .arg(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// 15 and 19. Default paths and a relocated binary.

/// A copy of the built binary in `root/target/release/`, with `root/.venv` pointing at the
/// real virtualenv (so a relocated checkout keeps its libtorch beside it).
fn relocated_binary(root: &Path) -> PathBuf {
    let dir = root.join("target/release");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("afm-vl");
    std::fs::copy(env!("CARGO_BIN_EXE_afm-vl"), &exe).unwrap();
    std::os::unix::fs::symlink(repo().join(".venv"), root.join(".venv")).unwrap();
    exe
}

#[test]
fn d19_the_binary_runs_after_the_checkout_moves() {
    let o = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_afm-vl")])
        .output();
    if let Ok(o) = o {
        let text = stdout(&o);
        let runpath: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("RUNPATH") || l.contains("RPATH"))
            .collect();
        assert!(!runpath.is_empty(), "no runpath: {text}");
        for l in runpath {
            let inner = l.split('[').nth(1).unwrap_or("");
            for entry in inner.trim_end_matches(']').split(':') {
                assert!(
                    entry.starts_with("$ORIGIN"),
                    "runpath entry {entry:?} is not relative to the binary"
                );
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = relocated_binary(&tmp.path().join("moved"));
    let o = Command::new(&exe)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("describe"));
}

#[test]
fn d15_one_rule_for_default_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = relocated_binary(&tmp.path().join("moved"));
    let data = tmp.path().join("data");
    write_eval_data(&data, 2);
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let run = |args: &[&str], env: &[(&str, &Path)]| {
        let mut c = Command::new(&exe);
        c.args(args)
            .env_remove("AFM_VL_MODEL")
            .env_remove("XDG_DATA_HOME")
            .env("HOME", &home)
            .current_dir(repo()); // the checkout's assets must not be found from here
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // Nothing next to the moved binary, nothing in the data directory: a hint naming both.
    let out = tmp.path().join("out");
    for args in [
        &["inspect"][..],
        &["eval", s(&data), "--out", s(&out)][..],
        &["generate", "hi"][..],
    ] {
        let o = run(args, &[]);
        assert_one_line_error(
            &o,
            &[
                "no text model found",
                "--model",
                "$AFM_VL_MODEL",
                ".local/share/afm-vl",
            ],
        );
    }
    // $AFM_VL_MODEL is used by every command (eval used to ignore it).
    let missing = tmp.path().join("no-such-model");
    for args in [&["inspect"][..], &["eval", s(&data), "--out", s(&out)][..]] {
        let o = run(args, &[("AFM_VL_MODEL", &missing)]);
        assert_one_line_error(&o, &["no-such-model"]);
    }
    // The data directory: $XDG_DATA_HOME/afm-vl/assets/models/<name>.
    let xdg = tmp.path().join("xdg");
    let models = xdg.join("afm-vl/assets/models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(default_model(), models.join("smollm2-135m-instruct")).unwrap();
    let o = run(&["inspect"], &[("XDG_DATA_HOME", &xdg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("llama"), "{}", stdout(&o));
}

// 16. Values that used to be accepted silently.

#[test]
fn d16_silently_accepted_values_are_errors() {
    let model = default_model();
    let m = s(&model);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["generate", "--model", m, "--draft", "self:999", "hi"],
            vec!["self:999", "between 1 and"],
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--draft",
                "self:2",
                "--draft-tokens",
                "0",
                "hi",
            ],
            vec!["draft tokens"],
        ),
        (
            vec!["--device", "tpu", "inspect", "--preset", "tiny-dense"],
            vec!["--device tpu", "unknown device"],
        ),
        (
            vec!["--device", "cuda:7", "inspect", "--preset", "tiny-dense"],
            vec!["cuda:7"],
        ),
        (
            vec!["generate", "--kv-bits", "4", "--preset", "tiny-dense", "x"],
            vec!["--kv-bits", "8 or 16"],
        ),
        (
            vec!["generate", "--kv-bits", "12", "--preset", "tiny-dense", "x"],
            vec!["--kv-bits", "8 or 16"],
        ),
    ];
    for (args, needles) in cases {
        let o = afm(&args);
        assert_one_line_error(&o, &needles);
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mmlu = repo().join("eval/tests/fixtures/mmlu");
    let o = eval_cmd(&mmlu, &out, &["--batch-size", "0"])
        .output()
        .unwrap();
    assert_one_line_error(&o, &["--batch-size"]);
    let data = tmp.path().join("data");
    write_eval_data(&data, 2);
    let o = eval_cmd(&data, &out, &["--subjects", "items,typo"])
        .output()
        .unwrap();
    assert_one_line_error(&o, &["--subjects", "'typo'"]);
}

// 17. Messages.

#[test]
fn d17_messages_are_one_clean_line() {
    let tmp = tempfile::tempdir().unwrap();
    let image = repo().join("assets/images/chart.png");
    // A doubled cause: `PATH: Is a directory (os error 21)` only once.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(odd.join("config.json")).unwrap();
    let o = afm(&["inspect", "--model", s(&odd)]);
    assert_one_line_error(&o, &["config.json", "os error 21"]);
    assert_eq!(stderr(&o).matches("os error").count(), 1, "{}", stderr(&o));

    // No Rust debug text: a truncated vision checkpoint, a corrupt PNG chunk.
    let vlm = tmp.path().join("vlm");
    std::fs::create_dir(&vlm).unwrap();
    let demo = demo_model();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("config.json")).unwrap()).unwrap();
    v["text_model"] = s(&default_model()).into();
    std::fs::write(vlm.join("config.json"), v.to_string()).unwrap();
    let w = std::fs::read(demo.join("vision_adapter.safetensors")).unwrap();
    std::fs::write(vlm.join("vision_adapter.safetensors"), &w[..w.len() / 2]).unwrap();
    let o = afm(&["-q", "describe", "--model", s(&vlm), s(&image)]);
    assert_one_line_error(&o, &["vision_adapter.safetensors", "truncated or corrupt"]);
    let err = stderr(&o);
    for debug in ["MetadataIncompleteBuffer", "IoError(", "Os {", "ChunkType"] {
        assert!(!err.contains(debug), "{err}");
    }
    let mut png = std::fs::read(&image).unwrap();
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    png[idat + 8] ^= 0xff; // break the chunk's CRC
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, &png).unwrap();
    let o = afm(&["tile", s(&bad), "--out", s(&tmp.path().join("t"))]);
    assert_one_line_error(&o, &["bad.png"]);
    assert!(!stderr(&o).contains("ChunkType {"), "{}", stderr(&o));

    // No colour codes when stderr is not a terminal (a warning is logged here).
    let m = tmp.path().join("m");
    linked_default_model(&m, &["config.json", "model.safetensors", "tokenizer.json"]);
    let o = afm(&["generate", "--model", s(&m), "--max-tokens", "1", "Hi"]);
    assert!(stderr(&o).contains("WARN"), "{}", stderr(&o));
    assert!(!stderr(&o).contains('\x1b'), "{:?}", stderr(&o));

    // --skip-bad warns once per bad row.
    let data = tmp.path().join("data");
    write_eval_data(&data, 3);
    let mut text = std::fs::read_to_string(data.join("items.jsonl")).unwrap();
    text.push_str("{not json\n");
    std::fs::write(data.join("items.jsonl"), text).unwrap();
    let o = bin()
        .args(["eval", "--backend", "hash", "--skip-bad", "--out"])
        .arg(tmp.path().join("out"))
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("items.jsonl:4").count(),
        1,
        "{}",
        stderr(&o)
    );

    // A WebP header claiming 16384² with no data: its size is reported, not 0×0.
    let mut webp = b"RIFF\0\0\0\0WEBPVP8L".to_vec();
    webp.extend(100u32.to_le_bytes());
    webp.push(0x2f);
    let bits: u32 = 16383 | (16383 << 14);
    webp.extend(bits.to_le_bytes());
    webp.resize(60, 0);
    let size = (webp.len() as u32 - 8).to_le_bytes();
    webp[4..8].copy_from_slice(&size);
    let wp = tmp.path().join("big.webp");
    std::fs::write(&wp, &webp).unwrap();
    let o = afm(&["tile", s(&wp), "--out", s(&tmp.path().join("t"))]);
    assert_one_line_error(&o, &["big.webp"]);
    assert!(!stderr(&o).contains("0×0"), "{}", stderr(&o));
    assert!(stderr(&o).contains("16384"), "{}", stderr(&o));

    // A negative number: the value's range, not clap's `-- -1` advice.
    let o = afm(&[
        "generate",
        "--preset",
        "tiny-dense",
        "--max-tokens",
        "-1",
        "x",
    ]);
    assert_one_line_error(&o, &["--max-tokens", "≥ 0"]);
    assert!(!stderr(&o).contains("-- -1"));

    // An image that fails before any text leaves no dangling `PATH: ` on stdout.
    let long = "describe ".repeat(9000);
    let o = afm(&[
        "describe",
        "--model",
        s(&demo),
        "--prompt",
        &long,
        s(&image),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "", "dangling output");

    // Generation that ends at the end of the context says so.
    let small = tmp.path().join("small");
    linked_default_model(
        &small,
        &[
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ],
    );
    let mut c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(default_model().join("config.json")).unwrap(),
    )
    .unwrap();
    c["max_position_embeddings"] = 24.into();
    std::fs::write(small.join("config.json"), c.to_string()).unwrap();
    let o = afm(&[
        "generate",
        "--model",
        s(&small),
        "--raw",
        "--max-tokens",
        "100",
        "Once upon a time",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("end of the model's context (24 tokens)"),
        "{}",
        stderr(&o)
    );
}

// 18. Progress bars on a terminal.

#[test]
fn d18_long_commands_draw_progress_on_a_terminal_only() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIP: `script` (util-linux) is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    tiny_model_dir(&input);
    let out = tmp.path().join("q");
    let line = format!(
        "{} quantize {} {} --bits 8 --method rtn",
        env!("CARGO_BIN_EXE_afm-vl"),
        input.display(),
        out.display()
    );
    // Under a pseudo-terminal (script) the bar is drawn ...
    let o = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("tensors"), "{}", stdout(&o));
    // ... and with stderr on a pipe it is not.
    let o = afm(&[
        "quantize",
        s(&input),
        s(&tmp.path().join("q2")),
        "--bits",
        "8",
        "--method",
        "rtn",
    ]);
    assert!(o.status.success());
    assert!(!stderr(&o).contains("tensors"), "{}", stderr(&o));
}
