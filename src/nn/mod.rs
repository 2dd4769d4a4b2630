//! Models built on tuna's ops and tape.

pub mod generate;
pub mod llama;

pub use generate::{GenerateOptions, Sampler};
pub use llama::{KvCache, Linear, Llama, Packing};
