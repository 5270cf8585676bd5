//! Adapting a trained model: LoRA adapters (overlays, training) and quantization.

pub mod lora;
pub mod quant;
pub mod train_lora;
