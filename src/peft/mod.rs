//! Parameter-efficient fine-tuning methods: LoRA in PEFT's file format, and SpIEL-style
//! sparse fine-tuning.

mod lora;
pub mod sparse;

pub use lora::{load_adapter, save_adapter, LoraAdapter, LoraConfig};
pub use sparse::{load_deltas, save_deltas, Regrow, SparseConfig};
