//! Fuzz-style robustness (issue 18): a few hundred mutated images, GGUF headers and safetensors
//! headers, each read by the same loaders the commands use. No case may panic; every error is
//! one line naming the file. Mutations come from a fixed-seed generator, so a failure repeats.
//! PyTorch `.pt` checkpoints (tamm's format) are fuzzed the same way: their zip directory and
//! pickle are mutated, and no mutation may make the reader panic or run code.

use std::path::{Path, PathBuf};
use std::process::Command;

/// xorshift64*: deterministic mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `data`: flipped bytes, a cut, a run of 0xff (huge lengths), or a duplicated
/// slice, mostly within the first `head` bytes (where headers live).
fn mutate(rng: &mut Rng, data: &[u8], head: usize) -> Vec<u8> {
    let mut d = data.to_vec();
    let span = head.min(d.len()).max(1);
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(span);
                d[i] ^= 1 << rng.below(8);
            }
        }
        1 => d.truncate(rng.below(d.len())),
        2 => {
            let i = rng.below(span);
            for b in d.iter_mut().skip(i).take(1 + rng.below(8)) {
                *b = 0xff;
            }
        }
        _ => {
            let i = rng.below(span);
            let n = rng.below(64).min(d.len() - i);
            let piece = d[i..i + n].to_vec();
            let at = rng.below(span);
            d.splice(at..at, piece);
        }
    }
    d
}

/// Run `load` on each mutated file; assert no panic and one-line errors naming the file.
fn fuzz(
    name: &str,
    seed: u64,
    cases: usize,
    base: &[u8],
    head: usize,
    load: impl Fn(&Path) -> Result<(), String> + std::panic::RefUnwindSafe,
) -> (usize, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let (mut errors, mut ok) = (0, 0);
    for case in 0..cases {
        let path = tmp.path().join(format!("case-{case}-{name}"));
        std::fs::write(&path, mutate(&mut rng, base, head)).unwrap();
        let r = std::panic::catch_unwind(|| load(&path));
        match r {
            Err(_) => panic!("{name} case {case}: the loader panicked"),
            Ok(Ok(())) => ok += 1,
            Ok(Err(msg)) => {
                errors += 1;
                assert!(
                    !msg.contains('\n'),
                    "{name} case {case}: multi-line error: {msg}"
                );
                assert!(
                    msg.contains(&format!("case-{case}-{name}")),
                    "{name} case {case}: the error does not name the file: {msg}"
                );
                for debug in [
                    "Os {",
                    "IoError(",
                    "MetadataIncompleteBuffer",
                    "ChunkType {",
                ] {
                    assert!(
                        !msg.contains(debug),
                        "{name} case {case}: debug text: {msg}"
                    );
                }
            }
        }
    }
    (errors, ok)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn mutated_images() {
    let limits = afm_vision::LoadLimits::default();
    for (i, image) in ["chart.png", "landscape.jpg"].iter().enumerate() {
        let base = std::fs::read(repo().join("assets/images").join(image)).unwrap();
        let (errors, _) = fuzz(image, 11 + i as u64, 100, &base, 4096, |p| {
            afm_vision::image_io::load_image(p, &limits)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        assert!(
            errors > 10,
            "{image}: the mutations should break most files"
        );
    }
    // A WebP of a few bytes with every header kind.
    let mut webp = b"RIFF\x40\0\0\0WEBPVP8X\x0a\0\0\0".to_vec();
    webp.resize(64, 0);
    fuzz("x.webp", 5, 60, &webp, 64, |p| {
        afm_vision::image_io::load_image(p, &limits)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
}

/// A valid GGUF v3 file: a few metadata kinds (string, u32, array) and two tensors.
fn small_gguf() -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes()); // tensors
    b.extend(3u64.to_le_bytes()); // kv
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(8u32.to_le_bytes()); // of strings
    b.extend(3u64.to_le_bytes());
    for t in ["a", "bb", "ccc"] {
        s(&mut b, t);
    }
    for (name, off) in [("token_embd.weight", 0u64), ("output_norm.weight", 128)] {
        s(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(off.to_le_bytes());
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 256]);
    b
}

#[test]
fn mutated_gguf_headers() {
    let base = small_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    std::fs::write(&good, &base).unwrap();
    afm_text::gguf::GgufFile::open(&good).expect("the unmutated file is valid");
    let (errors, _) = fuzz("m.gguf", 7, 300, &base, base.len() - 256, |p| {
        afm_text::gguf::GgufFile::open(p)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert!(errors > 50);
}

#[test]
fn mutated_safetensors_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.safetensors");
    let t = tch::Tensor::arange(24, (tch::Kind::Float, tch::Device::Cpu)).reshape([2, 3, 4]);
    let u = tch::Tensor::from_slice(&[1i64, 2, 3]);
    afm_text::checkpoint::write_safetensors(&good, &[("a".into(), t), ("b".into(), u)], None)
        .unwrap();
    let base = std::fs::read(&good).unwrap();
    let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let (errors, _) = fuzz("m.safetensors", 3, 300, &base, header, |p| {
        afm_text::checkpoint::read_safetensors_file(p)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert!(errors > 50);
}

/// The same inputs through the binary: exit code 1 and one line, for a handful of cases per
/// format (each run starts libtorch, so only a few).
#[test]
fn mutated_files_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let png = std::fs::read(repo().join("assets/images/chart.png")).unwrap();
    let gguf = small_gguf();
    for case in 0..8 {
        let p = tmp.path().join(format!("c{case}.png"));
        let mut bytes = mutate(&mut rng, &png, 2048);
        if case == 0 {
            bytes.truncate(100);
        }
        std::fs::write(&p, &bytes).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
            .args(["-q", "tile"])
            .arg(&p)
            .arg("--out")
            .arg(tmp.path().join("t.safetensors"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(matches!(o.status.code(), Some(0 | 1)), "{err}");
        if !o.status.success() {
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(err.contains(&format!("c{case}.png")), "{err}");
        }
        let g = tmp.path().join(format!("c{case}.gguf"));
        std::fs::write(&g, mutate(&mut rng, &gguf, gguf.len() - 256)).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
            .args(["-q", "convert", "gguf"])
            .arg(&g)
            .arg(tmp.path().join(format!("out{case}")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("c{case}.gguf")), "{err}");
    }
}

#[test]
fn mutated_pytorch_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.pt");
    let st = Command::new(repo().join(".venv/bin/python"))
        .args([
            "-c",
            "import sys,torch; torch.save({'a': torch.arange(6.).reshape(2, 3), \
             'b': torch.ones(3, dtype=torch.bfloat16), 'c': torch.arange(4).t()}, sys.argv[1])",
        ])
        .arg(&good)
        .status()
        .unwrap();
    assert!(st.success());
    let pt = afm_text::pt::PtFile::open(&good).unwrap();
    assert_eq!(pt.tensors.len(), 3);
    let a = pt.tensor(&pt.tensors[0].1).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(a.flatten(0, -1)).unwrap(),
        vec![0., 1., 2., 3., 4., 5.]
    );
    let base = std::fs::read(&good).unwrap();
    // Mutations anywhere: the zip directory is at the end, the pickle near the start.
    let (errors, _) = fuzz("m.pt", 21, 300, &base, base.len(), |p| {
        let f = afm_text::pt::PtFile::open(p).map_err(|e| e.to_string())?;
        for (_, t) in &f.tensors {
            let _ = f.tensor(t).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    assert!(errors > 50);
}
