//! Checkpoint and tokenizer formats: safetensors, GGUF, PyTorch `.pt` (read and written), tamm
//! folders and adapters, SentencePiece and HF tokenizers, conversions. Names and layouts are
//! translated here, at load time, into the model's modules.

pub mod atomic_write;
pub mod checkpoint;
pub mod convert;
pub mod convert_tamm;
pub mod gguf;
pub mod pt;
pub mod pt_write;
pub mod spm;
pub mod tamm;
pub mod tamm_adapter;
pub mod tamm_ptmoe;
pub mod tokenizer;
pub mod weights;
