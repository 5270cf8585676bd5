//! The optional convolutional stem before patchify (`VitConfig::conv_stem`).

use afm_vision::{presets, VisionModel, VitConfig};
use tch::{Device, Kind, Tensor};

fn stem_config(stem: Vec<i64>) -> VitConfig {
    VitConfig {
        patch_size: 8,
        pretrain_image_size: 128,
        image_size: 128,
        conv_stem: stem,
        ..presets::vitdet_tiny()
    }
}

#[test]
fn stem_keeps_the_token_grid_and_names_its_weights() {
    let cfg = stem_config(vec![8, 16]);
    cfg.validate().unwrap();
    let m = VisionModel::random(&cfg, 0, Device::Cpu).unwrap();
    let vars = m.vs.variables();
    let shape = |suffix: &str| -> Vec<i64> {
        let (_, t) = vars
            .iter()
            .find(|(k, _)| k.ends_with(suffix))
            .unwrap_or_else(|| panic!("no variable ending in {suffix}: {:?}", vars.keys()));
        t.size()
    };
    assert_eq!(shape("stem.0.weight"), vec![8, 3, 3, 3]);
    assert_eq!(shape("stem.1.weight"), vec![16, 8, 3, 3]);
    // The projection now covers 8 / 2² = 2 stem pixels per token side.
    assert_eq!(shape("projection.weight"), vec![cfg.hidden_size, 16, 2, 2]);
    for side in [96, 128] {
        let out = m
            .forward(&Tensor::zeros(
                [2, 3, side, side],
                (Kind::Float, Device::Cpu),
            ))
            .unwrap();
        assert_eq!(out.grid, (side / 8, side / 8));
    }
}

#[test]
fn stem_output_depends_on_pixels_within_its_receptive_field_only() {
    // A change in the top-left 8×8 patch reaches token (0, 0) through the stem; the stem's
    // receptive field (3 + 2·2 + 2·4 − … ≤ 16 px) cannot reach a token 3 patches away before
    // attention, so compare the patch embedding only via a model with no blocks.
    let cfg = VitConfig {
        num_hidden_layers: 0,
        global_block_indices: Vec::new(),
        num_register_tokens: 0,
        final_layer_norm: false,
        ..stem_config(vec![8, 16])
    };
    let m = VisionModel::random(&cfg, 1, Device::Cpu).unwrap();
    let a = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let b = a.copy();
    let _ = b.narrow(2, 0, 4).narrow(3, 0, 4).fill_(3.0);
    let ta = m.forward(&a).unwrap().tokens; // [1, 64, C]
    let tb = m.forward(&b).unwrap().tokens;
    let diff = (ta - tb).abs().sum_dim_intlist(2, false, Kind::Float); // [1, 64]
    assert!(
        diff.double_value(&[0, 0]) > 1e-3,
        "token (0, 0) must see the change"
    );
    for (i, j) in [(0, 3), (3, 0), (4, 4), (7, 7)] {
        assert_eq!(
            diff.double_value(&[0, i * 8 + j]),
            0.0,
            "token ({i}, {j}) is outside the stem's receptive field"
        );
    }
}

#[test]
fn bad_stems_are_refused_and_empty_stems_stay_out_of_config_json() {
    assert!(stem_config(vec![8, 0]).validate().is_err());
    // patch 8 cannot be split by four stride-2 convolutions.
    assert!(stem_config(vec![4, 4, 4, 4]).validate().is_err());
    let plain = serde_json::to_value(presets::vitdet_tiny()).unwrap();
    assert!(plain.get("conv_stem").is_none());
    let with = serde_json::to_value(stem_config(vec![8, 16])).unwrap();
    assert_eq!(with["conv_stem"], serde_json::json!([8, 16]));
    let back: VitConfig = serde_json::from_value(with).unwrap();
    assert_eq!(back.conv_stem, vec![8, 16]);
}

#[test]
fn gradients_reach_the_stem_through_window_and_register_blocks() {
    let cfg = VitConfig {
        window_size: 2,
        global_block_indices: vec![1],
        num_hidden_layers: 2,
        num_register_tokens: 1,
        ..stem_config(vec![8, 16])
    };
    let m = VisionModel::random(&cfg, 2, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let out = m.encoder.forward(&x).unwrap();
    let loss =
        out.tokens.square().mean(Kind::Float) + out.registers.unwrap().square().mean(Kind::Float);
    loss.backward();
    for (name, var) in m.vs.variables() {
        let g = var.grad();
        assert!(g.defined(), "{name}: no gradient");
        let n = g.abs().sum(Kind::Float).double_value(&[]);
        println!("{name}: {n:.3e}");
        assert!(n > 0.0, "{name}: zero gradient");
    }
}
