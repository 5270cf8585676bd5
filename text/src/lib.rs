//! afm-text: the text side of afm-vl.
//!
//! Tokenizer, the dense two-segment decoder of AFM 2025 on-device (which with zero segment-1
//! layers is a Llama-style decoder), the server PT-MoE decoder, their KV cache, checkpoint
//! loading (safetensors, GGUF), and generation.

pub mod atomic_write;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod convert_tamm;
pub mod cuda_stream;
pub mod decoder;
pub mod device;
pub mod embedding;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod inspect;
pub mod kv_cache;
pub mod layer;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod norm;
pub mod presets;
pub mod pt;
pub mod pt_write;
pub mod ptmoe;
pub mod ptmoe_config;
pub mod quant;
pub mod rope;
pub mod sampling;
pub mod speculative;
pub mod spm;
pub mod tamm;
pub mod tamm_adapter;
pub mod tokenizer;
pub mod train_lora;
pub mod weights;

pub use config::TextConfig;
pub use decoder::{Decoder, Logits};
pub use device::DeviceSpec;
pub use error::{Result, TextError};
pub use generation::{GenerateOptions, Generation, StopReason};
pub use kv_cache::KvCache;
pub use model::{DType, TextModel};
pub use ptmoe::{PtMoe, PtMoeCache, TrackExec};
pub use ptmoe_config::PtMoeConfig;
pub use sampling::SamplingConfig;
pub use tokenizer::{ChatMessage, Tokenizer};
