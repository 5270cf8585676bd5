//! afm-vl: a thin facade over the workspace crates.
//!
//! - [`text`]: tokenizer, decoders, KV cache, checkpoints, generation.
//! - [`vision`]: image loading, tiler, ViT encoders.
//! - [`fusion`]: adapter, vision-language model, describe.
//! - [`eval`]: benchmark runner.

pub use afm_eval as eval;
pub use afm_fusion as fusion;
pub use afm_text as text;
pub use afm_vision as vision;
