//! The ViT encoder: patch embedding → + absolute positions → blocks (window / global,
//! register-window tokens) → optional final LayerNorm.
//!
//! Parameters live in a `tch::nn::VarStore` under HF `VitDetModel` names
//! (`embeddings.projection.weight`, `encoder.layer.{i}.attention.qkv.weight`, …) plus
//! `embeddings.register_tokens` and `layernorm.*`, so they are trainable with tch autograd and a
//! checkpoint loads by name (see [`crate::weights`]).

use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::block::Block;
use crate::error::{Result, VisionError};
use crate::patch_embed::PatchEmbed;
use crate::position::PositionEmbedding;
use crate::vit_config::VitConfig;

/// Tokens `[B, gh, gw, C]` and registers `[B, R, C]` after one block.
pub type BlockState = (Tensor, Option<Tensor>);

/// What the encoder returns.
#[derive(Debug)]
pub struct EncoderOutput {
    /// `[B, gh * gw, C]`, row-major over the grid.
    pub tokens: Tensor,
    /// The token grid `(gh, gw)`.
    pub grid: (i64, i64),
    /// `[B, R, C]` when registers are on.
    pub registers: Option<Tensor>,
}

impl EncoderOutput {
    /// Tokens as a grid: `[B, gh, gw, C]`.
    pub fn grid_tokens(&self) -> Result<Tensor> {
        let (b, _, c) = self.tokens.size3()?;
        Ok(self.tokens.f_reshape([b, self.grid.0, self.grid.1, c])?)
    }
}

#[derive(Debug)]
pub struct VisionEncoder {
    pub config: VitConfig,
    patch: PatchEmbed,
    position: PositionEmbedding,
    /// `[1, R, C]`.
    registers: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Option<nn::LayerNorm>,
}

impl VisionEncoder {
    /// Creates the parameters under `p` (random init).
    pub fn new(p: &nn::Path, config: &VitConfig) -> Result<Self> {
        config.validate()?;
        let emb = p / "embeddings";
        let registers = (config.num_register_tokens > 0).then(|| {
            emb.var(
                "register_tokens",
                &[1, config.num_register_tokens, config.hidden_size],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        });
        let layers = p / "encoder" / "layer";
        let blocks = (0..config.num_hidden_layers)
            .map(|i| Block::new(&layers / i, config, i))
            .collect();
        let final_norm = config.final_layer_norm.then(|| {
            nn::layer_norm(
                p / "layernorm",
                vec![config.hidden_size],
                nn::LayerNormConfig {
                    eps: config.layer_norm_eps,
                    ..Default::default()
                },
            )
        });
        Ok(Self {
            config: config.clone(),
            patch: PatchEmbed::new(&emb, config),
            position: PositionEmbedding::new(&emb, config),
            registers,
            blocks,
            final_norm,
        })
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// `[B, 3, H, W]` → tokens, grid and registers.
    pub fn forward(&self, pixels: &Tensor) -> Result<EncoderOutput> {
        Ok(self.forward_with_hidden(pixels, false)?.0)
    }

    /// Like [`forward`](Self::forward), also returning `(tokens [B, gh, gw, C], registers)`
    /// after every block when `keep` is set.
    pub fn forward_with_hidden(
        &self,
        pixels: &Tensor,
        keep: bool,
    ) -> Result<(EncoderOutput, Vec<BlockState>)> {
        let size = pixels.size();
        let c = self.config.num_channels;
        let ps = self.config.patch_size;
        if size.len() != 4 || size[1] != c || size[2] < ps || size[3] < ps {
            return Err(VisionError::Shape(format!(
                "encoder input must be [batch, {c}, H, W] with H, W ≥ {ps}, got {size:?}"
            )));
        }
        let b = size[0];
        let pixels = pixels.f_to_kind(self.kind())?;
        let x = self.patch.forward(&pixels)?; // [B, gh, gw, C]
        let (_, gh, gw, width) = x.size4()?;
        let mut x = x.f_add(&self.position.forward(gh, gw)?)?;
        let mut regs = match &self.registers {
            Some(r) => Some(r.f_expand([b, r.size()[1], width], false)?), // [B, R, C]
            None => None,
        };
        let mut hidden = Vec::new();
        for block in &self.blocks {
            let (nx, nr) = block.forward(&x, regs.as_ref())?;
            x = nx;
            regs = nr;
            if keep {
                hidden.push((x.shallow_clone(), regs.as_ref().map(|r| r.shallow_clone())));
            }
        }
        if let Some(norm) = &self.final_norm {
            x = norm.forward(&x);
            regs = regs.map(|r| norm.forward(&r));
        }
        let tokens = x.f_reshape([b, gh * gw, width])?;
        Ok((
            EncoderOutput {
                tokens,
                grid: (gh, gw),
                registers: regs,
            },
            hidden,
        ))
    }

    fn kind(&self) -> Kind {
        self.position.table.kind()
    }
}

/// An encoder together with the VarStore owning its parameters.
pub struct VisionModel {
    pub vs: nn::VarStore,
    pub encoder: VisionEncoder,
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionModel")
            .field("config", &self.encoder.config)
            .finish()
    }
}

impl VisionModel {
    /// Random parameters from `seed` (libtorch's generator is seeded with it).
    pub fn random(config: &VitConfig, seed: i64, device: Device) -> Result<Self> {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let encoder = VisionEncoder::new(&vs.root(), config)?;
        Ok(Self { vs, encoder })
    }

    /// Parameters from a safetensors checkpoint (HF `VitDetModel` names accepted).
    pub fn from_safetensors(
        config: &VitConfig,
        path: &std::path::Path,
        device: Device,
    ) -> Result<Self> {
        let model = Self::random(config, 0, device)?;
        crate::weights::load_safetensors(&model.vs, "", path)?;
        Ok(model)
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<EncoderOutput> {
        let _guard = tch::no_grad_guard();
        self.encoder.forward(&pixels.f_to_device(self.vs.device())?)
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}
