//! Configuration of the ViT encoders (HF `VitDetConfig`-style names where they exist).

use serde::{Deserialize, Serialize};

use crate::error::{Result, VisionError};

/// A ViT encoder: patch embedding, learned absolute positions, pre-norm blocks with window or
/// global attention, optional register tokens (the register-window scheme of SPEC.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VitConfig {
    /// Width of the tokens.
    pub hidden_size: i64,
    /// Number of blocks.
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Hidden width of the MLP.
    pub intermediate_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    /// Image side the position embedding was learnt at (its grid is this / `patch_size`);
    /// other grids get a bicubic interpolation.
    pub pretrain_image_size: i64,
    /// Nominal input side (the tiler's tile side).
    pub image_size: i64,
    /// Window side in tokens; 0 means every block is global.
    pub window_size: i64,
    /// Blocks with global attention; every other block uses windows (when `window_size > 0`).
    pub global_block_indices: Vec<i64>,
    /// Register tokens `R` (0 turns the register-window scheme off).
    pub num_register_tokens: i64,
    /// Window blocks in two passes: the registers first gather from every window, then each
    /// window attends over `[gathered registers; its tokens]`, so one window reaches every other
    /// window within the same block (the presets). `false`: one pass, windows see the
    /// registers' input values and cross-window information arrives one block later (cheaper;
    /// the demo checkpoint was trained so).
    pub register_two_pass: bool,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    /// The position table has a leading class-token slot (HF `VitDetModel` layout); it is
    /// skipped when adding positions.
    pub position_cls_slot: bool,
    /// A LayerNorm after the last block (`layernorm.*`); HF `VitDetModel` has none.
    pub final_layer_norm: bool,
    /// Optional convolutional stem before patchify ("early convolutions", Xiao et al. 2021):
    /// one 3×3 stride-2 convolution + GELU per entry (its output channels), then the patch
    /// projection with kernel = stride = `patch_size / 2^len`. Empty (the presets): the plain
    /// `patch × patch` projection. Small encoders trained from scratch learn shapes far
    /// faster with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conv_stem: Vec<i64>,
}

impl Default for VitConfig {
    fn default() -> Self {
        crate::presets::vitdet_l()
    }
}

impl VitConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// Side of the learnt position grid.
    pub fn position_grid(&self) -> i64 {
        self.pretrain_image_size / self.patch_size
    }

    /// Whether block `i` uses window attention.
    pub fn is_window_block(&self, i: i64) -> bool {
        self.window_size > 0 && !self.global_block_indices.contains(&i)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VisionError::Config(m));
        if self.hidden_size <= 0 || self.num_attention_heads <= 0 || self.num_hidden_layers < 0 {
            return bad("hidden_size, num_attention_heads must be positive".into());
        }
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("patch_size", self.patch_size, 1024),
            ("pretrain_image_size", self.pretrain_image_size, 8192),
            ("image_size", self.image_size, 8192),
            ("num_channels", self.num_channels, 64),
            (
                "conv_stem channels",
                self.conv_stem.iter().copied().max().unwrap_or(0),
                1 << 16,
            ),
            ("num_register_tokens", self.num_register_tokens, 4096),
            ("window_size", self.window_size, 4096),
        ] {
            if v > max {
                return bad(format!("{name} {v} is larger than the limit of {max}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size <= 0 || self.pretrain_image_size < self.patch_size {
            return bad(format!(
                "patch_size {} must be positive and at most pretrain_image_size {}",
                self.patch_size, self.pretrain_image_size
            ));
        }
        if self.intermediate_size <= 0 || self.num_channels <= 0 {
            return bad("intermediate_size and num_channels must be positive".into());
        }
        if self.window_size < 0 || self.num_register_tokens < 0 {
            return bad("window_size and num_register_tokens must be non-negative".into());
        }
        if !self.conv_stem.is_empty() {
            let down = 1i64.checked_shl(self.conv_stem.len() as u32).unwrap_or(0);
            if self.conv_stem.iter().any(|&c| c <= 0) || down == 0 || self.patch_size % down != 0 {
                return bad(format!(
                    "conv_stem {:?}: channels must be positive and patch_size {} a multiple of \
                     2^{} (one stride-2 convolution per entry)",
                    self.conv_stem,
                    self.patch_size,
                    self.conv_stem.len()
                ));
            }
        }
        Ok(())
    }

    /// Reads an HF `VitDetConfig` (`config.json`): `mlp_ratio` → `intermediate_size`,
    /// `window_block_indices` → the complement in `global_block_indices`. Relative position
    /// embeddings and residual blocks are not supported and rejected.
    pub fn from_hf_vitdet(json: &serde_json::Value) -> Result<Self> {
        let get_i = |k: &str, d: i64| json.get(k).and_then(|v| v.as_i64()).unwrap_or(d);
        if json
            .get("use_relative_position_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            return Err(VisionError::Config(
                "relative position embeddings are not supported (use absolute ones)".into(),
            ));
        }
        if json
            .get("residual_block_indices")
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
        {
            return Err(VisionError::Config(
                "VitDet residual (bottleneck) blocks are not supported".into(),
            ));
        }
        if let Some(act) = json.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "gelu" {
                return Err(VisionError::Config(format!(
                    "hidden_act `{act}` is not supported (gelu)"
                )));
            }
        }
        let hidden = get_i("hidden_size", 768);
        let depth = get_i("num_hidden_layers", 12);
        let mlp_ratio = json
            .get("mlp_ratio")
            .and_then(|v| v.as_f64())
            .unwrap_or(4.0);
        let windowed: Vec<i64> = json
            .get("window_block_indices")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
            .unwrap_or_default();
        let window_size = get_i("window_size", 0);
        let size_of = |k: &str, d: i64| match json.get(k) {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_i64()).unwrap_or(d),
            Some(v) => v.as_i64().unwrap_or(d),
            None => d,
        };
        let cfg = VitConfig {
            hidden_size: hidden,
            num_hidden_layers: depth,
            num_attention_heads: get_i("num_attention_heads", 12),
            intermediate_size: (hidden as f64 * mlp_ratio) as i64,
            patch_size: size_of("patch_size", 16),
            num_channels: get_i("num_channels", 3),
            pretrain_image_size: size_of("pretrain_image_size", 224),
            image_size: size_of("image_size", 224),
            window_size,
            global_block_indices: (0..depth).filter(|i| !windowed.contains(i)).collect(),
            num_register_tokens: 0,
            register_two_pass: true,
            conv_stem: Vec::new(),
            layer_norm_eps: json
                .get("layer_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            qkv_bias: json
                .get("qkv_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            position_cls_slot: true,
            final_layer_norm: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
