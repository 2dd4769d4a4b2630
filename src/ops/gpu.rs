//! What the ops' wgpu paths share: buffer access, outputs, uploads, and the rule for tapes.
//!
//! The model's forward and backward run on wgpu (and on CUDA, `cuda.rs`). An op variant whose
//! backward has no GPU path (a broadcast operand of `add`) refuses a tracked input up front
//! (`forward_only`), rather than failing later inside `Tape::backward`.

use std::sync::Arc;

use crate::device::wgpu::WgpuRuntime;
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Shape, Tensor};

/// The runtime and buffer of a wgpu tensor (the caller checked the device).
pub(crate) fn wgpu_buf(t: &Tensor) -> (&Arc<WgpuRuntime>, &wgpu::Buffer) {
    match t.storage() {
        Storage::Wgpu { rt, buf } => (rt, buf.buffer()),
        _ => unreachable!("device checked by the caller"),
    }
}

/// A new tensor on `rt`'s device whose contents the caller's kernel (of `op`) writes in full;
/// an error naming `op` and the output where it is more than a kernel can bind there.
pub(crate) fn wgpu_output(op: &str, rt: &Arc<WgpuRuntime>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    let bytes = shape.elem_count() * dtype.size_in_bytes();
    rt.check_tensor_bytes(bytes, &format!("{op}: the output ({dtype} {shape})"))?;
    let buf = rt.alloc(bytes);
    Ok(Tensor::from_storage(Storage::Wgpu { rt: rt.clone(), buf }, shape, dtype, Device::Wgpu(rt.index)))
}

/// A host slice as a storage buffer on `rt`'s device (kept alive by the returned handle).
pub(crate) fn wgpu_upload<T: bytemuck::Pod>(rt: &Arc<WgpuRuntime>, data: &[T]) -> crate::device::wgpu::PooledBuffer {
    rt.upload(bytemuck::cast_slice(data))
}

/// The WGSL storage of a float dtype: f32, or f16 (kernels that take a `Precision`; the adapter
/// needs SHADER_F16, which the launchers check).
pub(crate) fn wgpu_precision(dtype: DType) -> Option<crate::device::wgpu::Precision> {
    match dtype {
        DType::F32 => Some(crate::device::wgpu::Precision::F32),
        DType::F16 => Some(crate::device::wgpu::Precision::F16),
        _ => None,
    }
}

/// Why `wgpu_precision` of a `float_dtype` on wgpu is always `Some`.
pub(crate) const WGPU_FLOAT: &str = "float_dtype gives f32 or f16 on wgpu";

/// The float dtype an op runs `t` in on its device: f32, f16 on wgpu, bf16 on CUDA; anything
/// else is an error naming the op.
pub(crate) fn float_dtype(op: &'static str, t: &Tensor) -> Result<DType> {
    match (t.device(), t.dtype()) {
        (Device::Wgpu(_), DType::F16) => Ok(DType::F16),
        (Device::Cuda(_), DType::BF16) => Ok(DType::BF16),
        _ => crate::ops::expect_dtype(op, t, DType::F32).map(|_| DType::F32),
    }
}

/// Refuses inputs recorded on a tape: `op`'s backward runs only on the CPU so far.
pub(crate) fn forward_only(op: &'static str, inputs: &[&Tensor]) -> Result<()> {
    match inputs.iter().find(|t| t.is_tracked()) {
        Some(t) => Err(Error::InvalidArgument(format!(
            "{op} on {}: this input's gradient has no kernel on this device yet, so training it needs the CPU (inference runs here)",
            t.device()
        ))),
        None => Ok(()),
    }
}
