//! Models built on tuna's ops and tape.
//!
//! Greedy generation with the KV cache, on a random model (`Llama::load(dir)` reads a Hugging
//! Face folder instead, and `model.to_device(&Device::Cuda(0))` or `Device::Wgpu(0)` moves it
//! to a GPU):
//!
//! ```
//! use tuna::io::config::LlamaConfig;
//! use tuna::nn::{GenerateOptions, Llama};
//! use tuna::Tensor;
//!
//! let vocab = 64;
//! let model = Llama::random(LlamaConfig::llama(vocab, 64, 128, 2, 4, 2), 1)?;
//! let prompt = [3u32, 14, 15, 9];
//! let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() }; // temperature 0: greedy
//! let mut streamed = Vec::new();
//! let new = model.generate(&prompt, &opts, |token| streamed.push(token))?;
//! assert_eq!(new, streamed);
//!
//! // Each token decoded through the cache is the best next token of one forward pass over the
//! // whole text (up to rounding: the two paths sum in different orders).
//! let text: Vec<i32> = prompt.iter().chain(&new).map(|&t| t as i32).collect();
//! let logits = model.forward(&Tensor::from_vec_i32(text.clone(), [1, text.len()])?, None)?.to_vec_f32()?;
//! for (i, &token) in new.iter().enumerate() {
//!     let row = &logits[(prompt.len() - 1 + i) * vocab..][..vocab];
//!     let best = row.iter().cloned().fold(f32::MIN, f32::max);
//!     assert!(row[token as usize] >= best - 1e-5, "token {i}: {token} is not the best next token");
//! }
//! # Ok::<(), tuna::Error>(())
//! ```

pub mod generate;
mod kv_cache;
mod layer;
mod linear;
pub mod llama;

pub use generate::{GenerateOptions, Sampler};
pub use kv_cache::KvCache;
pub use llama::{Linear, Llama, Packing};
