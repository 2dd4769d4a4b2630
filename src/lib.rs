//! tuna: hand-written CUDA and WGSL kernels for fine-tuning decoder language models, with a
//! minimal tape-based autograd.
//!
//! Layers, bottom up (each uses only those below it):
//! - `kernels-cuda/`, `kernels-wgsl/`, `build.rs`: the kernels and their build;
//! - [`device`]: the CPU, CUDA and wgpu runtimes and the [`Device`] enum;
//! - [`kernels`]: launchers (CPU reference, fast CPU path, CUDA and WGSL launchers) over each
//!   runtime's native types, usable without tuna's tensors;
//! - [`Tensor`] and [`ops`]: tensors on a device and the ops that dispatch to launchers;
//! - [`Tape`]: reverse-mode autograd;
//! - [`testing`]: the tolerance rule and the gradient checker the tests share.

pub mod device;
mod dtype;
mod error;
pub mod io;
pub mod kernels;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod rng;
mod tape;
mod tensor;
pub mod testing;
pub mod train;

pub use device::{Device, DeviceInfo};
pub use dtype::{DType, Element, Shape};
pub use error::{Error, Result};
pub use tape::{Gradients, Tape};
pub use tensor::{CpuStorage, PendingValues, Storage, Tensor, TensorId};
