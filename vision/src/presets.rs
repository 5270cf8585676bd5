//! Encoder presets: the two SPEC.md encoders and tiny ones for tests.

use crate::error::{Result, VisionError};
use crate::vit_config::VitConfig;

/// ViTDet-L (on-device, ~300M): patch 16, width 1024, depth 24, 16 heads, MLP 4096, 14×14
/// windows, global blocks 5/11/17/23, one register. At 672 px: 42×42 patches = 3×3 windows.
pub fn vitdet_l() -> VitConfig {
    VitConfig {
        hidden_size: 1024,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        intermediate_size: 4096,
        patch_size: 16,
        num_channels: 3,
        pretrain_image_size: 672,
        image_size: 672,
        window_size: 14,
        global_block_indices: vec![5, 11, 17, 23],
        num_register_tokens: 1,
        register_two_pass: true,
        layer_norm_eps: 1e-6,
        qkv_bias: true,
        position_cls_slot: true,
        final_layer_norm: false,
        conv_stem: Vec::new(),
    }
}

/// ViT-g (server, ~1B): patch 14, width 1408, depth 40, 16 heads, MLP 6144, global attention.
pub fn vit_g() -> VitConfig {
    VitConfig {
        hidden_size: 1408,
        num_hidden_layers: 40,
        num_attention_heads: 16,
        intermediate_size: 6144,
        patch_size: 14,
        window_size: 0,
        global_block_indices: Vec::new(),
        final_layer_norm: true,
        ..vitdet_l()
    }
}

/// Tiny ViTDet for tests: width 64, depth 4, 4 heads, 7×7 windows (2×2 windows at 224 px),
/// global block 3, one register.
pub fn vitdet_tiny() -> VitConfig {
    VitConfig {
        hidden_size: 64,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 256,
        patch_size: 16,
        pretrain_image_size: 224,
        image_size: 224,
        window_size: 7,
        global_block_indices: vec![3],
        ..vitdet_l()
    }
}

/// Tiny global ViT for tests: width 48, depth 2, 3 heads, patch 14.
pub fn vit_tiny() -> VitConfig {
    VitConfig {
        hidden_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 192,
        patch_size: 14,
        pretrain_image_size: 224,
        image_size: 224,
        window_size: 0,
        global_block_indices: Vec::new(),
        final_layer_norm: true,
        ..vitdet_l()
    }
}

/// The preset names accepted by [`preset`].
pub const PRESETS: [&str; 4] = ["vitdet-l", "vit-g", "vitdet-tiny", "vit-tiny"];

/// A preset by name.
pub fn preset(name: &str) -> Result<VitConfig> {
    match name {
        "vitdet-l" => Ok(vitdet_l()),
        "vit-g" => Ok(vit_g()),
        "vitdet-tiny" => Ok(vitdet_tiny()),
        "vit-tiny" => Ok(vit_tiny()),
        other => Err(VisionError::Config(format!(
            "unknown encoder preset `{other}` (expected one of {})",
            PRESETS.join(", ")
        ))),
    }
}
