//! What the ops' CUDA paths share: typed views of a tensor's bytes, new outputs, uploads.
//!
//! On CUDA the model runs in bf16 (activations and frozen weights; f32 statistics, loss and
//! gradient reductions inside the kernels) with f32 masters of the trained tensors: the LoRA
//! linear takes f32 adapters and converts them on the device, and returns f32 gradients for
//! them. Kernels that also have f32 instances (RMSNorm, RoPE, SwiGLU, embedding, add, scale)
//! run f32 tensors too; the tensor-core kernels (GEMM, attention, the fused loss) are 16-bit.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::device::cuda::CudaRuntime;
use crate::kernels::lora::cuda::Half;
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Shape, Tensor};

/// The runtime and buffer of a CUDA tensor (the caller checked the device).
pub(crate) fn cuda_buf(t: &Tensor) -> (&Arc<CudaRuntime>, &CudaSlice<u8>) {
    match t.storage() {
        Storage::Cuda { rt, buf } => (rt, buf),
        _ => unreachable!("device checked by the caller"),
    }
}

/// A CUDA tensor's elements as `T` (the caller names the type of the tensor's dtype: `f32`,
/// `u16` for bf16/f16 bits, `i32`).
pub(crate) fn view<T>(t: &Tensor) -> CudaView<'_, T> {
    assert_eq!(std::mem::size_of::<T>(), t.dtype().size_in_bytes(), "view of a {} tensor with another element size", t.dtype());
    // SAFETY: the buffer was allocated for the tensor's dtype and element count, and T has the
    // dtype's size (asserted above); every bit pattern is a valid f32/u16/i32.
    unsafe { cuda_buf(t).1.transmute::<T>(t.elem_count()) }.expect("a tensor's buffer holds its elements")
}

/// The 16-bit storage type of a tensor-core kernel for `dtype`, or an error naming `op`.
pub(crate) fn half(op: &'static str, dtype: DType) -> Result<Half> {
    match dtype {
        DType::BF16 => Ok(Half::Bf16),
        DType::F16 => Ok(Half::F16),
        d => Err(Error::UnsupportedDType { op, dtype: d }),
    }
}

/// An output being written by a kernel: a device buffer (zeroed, or for a kernel that writes
/// every element, `uninit`), then a tensor.
pub(crate) struct CudaOut {
    rt: Arc<CudaRuntime>,
    buf: CudaSlice<u8>,
    shape: Shape,
    dtype: DType,
}

impl CudaOut {
    pub fn new(rt: &Arc<CudaRuntime>, shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        let shape = shape.into();
        let buf = rt.alloc_zeros(shape.elem_count() * dtype.size_in_bytes())?;
        Ok(CudaOut { rt: rt.clone(), buf, shape, dtype })
    }

    /// An output whose kernel writes every element (no zeroing pass: a GEMM's C, an
    /// elementwise result). Where a kernel accumulates or may skip elements, use `new`.
    pub fn uninit(rt: &Arc<CudaRuntime>, shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        let shape = shape.into();
        let buf = rt.alloc_uninit(shape.elem_count() * dtype.size_in_bytes())?;
        Ok(CudaOut { rt: rt.clone(), buf, shape, dtype })
    }

    /// The elements as `T` for a kernel to write (as `view`).
    pub fn view_mut<T>(&mut self) -> CudaViewMut<'_, T> {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size_in_bytes(), "view of a {} output with another element size", self.dtype);
        let n = self.shape.elem_count();
        // SAFETY: as in `view`.
        unsafe { self.buf.transmute_mut::<T>(n) }.expect("an output's buffer holds its elements")
    }

    /// A copy of `t` (same shape and dtype) for a kernel to change in place.
    pub fn copy_of(t: &Tensor) -> Result<Self> {
        let (rt, src) = cuda_buf(t);
        let mut out = CudaOut::uninit(rt, t.shape().clone(), t.dtype())?;
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if bytes > 0 {
            rt.stream.memcpy_dtod(&src.slice(..bytes), &mut out.buf.slice_mut(..bytes)).map_err(|e| Error::cuda("device copy", e))?;
        }
        Ok(out)
    }

    /// The bytes, for a launcher that takes any dtype.
    pub fn buf_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }

    pub fn tensor(self) -> Tensor {
        let dev = Device::Cuda(self.rt.ordinal);
        Tensor::from_storage(Storage::Cuda { rt: self.rt, buf: self.buf }, self.shape, self.dtype, dev)
    }
}

/// A host slice on `rt`'s device (kernel inputs such as RoPE's frequencies).
pub(crate) fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(rt: &Arc<CudaRuntime>, data: &[T]) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        return rt.stream.alloc_zeros::<T>(1).map_err(|e| Error::cuda("allocating an empty upload", e));
    }
    rt.stream.clone_htod(data).map_err(|e| Error::cuda(format!("copying {} values to cuda:{}", data.len(), rt.ordinal), e))
}

/// Runs `$body` with `$t` the element type of a CUDA float dtype: `f32`, or `u16` (the bits of
/// bf16, the only other float `float_dtype` allows on CUDA).
macro_rules! by_float {
    ($dt:expr, $t:ident => $body:expr) => {
        if $dt == $crate::DType::F32 {
            type $t = f32;
            $body
        } else {
            type $t = u16;
            $body
        }
    };
}
pub(crate) use by_float;

/// `tᵀ` of a 2-D CUDA tensor (`[rows, cols]` → `[cols, rows]`, bits moved), for the products
/// whose first operand is transposed: the GEMM reads A along its rows.
pub(crate) fn transposed(t: &Tensor) -> Result<Tensor> {
    let (rows, cols) = match t.dims() {
        &[r, c] => (r, c),
        _ => return Err(Error::BadShape { op: "transpose (cuda)", shape: t.shape().clone(), expected: "a matrix (rank 2)".into() }),
    };
    let rt = cuda_buf(t).0;
    let mut y = CudaOut::uninit(rt, [cols, rows], t.dtype())?;
    use crate::kernels::elementwise::cuda::transpose;
    match t.dtype().size_in_bytes() {
        2 => transpose::<u16>(&rt.stream, &rt.modules, &view(t), &mut y.view_mut(), rows, cols)?,
        4 => transpose::<u32>(&rt.stream, &rt.modules, &view(t), &mut y.view_mut(), rows, cols)?,
        _ => return Err(Error::UnsupportedDType { op: "transpose (cuda)", dtype: t.dtype() }),
    }
    Ok(y.tensor())
}
