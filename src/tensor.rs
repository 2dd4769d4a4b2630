//! `Tensor`: a shape, a dtype and contiguous row-major storage on one device.
//!
//! Tensors are immutable and cheap to clone (an `Arc`). A tensor that depends on a trainable
//! parameter carries a weak handle to the tape that records it (see `tape.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use crate::device::{cuda, wgpu as wg, Device, PendingRead};
use crate::tape::TapeInner;
use crate::kernels::cast;
use crate::kernels::nf4::{self, Nf4Tensor};
use crate::{DType, Element, Error, Result, Shape};

/// Identifies a tensor on a tape and in a gradient map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Host storage, typed.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    /// A whole NF4-quantized weight (dtype `NF4`), read by ops dequantized.
    Nf4(Arc<Nf4Tensor>),
}

impl CpuStorage {
    fn from_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        fn cast<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
            bytemuck::pod_collect_to_vec(b)
        }
        match dtype {
            DType::F32 => CpuStorage::F32(cast(bytes)),
            DType::BF16 => CpuStorage::BF16(cast(bytes)),
            DType::F16 => CpuStorage::F16(cast(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
            DType::I32 => CpuStorage::I32(cast(bytes)),
            DType::NF4 => unreachable!("NF4 tensors are built from an Nf4Tensor, never from bytes (callers check)"),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::U8(v) => v,
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::Nf4(q) => &q.packed,
        }
    }
}

/// Where the bytes are.
pub enum Storage {
    Cpu(CpuStorage),
    Cuda { rt: Arc<cuda::CudaRuntime>, buf: CudaSlice<u8> },
    Wgpu { rt: Arc<wg::WgpuRuntime>, buf: wg::PooledBuffer },
    /// A frozen NF4 weight on a wgpu device: the buffers the NF4 kernels read, and the host
    /// copy that downloads and dequantization read (the weight never changes, so they agree).
    WgpuNf4 { rt: Arc<wg::WgpuRuntime>, host: Arc<Nf4Tensor>, buffers: Arc<nf4::wgsl::Nf4Buffers> },
    /// The same on a CUDA device (`nf4::cuda::Nf4Device`, read by the NF4 GEMM kernels).
    CudaNf4 { rt: Arc<cuda::CudaRuntime>, host: Arc<Nf4Tensor>, buffers: Arc<nf4::cuda::Nf4Device> },
}

pub(crate) struct Inner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    device: Device,
    storage: Arc<Storage>,
    /// Copies made from the storage, shared by every tensor over it (storage is never written
    /// once a tensor holds it, so they stay true).
    derived: Arc<Derived>,
    pub(crate) tape: Option<Weak<TapeInner>>,
}

#[derive(Default)]
struct Derived {
    /// The storage's transpose as a `[cols, rows]` matrix, made on first use by a CPU linear
    /// (`cpu_f32_transposed`).
    transposed: OnceLock<Transposed>,
    /// Set by [`Tensor::keep_cpu_transpose`]: products of this weight make the transpose and
    /// keep it even when they record no backward.
    keep_transpose: std::sync::atomic::AtomicBool,
    /// The same values in a 16-bit type, written beside them by whatever made the storage (the
    /// CUDA AdamW step writes the bf16 copy of each f32 LoRA factor, which the bf16 model
    /// reads): `to_dtype` hands it out instead of converting (`with_cast_copy`).
    cast: OnceLock<Tensor>,
}

/// A cached transpose: the column count of the matrix it was made from, and its elements.
struct Transposed {
    cols: usize,
    data: Vec<f32>,
}

