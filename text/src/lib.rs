//! afm-text: the text side of afm-vl.
//!
//! Tokenizer, the dense two-segment decoder of AFM 2025 on-device (which with zero segment-1
//! layers is a Llama-style decoder), its KV cache, checkpoint loading (safetensors, GGUF),
//! and generation.

pub mod device;
pub mod error;

pub use device::DeviceSpec;
pub use error::{Result, TextError};
