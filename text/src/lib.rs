//! afm-text: the text side of afm-vl.
//!
//! Tokenizer, the dense two-segment decoder of AFM 2025 on-device (which with zero segment-1
//! layers is a Llama-style decoder), the server PT-MoE decoder, their KV cache, checkpoint
//! loading (safetensors, GGUF, PyTorch `.pt`, tamm folders), and generation. Four folders:
//! - `model/`: configuration, presets and the modules of the decoders (a `forward` each);
//! - `formats/`: checkpoint and tokenizer formats, translated into our modules at load time;
//! - `runtime/`: KV cache, generation, sampling, speculative decoding, devices, CUDA streams;
//! - `adapt/`: LoRA (overlays, training) and quantization.
//!
//! Every module is also reachable at the crate root (`afm_text::config`, `afm_text::tamm`, …).

pub mod adapt;
pub mod error;
pub mod formats;
pub mod model;
pub mod runtime;

pub use adapt::{lora, quant, train_lora};
pub use formats::{
    atomic_write, checkpoint, convert, convert_tamm, gguf, pt, pt_write, spm, tamm, tamm_adapter,
    tamm_ptmoe, tokenizer, weights,
};
pub use model::{
    attention, config, decoder, embedding, inspect, language_model, layer, linear, mlp, moe, norm,
    presets, ptmoe, ptmoe_config, ptmoe_model, rope,
};
pub use runtime::{
    cpu_decode, cpu_pool, cuda_stream, device, generation, kv_cache, sampling, speculative,
};

pub use config::TextConfig;
pub use decoder::{Decoder, Logits};
pub use device::DeviceSpec;
pub use error::{Result, TextError};
pub use generation::{GenerateOptions, Generation, StopReason};
pub use kv_cache::KvCache;
pub use language_model::LanguageModel;
pub use model::{DType, TextModel};
pub use ptmoe::{PtMoe, PtMoeCache, TrackExec};
pub use ptmoe_config::PtMoeConfig;
pub use sampling::SamplingConfig;
pub use tokenizer::{ChatMessage, Tokenizer};
