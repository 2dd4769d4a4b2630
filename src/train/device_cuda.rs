//! Training state on a CUDA device: the f32 masters of the trained tensors and the optimizer's
//! state (AdamW's moments, or SM3's row and column accumulators and momentum) in device
//! buffers for the whole run, updated by `optim.cu`'s fused kernels with the clip factor
//! computed in the kernel from the device sum of squares (as on wgpu, `device.rs`).
//!
//! The masters are owned here (a kernel writes them in place), so the tensors the model reads
//! are new after each step. AdamW writes each new value beside its master into a fresh buffer
//! (f32 for the LoRA adapters, ~1% of a model; rounded to bf16 for full or head fine-tuning of
//! the bf16 model), every tensor in a few launches (`adamw_multi`); SM3 runs a launch per
//! tensor, and its f32 parameters are copies of the masters made on the device. Gradients come
//! in the parameters' dtype.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::device::{HostOptState, PendingSumSq, State, StepParams};
use crate::device::cuda::CudaRuntime;
use crate::kernels::optim::cuda::{adamw_multi, sm3, sm3_sparse, sum_squares, AdamWTensor, DeviceClip};
use crate::kernels::sparse::{DeviceIndices, SparseIndices};
use crate::ops::cuda::view;
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

pub(crate) struct CudaOptimizer {
    rt: Arc<CudaRuntime>,
    shapes: Vec<Vec<usize>>,
    /// f32 masters, as bytes (the storage type of a tensor).
    masters: Vec<CudaSlice<u8>>,
    /// The active indices of each sparse tensor (f32 parameters), None for a dense one.
    indices: Vec<Option<Arc<SparseIndices>>>,
    state: State<CudaSlice<f32>>,
    sum_sq: CudaSlice<f64>,
    /// The masters as the model reads them, in `param_dtype` (f32 or bf16).
    pub params: Vec<Tensor>,
    param_dtype: DType,
    /// f32 parameters (LoRA factors) of a bf16 model: each carries its bf16 copy
    /// (`Tensor::with_cast_copy`), which AdamW writes in the same launch, so the model's
    /// forward does not cast every factor again (two launches per adapted linear).
    bf16_copies: bool,
}

