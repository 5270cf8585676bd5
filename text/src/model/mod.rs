//! The models: configuration, presets, and the modules the decoders are built from, each with
//! its `forward`. They know no file format (see `formats/`).

pub mod attention;
pub mod config;
pub mod decoder;
pub mod embedding;
pub mod inspect;
pub mod language_model;
pub mod layer;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod presets;
pub mod ptmoe;
pub mod ptmoe_config;
pub mod ptmoe_model;
pub mod rope;
mod text_model;

pub use text_model::{
    cpu_bf16_matmul_is_faster, cpu_has_bf16, model_dir_tokenizer, DType, TextModel,
};
