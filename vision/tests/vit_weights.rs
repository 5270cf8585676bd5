//! Presets' geometry and the safetensors loader's checks.

use afm_vision::weights::{load_safetensors, map_checkpoint_name};
use afm_vision::window::WindowLayout;
use afm_vision::{presets, VisionError, VisionModel, VitConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn preset_geometry() {
    let l = presets::preset("vitdet-l").unwrap();
    assert_eq!(l.position_grid(), 42); // 672 / 16
    assert_eq!(
        WindowLayout::new(1, 42, 42, l.window_size).windows_per_image(),
        9
    );
    let windowed: Vec<i64> = (0..24).filter(|i| l.is_window_block(*i)).collect();
    assert_eq!(windowed.len(), 20);
    for g in [5, 11, 17, 23] {
        assert!(!l.is_window_block(g));
    }
    let g = presets::preset("vit-g").unwrap();
    assert_eq!(
        (
            g.patch_size,
            g.hidden_size,
            g.num_hidden_layers,
            g.intermediate_size
        ),
        (14, 1408, 40, 6144)
    );
    assert!((0..40).all(|i| !g.is_window_block(i)));
    assert!(presets::preset("nope").is_err());
    // A 10×16 grid with 7-token windows pads to 14×21: 2×3 windows.
    assert_eq!(WindowLayout::new(1, 10, 16, 7).windows_per_image(), 6);
}

#[test]
fn checkpoint_names() {
    let n = "encoder.layer.3.attention.qkv.weight";
    assert_eq!(map_checkpoint_name(n).as_deref(), Some(n));
    assert_eq!(
        map_checkpoint_name("vitdet.embeddings.projection.weight").as_deref(),
        Some("embeddings.projection.weight")
    );
    assert_eq!(map_checkpoint_name("lm_head.weight"), None);
}

fn save(
    dir: &std::path::Path,
    model: &VisionModel,
    edit: impl Fn(&str, Tensor) -> Option<(String, Tensor)>,
) -> std::path::PathBuf {
    let mut named: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter_map(|(k, v)| edit(&k, v.detach().copy()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let path = dir.join("w.safetensors");
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&refs, &path).unwrap();
    path
}

#[test]
fn loader_round_trip_prefix_and_errors() {
    let cfg = presets::vitdet_tiny();
    let a = VisionModel::random(&cfg, 1, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let x = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let want = a.forward(&x).unwrap().tokens;

    // HF-wrapped names, no register tokens (HF ViTDet has none): loads, registers keep init.
    let p = save(dir.path(), &a, |k, v| {
        (!k.contains("register_tokens")).then(|| (format!("vitdet.{k}"), v))
    });
    let b = VisionModel::random(&cfg, 2, Device::Cpu).unwrap();
    let report = load_safetensors(&b.vs, "", &p).unwrap();
    assert_eq!(
        report.kept_initial,
        vec!["embeddings.register_tokens".to_string()]
    );
    // Same weights everywhere: copy the registers too and compare outputs.
    let p = save(dir.path(), &a, |k, v| Some((k.to_string(), v)));
    load_safetensors(&b.vs, "", &p).unwrap();
    let got = b.forward(&x).unwrap().tokens;
    assert_eq!((got - &want).abs().max().double_value(&[]), 0.0);

    // A wrong shape names the tensor.
    let p = save(dir.path(), &a, |k, v| {
        Some((
            k.to_string(),
            if k.ends_with("mlp.fc1.bias") {
                v.narrow(0, 0, 10)
            } else {
                v
            },
        ))
    });
    let e = load_safetensors(&b.vs, "", &p).unwrap_err();
    assert!(matches!(e, VisionError::Checkpoint { .. }), "{e}");
    assert!(
        e.to_string().contains("mlp.fc1.bias") && e.to_string().contains("w.safetensors"),
        "{e}"
    );

    // Missing tensors are an error.
    let p = save(dir.path(), &a, |k, v| {
        (!k.contains("layer.1.")).then(|| (k.to_string(), v))
    });
    let e = load_safetensors(&b.vs, "", &p).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");

    // Not a checkpoint.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors").unwrap();
    assert!(load_safetensors(&b.vs, "", &junk).is_err());
    assert!(load_safetensors(&b.vs, "", &dir.path().join("absent.safetensors")).is_err());
}

#[test]
fn bad_encoder_input_is_an_error() {
    let m = VisionModel::random(&presets::vit_tiny(), 0, Device::Cpu).unwrap();
    let e = m
        .forward(&Tensor::zeros([1, 4, 224, 224], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(e.to_string().contains("encoder input"), "{e}");
    assert!(m
        .forward(&Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu)))
        .is_err());
    // A 448 input on the 224-px position grid: positions interpolated to 32×32 tokens.
    let out = m
        .forward(&Tensor::zeros([2, 3, 448, 448], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(out.grid, (32, 32));
    assert_eq!(out.tokens.size(), vec![2, 1024, 48]);
    assert!(VitConfig {
        hidden_size: 50,
        ..presets::vit_tiny()
    }
    .validate()
    .is_err());
}
