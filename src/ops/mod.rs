//! Ops on tensors. Each op checks its inputs (shape, dtype, device: errors name both sides),
//! dispatches to a launcher in `kernels/` by device, and records its hand-written backward on
//! the tape when an input is tracked. Backward closures are themselves written with ops, so a
//! backward runs wherever its tensors live.
//!
//! Every op has a CPU path. On wgpu, every op of the Llama model's forward and backward runs
//! on its WGSL kernel (shared plumbing in `gpu.rs`), and on CUDA on its CUDA kernel in bf16
//! (`cuda.rs`; compiled and checked by ptxas here, run by `tools/gpu-check`). Elsewhere a GPU
//! tensor gets `Error::Unsupported` naming the op and device.

mod attention;
mod checkpoint;
pub(crate) mod cuda;
pub(crate) mod gpu;
mod linalg;
mod lora;
mod lora_gpu;
mod loss;
mod nn;
mod pointwise;
mod reduce;
mod shape;
mod sparse;

pub use attention::{attention, rmsnorm_rope, rope, AttentionMask};
pub use checkpoint::checkpoint;
pub use linalg::matmul;
pub use lora::{linear_group, linear_group_remade, lora_linear, Dropout, LinearPart, Remake};
pub use loss::{cross_entropy, linear_cross_entropy};
pub use nn::{add_rmsnorm, embedding, rmsnorm, rmsnorm_backward, rmsnorm_forward, RmsNormOutput};
pub use crate::kernels::elementwise::GluAct;
pub use pointwise::{add, glu, mul, scale, silu, swiglu};
pub use reduce::{argmax_last, mean, softmax, sum};
pub use shape::{cast, reshape};
pub use sparse::sparse_linear;

use crate::{DType, Error, Result, Tensor};

pub(crate) fn same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, lhs: a.device(), rhs: b.device() });
    }
    Ok(())
}

pub(crate) fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    Ok(())
}

pub(crate) fn expect_dtype(op: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch { op, lhs: t.dtype(), rhs: dtype });
    }
    Ok(())
}

/// A frozen weight's dtype against the activations' `dt`: the same, or with f32 activations an
/// NF4 weight (read dequantized) or, on the CPU, an untracked bf16 one (read widened:
/// `Llama::matrices_in_bf16`).
pub(crate) fn expect_weight_dtype(op: &'static str, w: &Tensor, dt: DType) -> Result<()> {
    match w.dtype() {
        DType::NF4 if dt == DType::F32 => Ok(()),
        DType::BF16 if dt == DType::F32 && w.device() == crate::Device::Cpu && !w.is_tracked() => Ok(()),
        _ => expect_dtype(op, w, dt),
    }
}

/// A detached copy of the handle (same storage, not tracked) for a backward closure to keep.
pub(crate) fn saved(t: &Tensor) -> Tensor {
    t.share(t.shape().clone(), None)
}
