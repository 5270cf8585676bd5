//! Acceptance 2: register-window information flow. A tiny encoder of window blocks only (7×7
//! windows, a 224-px input = 2×2 windows). Perturbing the pixels of window (0, 0):
//! - registers on (two-pass, the presets' default): after one window block the registers and
//!   the tokens of the other windows change;
//! - registers on, one pass: after one block the registers change; after the next window block
//!   the tokens of the other windows change;
//! - registers off: the other windows' tokens stay bit-identical after any number of blocks.

use afm_vision::{presets, VisionModel, VitConfig};
use tch::{Device, Kind, Tensor};

fn windows_only(registers: i64, two_pass: bool) -> VitConfig {
    VitConfig {
        num_hidden_layers: 2,
        global_block_indices: vec![],
        num_register_tokens: registers,
        register_two_pass: two_pass,
        ..presets::vitdet_tiny()
    }
}

/// Max |Δ| over the tokens outside window (0, 0), and over the registers, after each block.
fn effect(cfg: &VitConfig) -> Vec<(f64, Option<f64>)> {
    let model = VisionModel::random(cfg, 7, Device::Cpu).unwrap();
    tch::manual_seed(1);
    let x = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let y = x.copy();
    // Window (0, 0) = tokens [0, 7) × [0, 7) = pixels [0, 112) × [0, 112).
    let _ = y
        .narrow(2, 0, 112)
        .narrow(3, 0, 112)
        .g_add_(&Tensor::randn([1, 3, 112, 112], (Kind::Float, Device::Cpu)));
    let _g = tch::no_grad_guard();
    let (_, ha) = model.encoder.forward_with_hidden(&x, true).unwrap();
    let (_, hb) = model.encoder.forward_with_hidden(&y, true).unwrap();
    let mask = Tensor::ones([1, 14, 14, 1], (Kind::Float, Device::Cpu));
    let _ = mask.narrow(1, 0, 7).narrow(2, 0, 7).fill_(0.0);
    ha.iter()
        .zip(&hb)
        .map(|((ta, ra), (tb, rb))| {
            let tok = ((ta - tb).abs() * &mask).max().double_value(&[]);
            let reg = match (ra, rb) {
                (Some(a), Some(b)) => Some((a - b).abs().max().double_value(&[])),
                _ => None,
            };
            (tok, reg)
        })
        .collect()
}

#[test]
fn registers_carry_information_between_windows_within_one_block() {
    assert!(presets::vitdet_tiny().register_two_pass, "the default");
    let on = effect(&windows_only(1, true));
    eprintln!("registers on, two-pass (other windows' tokens, registers) per block: {on:?}");
    assert!(on[0].1.unwrap() > 1e-4, "{on:?}");
    assert!(on[0].0 > 1e-4, "other windows after one block: {on:?}");
}

#[test]
fn one_pass_registers_carry_information_a_block_later() {
    let on = effect(&windows_only(1, false));
    eprintln!("registers on (other windows' tokens, registers) per block: {on:?}");
    // Block 1: the registers (the cross-window channel) change, the other windows not yet ...
    assert!(on[0].1.unwrap() > 1e-4, "{on:?}");
    assert_eq!(on[0].0, 0.0, "{on:?}");
    // ... and block 2's window attention brings it into the other windows' tokens.
    assert!(on[1].0 > 1e-4, "{on:?}");
}

#[test]
fn without_registers_windows_are_isolated() {
    let off = effect(&windows_only(0, true));
    eprintln!("registers off (other windows' tokens) per block: {off:?}");
    for (tok, reg) in off {
        assert_eq!(tok, 0.0);
        assert!(reg.is_none());
    }
}

#[test]
fn global_block_registers_join_the_sequence() {
    let cfg = VitConfig {
        num_hidden_layers: 1,
        global_block_indices: vec![0],
        num_register_tokens: 2,
        ..presets::vitdet_tiny()
    };
    let model = VisionModel::random(&cfg, 3, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let out = model.forward(&x).unwrap();
    assert_eq!(out.tokens.size(), vec![2, 196, 64]);
    assert_eq!(out.registers.unwrap().size(), vec![2, 2, 64]);
    assert!(model.num_parameters() > 0);
}
