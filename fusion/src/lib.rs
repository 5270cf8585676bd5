//! afm-fusion: the vision→language adapter, the vision-language model and `describe`.
//!
//! - [`adapter`]: transformer layer → linear → 3×3 conv → average pooling (SPEC.md), with an
//!   optional count token.
//! - [`config`]: the VLM checkpoint's `config.json`.
//! - [`prompt`]: chat-template prompt assembly with image placeholders, and the splice.
//! - [`model`]: [`VisionLanguageModel`]: load, encode images, describe.
//! - [`smolvlm`]: SmolVLM checkpoints (HF layout): the Idefics3 processor, the SigLIP encoder,
//!   the pixel-shuffle [`connector`], our text decoder.
//! - [`scene`], [`caption`]: the generated scenes the demo checkpoint is trained on, their
//!   captions, and caption scoring.

pub mod adapter;
pub mod caption;
pub mod config;
pub mod connector;
pub mod error;
mod font;
pub mod model;
pub mod prompt;
pub mod scene;
pub mod smolvlm;

pub use adapter::{Adapter, AdapterConfig, CountTokenConfig};
pub use config::VlmConfig;
pub use error::{FusionError, Result};
pub use model::{Description, Timings, VisionLanguageModel};
pub use smolvlm::SmolVlm;
pub mod eval_demo;
pub mod train_demo;
