//! GGUF dequantisation parity: random blocks of every supported type, dequantised by us and by
//! the `gguf` Python package (llama.cpp's reference implementation in numpy), must agree
//! exactly. Plus header parsing errors on hand-made files.

mod common;

use afm_text::gguf::{dequantize, GgmlType, GgufFile};
use common::*;

/// Random bytes for `n` blocks, with each block's f16 scale fields set to sane values.
fn random_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let (_, bb) = ty.block();
    let mut rng = afm_text::sampling::Rng::new(seed);
    let mut v: Vec<u8> = (0..n * bb).map(|_| rng.next_u64() as u8).collect();
    let f16_offsets: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::F16 => &[0],
        _ => &[],
    };
    for b in 0..n {
        for &o in f16_offsets {
            let x = half::f16::from_f32((rng.next_f64() as f32 - 0.5) * 0.1);
            v[b * bb + o..b * bb + o + 2].copy_from_slice(&x.to_le_bytes());
        }
    }
    if ty == GgmlType::F32 {
        for c in v.chunks_mut(4) {
            c.copy_from_slice(&((rng.next_f64() as f32) - 0.5).to_le_bytes());
        }
    }
    if ty == GgmlType::BF16 {
        for c in v.chunks_mut(2) {
            c.copy_from_slice(&half::bf16::from_f32(rng.next_f64() as f32 - 0.5).to_le_bytes());
        }
    }
    v
}

#[test]
fn dequantisation_matches_gguf_py() {
    let Some(py) = venv_python_with("gguf") else {
        return;
    };
    let types = [
        (GgmlType::F32, "F32"),
        (GgmlType::F16, "F16"),
        (GgmlType::BF16, "BF16"),
        (GgmlType::Q8_0, "Q8_0"),
        (GgmlType::Q4_0, "Q4_0"),
        (GgmlType::Q4_1, "Q4_1"),
        (GgmlType::Q4K, "Q4_K"),
        (GgmlType::Q5K, "Q5_K"),
        (GgmlType::Q6K, "Q6_K"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (ty, name)) in types.iter().enumerate() {
        let (bs, _) = ty.block();
        let nblocks = 2048 / bs.max(1) + 3;
        let bytes = random_blocks(*ty, nblocks, i as u64 + 1);
        let ours = dequantize(*ty, &bytes);
        let inp = tmp.path().join(format!("{name}.bin"));
        let out = tmp.path().join(format!("{name}.f32"));
        std::fs::write(&inp, &bytes).unwrap();
        let script = format!(
            "import numpy as np, gguf\n\
             d = np.fromfile('{}', dtype=np.uint8)\n\
             q = gguf.GGMLQuantizationType.{name}\n\
             bs, bb = gguf.GGML_QUANT_SIZES[q]\n\
             x = gguf.quants.dequantize(d.reshape(-1, bb) if bs > 1 else d, q)\n\
             np.asarray(x, dtype=np.float32).reshape(-1).tofile('{}')\n",
            inp.display(),
            out.display()
        );
        let st = std::process::Command::new(&py)
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(st.success(), "{name}: reference failed");
        let theirs: Vec<f32> = std::fs::read(&out)
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{name}: lengths");
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        println!("{name}: {} values, max rel |Δ| = {max:.2e}", ours.len());
        assert!(max <= 1e-6, "{name}: max |Δ| {max}");
    }
}

/// A minimal GGUF v3 file: metadata (architecture only) and one tensor.
pub fn tiny_gguf(type_id: u32, dims: &[u64], data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // kv
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(data);
    b
}

#[test]
fn header_errors_name_the_file_and_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    // Unknown tensor type.
    std::fs::write(&p, tiny_gguf(99, &[32], &[0u8; 64])).unwrap();
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("x.gguf") && e.contains("unsupported ggml type 99"),
        "{e}"
    );
    // Data shorter than the tensor needs.
    std::fs::write(&p, tiny_gguf(0, &[32], &[0u8; 64])).unwrap();
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("runs past the end"), "{e}");
    // A valid one round-trips.
    let vals: Vec<u8> = (0..32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(&p, tiny_gguf(0, &[32], &vals)).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    let d = g.dequantize(&g.tensors[0]).unwrap();
    assert_eq!(d[31], 31.0);
    // Truncated header, bad magic, empty file.
    let full = tiny_gguf(0, &[32], &vals);
    std::fs::write(&p, &full[..30]).unwrap();
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&p, b"PK\x03\x04 not a gguf").unwrap();
    assert!(GgufFile::open(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("bad magic"));
    std::fs::write(&p, b"").unwrap();
    assert!(GgufFile::open(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("too short"));
}
