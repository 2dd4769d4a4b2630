//! Parameter-efficient fine-tuning methods. LoRA so far, in PEFT's file format.

mod lora;

pub use lora::{load_adapter, save_adapter, LoraAdapter, LoraConfig};
