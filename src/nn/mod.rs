//! Models built on tuna's ops and tape.

pub mod generate;
mod kv_cache;
mod linear;
pub mod llama;

pub use generate::{GenerateOptions, Sampler};
pub use kv_cache::KvCache;
pub use llama::{Linear, Llama, Packing};
