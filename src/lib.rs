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
//!
//! # Quick start
//!
//! The same code runs on every device: here a LoRA linear, `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, forward
//! and backward through the tape on the CPU, each CUDA device and each wgpu adapter this
//! machine has, checked against the f64 reference of [`kernels::lora`]. On CUDA the
//! tensor-core kernels take bf16 activations and frozen weights, with f32 adapters and f32
//! gradients for them; the CPU and wgpu run f32.
//!
//! ```
//! use tuna::kernels::lora::{reference, LoraParams};
//! use tuna::testing::{compare, Tolerance};
//! use tuna::{ops, DType, Device, Tape, Tensor};
//!
//! let p = LoraParams { m: 5, n: 12, k: 40, r: 4, scale: 2.0 };
//! let values = |len: usize, step: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * step).sin() / 2.0).collect() };
//! let (x, w, a, b, dy) = (values(p.m * p.k, 0.7), values(p.n * p.k, 1.3), values(p.r * p.k, 0.9), values(p.n * p.r, 1.1), values(p.m * p.n, 0.5));
//!
//! for info in Device::available() {
//!     let dev = info.device;
//!     let (act, tol) = match dev {
//!         Device::Cuda(_) => (DType::BF16, Tolerance::BF16),
//!         _ => (DType::F32, Tolerance::F32),
//!     };
//!     let on = |v: &[f32], dims: [usize; 2], dtype: DType| Tensor::from_slice(v, dims, &dev)?.to_dtype(dtype);
//!     let tape = Tape::new();
//!     let at = tape.param(&on(&a, [p.r, p.k], DType::F32)?);
//!     let bt = tape.param(&on(&b, [p.n, p.r], DType::F32)?);
//!     let (xt, wt) = (on(&x, [p.m, p.k], act)?, on(&w, [p.n, p.k], act)?);
//!     let y = ops::lora_linear(&xt, &wt, None, &at, &bt, p.scale, None)?;
//!     let grads = tape.backward_from(&y, &on(&dy, [p.m, p.n], act)?)?;
//!
//!     // The reference, in f64 on the values the device holds (bf16-rounded on CUDA).
//!     let held = |v: &[f32], dims: [usize; 2], dtype: DType| -> tuna::Result<Vec<f64>> { tuna::testing::to_f64(&Tensor::from_slice(v, dims, &Device::Cpu)?.to_dtype(dtype)?) };
//!     let (x64, w64, dy64) = (held(&x, [p.m, p.k], act)?, held(&w, [p.n, p.k], act)?, held(&dy, [p.m, p.n], act)?);
//!     let (a64, b64) = (held(&a, [p.r, p.k], DType::F32)?, held(&b, [p.n, p.r], DType::F32)?);
//!     let (y_ref, xa_ref) = reference::forward(&x64, &x64, &w64, None, &a64, &b64, p);
//!     let (_, da_ref, db_ref) = reference::backward(&dy64, &x64, &xa_ref, &w64, &a64, &b64, None, p);
//!     let check = |what: &str, got: &Tensor, want: &[f64]| -> tuna::Result<()> {
//!         compare(&format!("{what} on {dev}"), &got.to_vec_f32()?, want, tol).map_err(tuna::Error::InvalidArgument)
//!     };
//!     check("y", &y, &y_ref)?;
//!     check("dA", grads.get(&at).expect("A is a parameter"), &da_ref)?;
//!     check("dB", grads.get(&bt).expect("B is a parameter"), &db_ref)?;
//! }
//! # Ok::<(), tuna::Error>(())
//! ```
//!
//! The launchers under [`kernels`] take the runtimes' own types instead, for a program with
//! its own cudarc context or wgpu device (see [`kernels::lora::cuda`]).

/// The text of `kernels-wgsl/$name` with its `#include "part.wgsli"` lines inlined, as
/// `build.rs` wrote and validated it.
macro_rules! wgsl_source {
    ($name:literal) => {
        include_str!(concat!(env!("OUT_DIR"), "/wgsl/", $name))
    };
}

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