impl CudaOptimizer {
    /// Uploads the masters and the optimizer's state. `dims` gives each tensor's `[rows, cols]`
    /// matrix for SM3, `indices` the active entries of the sparse ones; the model reads the
    /// parameters in `param_dtype` (f32 or bf16; sparse tensors f32 only) in a model of
    /// `model_dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], dims: &[(usize, usize)], indices: Vec<Option<Arc<SparseIndices>>>, host: &HostOptState, ordinal: usize, param_dtype: DType, model_dtype: DType) -> Result<Self> {
        if !matches!(param_dtype, DType::F32 | DType::BF16) {
            return Err(Error::UnsupportedDType { op: "device optimizer (cuda): trained parameters", dtype: param_dtype });
        }
        let rt = crate::device::cuda::runtime(ordinal)?;
        let up = |v: &[f32]| crate::ops::cuda::upload(&rt, v);
        let zeros = |n: usize| rt.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| Error::cuda("allocating optimizer state", e));
        let sizes: Vec<usize> = masters.iter().map(Vec::len).collect();
        let state = State::upload(host, &sizes, dims, up, zeros)?;
        let sum_sq = rt.stream.alloc_zeros::<f64>(1).map_err(|e| Error::cuda("allocating the norm", e))?;
        let masters = masters.iter().map(|w| rt.upload(bytemuck::cast_slice(w))).collect::<Result<_>>()?;
        let bf16_copies = param_dtype == DType::F32 && model_dtype == DType::BF16;
        let mut s = CudaOptimizer { rt, shapes: shapes.to_vec(), masters, indices, state, sum_sq, params: Vec::new(), param_dtype, bf16_copies };
        s.params = s.shapes.iter().enumerate().map(|(i, _)| s.param_copy(i)).collect::<Result<_>>()?;
        Ok(s)
    }

    /// The model's tensor `i`: a copy of its master, in `param_dtype`.
    fn param_copy(&self, i: usize) -> Result<Tensor> {
        let n: usize = self.shapes[i].iter().product();
        let buf = match self.param_dtype {
            DType::F32 => self.rt.stream.clone_dtod(&self.masters[i]).map_err(|e| Error::cuda("copying a master", e))?,
            dt => {
                let mut out = self.rt.alloc_zeros(n * dt.size_in_bytes())?;
                crate::kernels::cast::cuda::cast(&self.rt.stream, &self.rt.modules, &self.masters[i], DType::F32, &mut out, dt, n)?;
                out
            }
        };
        let t = self.tensor(buf, i, self.param_dtype);
        if self.bf16_copies {
            let copy = t.to_dtype(DType::BF16)?;
            return t.with_cast_copy(copy);
        }
        Ok(t)
    }

    fn tensor(&self, buf: CudaSlice<u8>, i: usize, dtype: DType) -> Tensor {
        Tensor::from_storage(Storage::Cuda { rt: self.rt.clone(), buf }, self.shapes[i].clone().into(), dtype, Device::Cuda(self.rt.ordinal))
    }

    fn check(&self, grads: &[Tensor]) -> Result<()> {
        const OP: &str = "device optimizer (cuda)";
        if grads.len() != self.masters.len() {
            return Err(Error::InvalidArgument(format!("{OP}: {} gradients for {} tensors", grads.len(), self.masters.len())));
        }
        for (g, s) in grads.iter().zip(&self.shapes) {
            crate::ops::expect_dtype(OP, g, self.param_dtype)?;
            if !matches!(g.device(), Device::Cuda(i) if i == self.rt.ordinal) || g.dims() != s.as_slice() {
                return Err(Error::InvalidArgument(format!("{OP}: gradient {g:?} for a master of shape {s:?} on cuda:{}", self.rt.ordinal)));
            }
        }
        Ok(())
    }

    /// One step with every tensor's gradient (in the parameters' dtype) on the device, clipped
    /// to a global norm of `max_norm` (0: none). Returns the gradients' sum of squares (the one
    /// value read back), on its way to the host.
    pub fn step(&mut self, grads: &[Tensor], p: StepParams, max_norm: f32) -> Result<PendingSumSq> {
        self.check(grads)?;
        if self.param_dtype == DType::F32 {
            self.step_as::<f32>(grads, &p, max_norm)?;
        } else {
            self.step_as::<u16>(grads, &p, max_norm)?;
        }
        // SAFETY: the bytes of an f64, read as bytes.
        let bytes = unsafe { self.sum_sq.transmute::<u8>(8) }.expect("the norm holds one f64");
        Ok(PendingSumSq::F64(self.rt.read_later(&bytes)?.into()))
    }

    /// The step with parameters and gradients of type `T`: f32 (the kernels update the
    /// masters, then the model gets copies), or bf16 bits (the kernels update the f32 masters
    /// and write the rounded values into new buffers, the model's next parameters).
    fn step_as<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&mut self, grads: &[Tensor], p: &StepParams, max_norm: f32) -> Result<()> {
        let (stream, modules) = (&self.rt.stream, &self.rt.modules);
        let views: Vec<_> = grads.iter().map(view::<T>).collect();
        sum_squares::<T>(stream, modules, &views, &mut self.sum_sq.slice_mut(..))?;
        let clip = DeviceClip { sum_sq: self.sum_sq.slice(..), max_norm };
        let clip = (max_norm > 0.0).then_some(&clip);
        if let (State::AdamW { m, v }, StepParams::AdamW(p)) = (&mut self.state, p) {
            // Every tensor at once, `MULTI_TENSORS` per launch (a LoRA step has two small
            // factors per adapted linear): each master is read and updated, and its new value
            // (rounded for bf16) goes into a fresh buffer, the model's next parameter.
            let mut outs: Vec<CudaSlice<u8>> = views.iter().map(|g| self.rt.alloc_uninit(g.len() * std::mem::size_of::<T>())).collect::<Result<_>>()?;
            let copies = self.bf16_copies && std::mem::size_of::<T>() == 4;
            let mut halves: Vec<CudaSlice<u8>> = if copies { views.iter().map(|g| self.rt.alloc_uninit(g.len() * 2)).collect::<Result<_>>()? } else { Vec::new() };
            let mut tensors = Vec::with_capacity(views.len());
            let mut half_bufs = halves.iter_mut();
            for (((out, master), (m, v)), g) in outs.iter_mut().zip(self.masters.iter_mut()).zip(m.iter_mut().zip(v.iter_mut())).zip(&views) {
                let n = g.len();
                // SAFETY: a new parameter holds n Ts and a bf16 copy n u16s (allocated above),
                // a master n f32s (uploaded from host vectors of the gradients' shapes, checked
                // by `check`).
                let (w, master) = unsafe { (out.transmute_mut::<T>(n).expect("a parameter holds its elements"), master.transmute_mut::<f32>(n).expect("a master holds its elements")) };
                let half = half_bufs.next().map(|h| unsafe { h.transmute_mut::<u16>(n) }.expect("a copy holds its elements"));
                tensors.push(AdamWTensor { w, g: g.slice(..), master: Some(master), m: m.slice_mut(..n), v: v.slice_mut(..n), half });
            }
            adamw_multi::<T>(stream, modules, &mut tensors, *p, clip)?;
            drop(tensors);
            let mut halves = halves.into_iter();
            for (i, out) in outs.into_iter().enumerate() {
                let t = self.tensor(out, i, self.param_dtype);
                self.params[i] = match halves.next() {
                    Some(h) => t.with_cast_copy(self.tensor(h, i, DType::BF16))?,
                    None => t,
                };
            }
            return Ok(());
        }
        let half = std::mem::size_of::<T>() == 2;
        let mut next = Vec::with_capacity(views.len());
        for (i, g) in views.iter().enumerate() {
            let n = g.len();
            // bf16: the parameter the kernel writes (and never reads: it reads the master).
            let mut out = if half { Some(self.rt.alloc_zeros(n * std::mem::size_of::<T>())?) } else { None };
            // SAFETY: the masters hold n f32s (uploaded from host vectors of the same shapes), a
            // new parameter n Ts; with f32 parameters (T = f32) the masters are the parameters.
            let (mut w, mut master) = unsafe {
                match out.as_mut() {
                    Some(o) => (o.transmute_mut::<T>(n).expect("a parameter holds its elements"), Some(self.masters[i].transmute_mut::<f32>(n).expect("a master holds its elements"))),
                    None => (self.masters[i].transmute_mut::<T>(n).expect("a master holds its elements"), None),
                }
            };
            match (&mut self.state, p) {
                (State::Sm3 { dims, r, c, r_next, c_next, momentum }, StepParams::Sm3(p)) => {
                    let (rows, cols) = dims[i];
                    let mut mom = momentum.as_mut().map(|ms| ms[i].slice_mut(..));
                    if let Some(idx) = &self.indices[i] {
                        // Sparse deltas are f32 (T = f32, checked by `new`); r and c are updated
                        // in place by the sparse kernel.
                        // SAFETY: T is f32 here, so the views keep their element type and length.
                        let (mut d, gf) = unsafe { (w.transmute_mut::<f32>(n).expect("f32 deltas"), g.transmute::<f32>(n).expect("f32 gradients")) };
                        let DeviceIndices::Cuda(ib) = &*idx.on_device_of(&self.params[i])? else { unreachable!("a CUDA tensor's indices are on CUDA") };
                        sm3_sparse(stream, modules, &ib.slice(..idx.len()), &mut d, &gf, &mut r[i].slice_mut(..), &mut c[i].slice_mut(..), mom.as_mut(), rows, cols, *p, clip)?;
                    } else {
                        sm3::<T>(stream, modules, &mut w, g, master.as_mut(), &r[i].slice(..), &c[i].slice(..), &mut r_next[i].slice_mut(..), &mut c_next[i].slice_mut(..), mom.as_mut(), rows, cols, *p, clip)?;
                        std::mem::swap(&mut r[i], &mut r_next[i]);
                        std::mem::swap(&mut c[i], &mut c_next[i]);
                    }
                }
                _ => return Err(Error::InvalidArgument("device optimizer (cuda): step parameters of another optimizer".into())),
            }
            next.push(out);
        }
        for (i, out) in next.into_iter().enumerate() {
            self.params[i] = match out {
                Some(o) => self.tensor(o, i, self.param_dtype),
                None => self.param_copy(i)?,
            };
        }
        Ok(())
    }

    /// The gradients' sum of squares, read back.
    pub fn sum_squares(&mut self, grads: &[Tensor]) -> Result<f64> {
        self.check(grads)?;
        let (stream, modules) = (&self.rt.stream, &self.rt.modules);
        if self.param_dtype == DType::F32 {
            sum_squares::<f32>(stream, modules, &grads.iter().map(view::<f32>).collect::<Vec<_>>(), &mut self.sum_sq.slice_mut(..))?;
        } else {
            sum_squares::<u16>(stream, modules, &grads.iter().map(view::<u16>).collect::<Vec<_>>(), &mut self.sum_sq.slice_mut(..))?;
        }
        let s = self.rt.stream.clone_dtoh(&self.sum_sq).map_err(|e| Error::cuda("reading the gradient norm", e))?;
        Ok(s[0])
    }

    /// The masters and the optimizer's state, copied to the host.
    pub fn download(&self) -> Result<(Vec<Vec<f32>>, HostOptState)> {
        let dtoh = |b: &CudaSlice<f32>, n: usize| -> Result<Vec<f32>> {
            let mut v = self.rt.stream.clone_dtoh(b).map_err(|e| Error::cuda("copying optimizer state", e))?;
            v.truncate(n);
            Ok(v)
        };
        let mut masters = Vec::new();
        for (i, s) in self.shapes.iter().enumerate() {
            let n: usize = s.iter().product();
            masters.push(bytemuck::pod_collect_to_vec(&self.rt.download(&self.masters[i], 4 * n)?));
        }
        let sizes: Vec<usize> = self.shapes.iter().map(|s| s.iter().product()).collect();
        let state = self.state.download(&sizes, dtoh)?;
        Ok((masters, state))
    }
}
