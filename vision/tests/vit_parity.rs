//! Acceptance 1: with registers off and the same random weights, the encoder matches HF
//! transformers' `VitDetModel` (absolute positions, no relative ones, same window size and
//! global blocks) to max |Δ| ≤ 1e-4 on two inputs. The reference is built here: Python makes a
//! random `VitDetModel`, saves it with `save_pretrained` (config.json + model.safetensors) and
//! its outputs on two inputs; Rust loads the config and weights by their HF names.

mod common;

use afm_vision::{VisionModel, VitConfig};
use tch::{Device, Tensor};

const HF_REFERENCE: &str = r#"
import sys, torch
from transformers import VitDetConfig, VitDetModel
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)
cfg = VitDetConfig(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4,
    patch_size=16, image_size=224, pretrain_image_size=224, layer_norm_eps=1e-6,
    window_size=7, window_block_indices=[0, 1, 3],  # block 2 is global
    use_absolute_position_embeddings=True, use_relative_position_embeddings=False,
    qkv_bias=True, hidden_act="gelu",
)
model = VitDetModel(cfg).eval()
with torch.no_grad():  # make every parameter (LayerNorms included) non-trivial
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
model.save_pretrained(out, safe_serialization=True)
x1 = torch.randn(2, 3, 224, 224)   # 14×14 grid: 2×2 windows of 7, learnt positions as is
x2 = torch.randn(1, 3, 160, 256)   # 10×16 grid: padded windows, bicubic positions
with torch.no_grad():
    y1 = model(x1).last_hidden_state.contiguous()  # [B, C, gh, gw]
    y2 = model(x2).last_hidden_state.contiguous()
save_file({"x1": x1, "y1": y1, "x2": x2, "y2": y2}, out + "/io.safetensors")
print("ok")
"#;

#[test]
fn matches_hf_vitdet_model() {
    let Some(py) = common::python_with(&["torch", "transformers", "safetensors"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    common::run_python(&py, HF_REFERENCE, &[d]);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let cfg = VitConfig::from_hf_vitdet(&json).unwrap();
    assert_eq!(cfg.num_register_tokens, 0);
    assert_eq!(cfg.global_block_indices, vec![2]);
    let model =
        VisionModel::from_safetensors(&cfg, &dir.path().join("model.safetensors"), Device::Cpu)
            .unwrap();

    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    for (x, y) in [("x1", "y1"), ("x2", "y2")] {
        let out = model.forward(&io[x]).unwrap();
        let want = io[y].permute([0, 2, 3, 1]); // [B, gh, gw, C]
        let got = out.grid_tokens().unwrap();
        assert_eq!(got.size(), want.size(), "{x}");
        let max = (got - want).abs().max().double_value(&[]);
        eprintln!("ViTDet parity {x}: max |Δ| = {max:.3e}");
        assert!(max <= 1e-4, "{x}: max |Δ| {max} > 1e-4");
    }
}