/// A tensor. See the module docs.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {} on {})", self.shape(), self.dtype(), self.device())
    }
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Shape, dtype: DType, device: Device) -> Tensor {
        Tensor(Arc::new(Inner { id: TensorId::fresh(), shape, dtype, device, storage: Arc::new(storage), derived: Arc::default(), tape: None }))
    }

    /// A new tensor sharing this one's storage, with a fresh id and the given tape handle.
    pub(crate) fn share(&self, shape: Shape, tape: Option<Weak<TapeInner>>) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            shape,
            dtype: self.0.dtype,
            device: self.0.device,
            storage: self.0.storage.clone(),
            derived: self.0.derived.clone(),
            tape,
        }))
    }

    /// Whether this tensor alone holds its storage: no other tensor over it, nothing derived
    /// from it (a cached transpose or cast copy). Then [`Tensor::try_into_storage`] hands the
    /// storage out, to an owner that grows it in place (the KV cache).
    pub(crate) fn owns_storage(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && Arc::strong_count(&self.0.storage) == 1 && self.0.derived.transposed.get().is_none() && self.0.derived.cast.get().is_none()
    }

    /// The storage, without a copy, where [`Tensor::owns_storage`]; else the tensor back,
    /// unchanged.
    pub(crate) fn try_into_storage(self) -> std::result::Result<Storage, Tensor> {
        if !self.owns_storage() {
            return Err(self);
        }
        let inner = Arc::try_unwrap(self.0).map_err(Tensor)?;
        match Arc::try_unwrap(inner.storage) {
            Ok(storage) => Ok(storage),
            Err(storage) => Err(Tensor(Arc::new(Inner { storage, ..inner }))),
        }
    }

    /// A tensor from host data, on `device`.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            return Err(Error::ElementCount { shape, got: data.len() });
        }
        Self::from_bytes(bytemuck::cast_slice(data), T::DTYPE, shape, device)
    }

    /// An f32 tensor on the CPU from a vector, without a copy.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            return Err(Error::ElementCount { shape, got: data.len() });
        }
        Ok(Self::from_storage(Storage::Cpu(CpuStorage::F32(data)), shape, DType::F32, Device::Cpu))
    }

    /// An i32 tensor on the CPU from a vector, without a copy.
    pub fn from_vec_i32(data: Vec<i32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            return Err(Error::ElementCount { shape, got: data.len() });
        }
        Ok(Self::from_storage(Storage::Cpu(CpuStorage::I32(data)), shape, DType::I32, Device::Cpu))
    }

    /// A frozen NF4 weight of logical `shape` on the CPU.
    pub fn from_nf4(q: Nf4Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != q.len {
            return Err(Error::ElementCount { shape, got: q.len });
        }
        q.validate()?;
        Ok(Self::from_storage(Storage::Cpu(CpuStorage::Nf4(Arc::new(q))), shape, DType::NF4, Device::Cpu))
    }

    /// The quantized weight of an NF4 tensor.
    pub fn as_nf4(&self) -> Option<&Arc<Nf4Tensor>> {
        match self.storage() {
            Storage::Cpu(CpuStorage::Nf4(q)) | Storage::WgpuNf4 { host: q, .. } | Storage::CudaNf4 { host: q, .. } => Some(q),
            _ => None,
        }
    }

    /// A tensor of `dtype` from its raw little-endian bytes.
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if dtype == DType::NF4 {
            return Err(Error::UnsupportedDType { op: "from_bytes (build NF4 tensors with from_nf4)", dtype });
        }
        if shape.elem_count() * dtype.size_in_bytes() != bytes.len() {
            return Err(Error::ElementCount { shape, got: bytes.len() / dtype.size_in_bytes() });
        }
        let storage = match *device {
            Device::Cpu => Storage::Cpu(CpuStorage::from_bytes(dtype, bytes)),
            Device::Cuda(i) => {
                let rt = cuda::runtime(i)?;
                let buf = rt.upload(bytes)?;
                Storage::Cuda { rt, buf }
            }
            Device::Wgpu(i) => {
                let rt = wg::runtime(i)?;
                rt.check_tensor_bytes(bytes.len(), &format!("a {dtype} tensor of shape {shape}"))?;
                let buf = rt.upload(bytes);
                Storage::Wgpu { rt, buf }
            }
        };
        Ok(Self::from_storage(storage, shape, dtype, *device))
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        if dtype == DType::NF4 {
            return Err(Error::UnsupportedDType { op: "zeros (build NF4 tensors with from_nf4)", dtype });
        }
        let bytes = shape.elem_count() * dtype.size_in_bytes();
        let storage = match *device {
            Device::Cpu => Storage::Cpu(CpuStorage::from_bytes(dtype, &vec![0u8; bytes])),
            Device::Cuda(i) => {
                let rt = cuda::runtime(i)?;
                let buf = rt.alloc_zeros(bytes)?;
                Storage::Cuda { rt, buf }
            }
            Device::Wgpu(i) => {
                let rt = wg::runtime(i)?;
                rt.check_tensor_bytes(bytes, &format!("a {dtype} tensor of shape {shape}"))?;
                let buf = rt.alloc_zeros(bytes);
                Storage::Wgpu { rt, buf }
            }
        };
        Ok(Self::from_storage(storage, shape, dtype, *device))
    }

    /// An f32 tensor of `value` everywhere.
    pub fn full(value: f32, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        Tensor::from_slice(&vec![value; shape.elem_count()], shape, device)
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn elem_count(&self) -> usize {
        self.0.shape.elem_count()
    }
    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }
    /// Whether this tensor is recorded on a live tape (it depends on a trainable parameter).
    pub fn is_tracked(&self) -> bool {
        self.0.tape.as_ref().is_some_and(|w| w.strong_count() > 0)
    }

    /// The raw bytes, copied to the host.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.dtype() == DType::NF4 {
            return Err(Error::UnsupportedDType { op: "to_bytes (an NF4 weight has no per-element bytes; dequantize it)", dtype: DType::NF4 });
        }
        let n = self.elem_count() * self.dtype().size_in_bytes();
        match self.storage() {
            Storage::Cpu(s) => Ok(s.as_bytes().to_vec()),
            Storage::Cuda { rt, buf } => rt.download(buf, n),
            Storage::Wgpu { rt, buf } => rt.download(buf.buffer(), n),
            Storage::WgpuNf4 { .. } | Storage::CudaNf4 { .. } => Err(Error::UnsupportedDType { op: "to_bytes", dtype: DType::NF4 }),
        }
    }

    /// The bytes of a CPU tensor where they lie (None on a device, and for NF4).
    pub(crate) fn cpu_bytes(&self) -> Option<&[u8]> {
        match self.storage() {
            Storage::Cpu(s) if self.dtype() != DType::NF4 => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// The elements as a host vector; `T` must be this tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch { op: "to_vec", lhs: self.dtype(), rhs: T::DTYPE });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes()?))
    }

    /// The elements of a float tensor as f32 on the host, converting bf16/f16.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if let Some(q) = self.as_nf4() {
            return nf4::cpu::dequantize(q);
        }
        // A CPU f32 tensor in one copy, not through its bytes (two).
        if let Storage::Cpu(CpuStorage::F32(v)) = self.storage() {
            return Ok(v.to_vec());
        }
        floats_from_bytes(self.dtype(), &self.to_bytes()?)
    }

    /// Starts copying the elements to the host behind the work already queued on the device,
    /// and returns without waiting; [`PendingValues::wait`] collects them as `to_vec_f32`
    /// would (a float tensor), [`PendingValues::wait_i32`] as `to_vec::<i32>` (token ids).
    /// Work queued afterwards (an in-place update, a new tensor in this one's pooled buffer)
    /// does not change what it reads. On the CPU the copy is made here.
    pub fn read_later(&self) -> Result<PendingValues> {
        let dtype = self.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::I32) {
            return Err(Error::UnsupportedDType { op: "read_later", dtype });
        }
        let n = self.elem_count() * dtype.size_in_bytes();
        let read = match self.storage() {
            Storage::Cpu(s) => PendingRead::ready(s.as_bytes().to_vec()),
            Storage::Cuda { rt, buf } => rt.read_later(&buf.slice(..n))?.into(),
            Storage::Wgpu { rt, buf } => rt.read_later(buf.buffer(), n)?.into(),
            Storage::WgpuNf4 { .. } | Storage::CudaNf4 { .. } => return Err(Error::UnsupportedDType { op: "read_later", dtype }),
        };
        Ok(PendingValues { read, dtype })
    }

    /// The single value of a one-element float tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::BadShape { op: "to_scalar", shape: self.shape().clone(), expected: "one element".into() });
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// A copy on `device` (the same tensor when it is already there). Not recorded on a tape.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        if let Some(q) = self.as_nf4() {
            // NF4 moves as its quantized parts (the host copy stays beside the device buffers).
            let storage = match *device {
                Device::Cpu => Storage::Cpu(CpuStorage::Nf4(q.clone())),
                Device::Wgpu(i) => {
                    let rt = wg::runtime(i)?;
                    let buffers = Arc::new(nf4::wgsl::upload(&rt.device, q)?);
                    Storage::WgpuNf4 { rt, host: q.clone(), buffers }
                }
                Device::Cuda(i) => {
                    let rt = cuda::runtime(i)?;
                    let buffers = Arc::new(nf4::cuda::Nf4Device::upload(&rt.stream, q)?);
                    Storage::CudaNf4 { rt, host: q.clone(), buffers }
                }
            };
            return Ok(Self::from_storage(storage, self.shape().clone(), DType::NF4, *device));
        }
        Tensor::from_bytes(&self.to_bytes()?, self.dtype(), self.shape().clone(), device)
    }

    /// A copy with storage of its own on the same device (a device-to-device copy on a GPU).
    /// Not recorded on a tape.
    pub fn copy(&self) -> Result<Tensor> {
        let bytes = self.elem_count() * self.dtype().size_in_bytes();
        let storage = match self.storage() {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            Storage::Cuda { rt, buf } => {
                // Not zeroed: the copy writes every byte. (The buffer may hold more than the
                // tensor: a KV cache keeps room for later rows.)
                let mut dst = rt.alloc_uninit(bytes)?;
                rt.stream.memcpy_dtod(&buf.slice(..bytes), &mut dst.slice_mut(..bytes)).map_err(|e| Error::cuda("device copy", e))?;
                Storage::Cuda { rt: rt.clone(), buf: dst }
            }
            Storage::Wgpu { rt, buf } => {
                let dst = rt.alloc(bytes);
                let mut enc = rt.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(buf.buffer(), 0, dst.buffer(), 0, bytes.next_multiple_of(4) as u64);
                crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
                Storage::Wgpu { rt: rt.clone(), buf: dst }
            }
            // Frozen and immutable: the copy shares the quantized parts.
            Storage::WgpuNf4 { rt, host, buffers } => Storage::WgpuNf4 { rt: rt.clone(), host: host.clone(), buffers: buffers.clone() },
            Storage::CudaNf4 { rt, host, buffers } => Storage::CudaNf4 { rt: rt.clone(), host: host.clone(), buffers: buffers.clone() },
        };
        Ok(Tensor::from_storage(storage, self.shape().clone(), self.dtype(), self.device()))
    }

    /// This tensor with `copy` kept beside it for `to_dtype` to hand out: the same values in
    /// another float type, rounded as `to_dtype` rounds them (the caller's promise, which the
    /// CUDA optimizer's tests check bit for bit), same shape and device.
    pub(crate) fn with_cast_copy(self, copy: Tensor) -> Result<Tensor> {
        if copy.shape() != self.shape() || copy.device() != self.device() || !copy.dtype().is_float() || copy.dtype() == self.dtype() {
            return Err(Error::InvalidArgument(format!("with_cast_copy: {copy:?} is no cast copy of {self:?}")));
        }
        self.0.derived.cast.set(copy).map_err(|_| Error::InvalidArgument(format!("with_cast_copy: {self:?} already has one")))?;
        Ok(self)
    }

    /// The copy `with_cast_copy` attached, if any.
    pub(crate) fn cast_copy(&self) -> Option<&Tensor> {
        self.0.derived.cast.get()
    }

    /// A copy with float elements converted to `dtype` (f32, bf16, f16), rounding to nearest
    /// even, on the tensor's device (`kernels::cast`); an NF4 weight converts to f32 on the
    /// CPU. Not recorded on a tape.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if let Some(c) = self.0.derived.cast.get() {
            if c.dtype() == dtype && c.shape() == self.shape() {
                return Ok(c.clone());
            }
        }
        if self.dtype() == DType::NF4 && dtype == DType::F32 {
            return Tensor::from_vec(self.to_vec_f32()?, self.shape().clone())?.to_device(&self.device());
        }
        if !dtype.is_float() || !self.dtype().is_float() {
            return Err(Error::DTypeMismatch { op: "to_dtype", lhs: self.dtype(), rhs: dtype });
        }
        let (n, from) = (self.elem_count(), self.dtype());
        let bytes = n * dtype.size_in_bytes();
        let storage = match self.storage() {
            Storage::Cpu(c) if matches!((from, dtype), (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32)) => {
                // Element by element into the new storage (a model's matrices made bf16 at
                // load: no f32 copy and no byte buffer beside the source), with the rounding
                // of `cast::cpu::narrow`.
                use half::{bf16, f16};
                use rayon::prelude::*;
                let out = match c {
                    CpuStorage::F32(v) if dtype == DType::BF16 => CpuStorage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
                    CpuStorage::F32(v) => CpuStorage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
                    CpuStorage::BF16(v) => CpuStorage::F32(v.par_iter().map(|x| x.to_f32()).collect()),
                    CpuStorage::F16(v) => CpuStorage::F32(v.par_iter().map(|x| x.to_f32()).collect()),
                    _ => unreachable!("the match guard admits f32, bf16 and f16 storage only"),
                };
                Storage::Cpu(out)
            }
            Storage::Cpu(_) | Storage::WgpuNf4 { .. } | Storage::CudaNf4 { .. } => {
                // (Not reached by NF4, which converts to f32 only, above.)
                let out = cast::cpu::narrow(&self.to_vec_f32()?, dtype);
                return Tensor::from_bytes(&out, dtype, self.shape().clone(), &self.device());
            }
            Storage::Wgpu { rt, buf } => {
                rt.check_tensor_bytes(bytes, &format!("to_dtype ({from} {} to {dtype})", self.shape()))?;
                let out = rt.alloc(bytes.next_multiple_of(4));
                cast::wgsl::cast(&rt.device, &rt.queue, &rt.kernels, buf.buffer(), from, out.buffer(), dtype, n)?;
                Storage::Wgpu { rt: rt.clone(), buf: out }
            }
            Storage::Cuda { rt, buf } => {
                // Not zeroed: the cast writes all n elements.
                let mut out = rt.alloc_uninit(bytes)?;
                cast::cuda::cast(&rt.stream, &rt.modules, buf, from, &mut out, dtype, n)?;
                Storage::Cuda { rt: rt.clone(), buf: out }
            }
        };
        Ok(Tensor::from_storage(storage, self.shape().clone(), dtype, self.device()))
    }

    /// The f32 elements of a CPU tensor, borrowed.
    pub(crate) fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match self.storage() {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::UnsupportedDType { op, dtype: self.dtype() }),
            _ => Err(Error::Unsupported { op, device: self.device() }),
        }
    }

    /// The elements of a CPU tensor stored in bf16, borrowed (None for any other storage).
    pub(crate) fn cpu_bf16(&self) -> Option<&[half::bf16]> {
        match self.storage() {
            Storage::Cpu(CpuStorage::BF16(v)) => Some(v),
            _ => None,
        }
    }

    /// The f32 elements of a CPU weight: borrowed when stored in f32, dequantized (NF4) or
    /// widened (bf16) into a transient copy (so such a frozen weight is never held in f32
    /// beyond one op).
    pub(crate) fn cpu_f32_weight(&self, op: &'static str) -> Result<std::borrow::Cow<'_, [f32]>> {
        if let Some(w) = self.cpu_bf16() {
            return Ok(std::borrow::Cow::Owned(crate::kernels::matmul::cpu::widen_bf16(w)));
        }
        match self.as_nf4() {
            Some(q) => Ok(std::borrow::Cow::Owned(nf4::cpu::dequantize(q)?)),
            None => self.cpu_f32(op).map(std::borrow::Cow::Borrowed),
        }
    }

    /// The transpose `[K, N]` (row-major) of a CPU f32 matrix `[N, K]`, made once per storage
    /// and kept: a frozen weight multiplies every batch as `x·Wᵀ`, and a GEMM reads Wᵀ fastest
    /// when it is stored row-major, so the transpose is paid once rather than on every
    /// product. Costs one more copy of the weight.
    /// An NF4 weight is dequantized and transposed for the one op (so it computes exactly
    /// what the same weight in f32 computes).
    pub(crate) fn cpu_f32_transposed(&self, op: &'static str) -> Result<std::borrow::Cow<'_, [f32]>> {
        use crate::kernels::matmul::cpu::transpose;
        let &[n, k] = self.dims() else {
            return Err(Error::InvalidArgument(format!("{op}: the transpose of a {}-dimensional tensor", self.dims().len())));
        };
        if let Some(q) = self.as_nf4() {
            return Ok(std::borrow::Cow::Owned(nf4::cpu::dequantize_transposed(q, n, k)?));
        }
        let w = self.cpu_f32(op)?;
        let t = self.0.derived.transposed.get_or_init(|| Transposed { cols: k, data: transpose(w, n, k) });
        Ok(if t.cols == k {
            std::borrow::Cow::Borrowed(&t.data)
        } else {
            // The same storage seen as another shape: that shape's transpose is not cached.
            std::borrow::Cow::Owned(transpose(w, n, k))
        })
    }

    /// A frozen CPU weight `[N, K]` for the product `x·Wᵀ` of `rows` rows, in the layout to
    /// read it in: W as it is stored (`false` in the second field: read it transposed), or
    /// its transpose `[K, N]` (`true`), cached in the storage.
    ///
    /// - One row (decoding) reads W as stored: `gemv` streams `[N, K]` fastest.
    /// - More rows read the cached transpose where one exists, or where `keep` asks to make and
    ///   keep it. Training passes `keep` (the op records a backward): its steps multiply by the
    ///   same W many times, and the transpose is paid once.
    /// - Inference does not: a prompt's product reads W as stored nearly as fast (4% slower at
    ///   512 rows, where making the transpose first costs 27%; `matmul/cpu` bench), and a model
    ///   that only generates holds each weight once.
    /// - A weight marked by [`Tensor::keep_cpu_transpose`] makes and keeps it as training does.
    pub(crate) fn cpu_f32_for_xwt(&self, op: &'static str, rows: usize, keep: bool) -> Result<(std::borrow::Cow<'_, [f32]>, bool)> {
        let derived = &self.0.derived;
        let keep = keep || derived.keep_transpose.load(std::sync::atomic::Ordering::Relaxed);
        let cached = || self.as_nf4().is_none() && derived.transposed.get().is_some_and(|t| self.dims().get(1) == Some(&t.cols));
        // A bf16 weight is widened for each product, as stored: no f32 transpose is kept.
        if rows > 1 && self.cpu_bf16().is_none() && (keep || cached()) {
            return Ok((self.cpu_f32_transposed(op)?, true));
        }
        Ok((self.cpu_f32_weight(op)?, false))
    }

    /// Marks a frozen CPU weight whose products `x·Wᵀ` will be many without a backward (a
    /// perplexity run over a dataset, one example at a time): their first makes W's transpose
    /// and keeps it, as training does, so that each later product reads it. Without the mark,
    /// inference reads W as stored (see `cpu_f32_for_xwt`), at up to 1.5× the time of a
    /// product over a few dozen rows, and holds each weight once. Shared by every tensor over
    /// the same storage; no effect off the CPU.
    pub fn keep_cpu_transpose(&self) {
        self.0.derived.keep_transpose.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The i32 elements of a CPU tensor, borrowed.
    pub(crate) fn cpu_i32(&self, op: &'static str) -> Result<&[i32]> {
        match self.storage() {
            Storage::Cpu(CpuStorage::I32(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::UnsupportedDType { op, dtype: self.dtype() }),
            _ => Err(Error::Unsupported { op, device: self.device() }),
        }
    }
}

/// The elements of a float tensor's bytes as f32 (bf16 and f16 converted).
fn floats_from_bytes(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    match CpuStorage::from_bytes(dtype, bytes) {
        CpuStorage::F32(v) => Ok(v),
        CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        _ => Err(Error::UnsupportedDType { op: "to_vec_f32", dtype }),
    }
}

/// A tensor's elements on their way to the host ([`Tensor::read_later`]).
pub struct PendingValues {
    read: PendingRead,
    dtype: DType,
}

impl PendingValues {
    /// Waits for the copy and returns the elements (of a float tensor) as f32.
    pub fn wait(self) -> Result<Vec<f32>> {
        floats_from_bytes(self.dtype, &self.read.wait()?)
    }

    /// Waits for the copy and returns the elements of an i32 tensor.
    pub fn wait_i32(self) -> Result<Vec<i32>> {
        if self.dtype != DType::I32 {
            return Err(Error::DTypeMismatch { op: "PendingValues::wait_i32", lhs: self.dtype, rhs: DType::I32 });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.read.wait()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_transpose_is_the_transpose_and_is_shared_by_views_of_the_storage() {
        let (n, k) = (37, 70); // not multiples of the transpose's 32-column strips or 16-row runs
        let data: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let w = Tensor::from_vec(data.clone(), [n, k]).unwrap();
        let t = w.cpu_f32_transposed("test").unwrap();
        for i in 0..n {
            for j in 0..k {
                assert_eq!(t[j * n + i], data[i * k + j], "element ({i}, {j})");
            }
        }
        // A view of the same storage with the same shape reuses the cached copy.
        let view = w.share(w.shape().clone(), None);
        assert!(std::ptr::eq(view.cpu_f32_transposed("test").unwrap().as_ptr(), t.as_ptr()));
        // Seen as another shape, the transpose is made for that shape (and not cached).
        let other = w.share(Shape::from([k, n]), None);
        let t2 = other.cpu_f32_transposed("test").unwrap();
        assert!(matches!(t2, std::borrow::Cow::Owned(_)));
        for r in 0..k {
            for c in 0..n {
                assert_eq!(t2[c * k + r], data[r * n + c], "element ({r}, {c}) of the [{k}, {n}] view");
            }
        }
    }

    #[test]
    fn products_make_and_keep_the_transpose_only_when_training() {
        let (n, k) = (5, 3);
        let data: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let w = Tensor::from_vec(data.clone(), [n, k]).unwrap();
        let cached = |w: &Tensor| w.0.derived.transposed.get().is_some();
        // Inference: W as stored, and nothing kept.
        let (v, transposed) = w.cpu_f32_for_xwt("test", 8, false).unwrap();
        assert!(!transposed && *v == data[..] && !cached(&w));
        // Training keeps the transpose, which inference then reads too.
        let (v, transposed) = w.cpu_f32_for_xwt("test", 8, true).unwrap();
        assert!(transposed && cached(&w) && v[1] == data[k], "the transpose's second element is W[1, 0]");
        assert!(w.cpu_f32_for_xwt("test", 8, false).unwrap().1);
        // One row reads W as stored, cached transpose or not.
        let (v, transposed) = w.cpu_f32_for_xwt("test", 1, true).unwrap();
        assert!(!transposed && *v == data[..]);
        // A marked weight keeps its transpose from its first inference product of many rows.
        let marked = Tensor::from_vec(data.clone(), [n, k]).unwrap();
        marked.keep_cpu_transpose();
        assert!(!marked.cpu_f32_for_xwt("test", 1, false).unwrap().1 && !cached(&marked));
        assert!(marked.cpu_f32_for_xwt("test", 8, false).unwrap().1 && cached(&marked));
    }

    #[test]
    fn the_ops_keep_a_frozen_weights_transpose_only_when_they_record_a_backward() {
        use crate::ops::{linear_cross_entropy, linear_group, matmul, LinearPart};
        let (m, n, k) = (4, 6, 5);
        let fresh = || Tensor::from_vec((0..n * k).map(|i| (i % 7) as f32 * 0.1).collect(), [n, k]).unwrap();
        let x = Tensor::from_vec((0..m * k).map(|i| (i % 5) as f32 * 0.2).collect(), [m, k]).unwrap();
        let targets = Tensor::from_vec_i32(vec![0, 1, 2, 3], [m]).unwrap();
        let cached = |w: &Tensor| w.0.derived.transposed.get().is_some();
        let linear = |x: &Tensor, w: &Tensor| linear_group(x, &[LinearPart { weight: w, bias: None, lora: None, dropout: None }]).unwrap();
        type Op<'a> = &'a dyn Fn(&Tensor, &Tensor);
        let ops: [(&str, Op); 3] = [
            ("matmul", &|x, w| drop(matmul(x, w, false, true).unwrap())),
            ("linear_group", &|x, w| drop(linear(x, w))),
            ("linear_cross_entropy", &|x, w| drop(linear_cross_entropy(x, w, &targets, -100, None).unwrap())),
        ];
        for (name, op) in ops {
            let w = fresh();
            op(&x, &w);
            assert!(!cached(&w), "{name}: inference made a transpose");
            let tape = crate::Tape::new();
            op(&tape.param(&x), &w);
            assert!(cached(&w), "{name}: training made no transpose");
        }
    }
}
