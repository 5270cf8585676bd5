//! Running the models: the KV cache, generation and sampling, speculative decoding, devices
//! and CUDA streams.

pub mod cpu_decode;
pub mod cpu_kernels;
pub mod cpu_pool;
pub mod cuda_stream;
pub mod device;
pub mod generation;
pub mod kv_cache;
pub mod sampling;
pub mod speculative;
