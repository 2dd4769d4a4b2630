//! Training state on a CUDA device: the f32 masters of the trained tensors and AdamW's moments
//! in device buffers for the whole run, updated by `optim.cu`'s fused AdamW with the clip
//! factor computed in the kernel from the device sum of squares (as on wgpu, `device.rs`).
//!
//! The masters are owned here (a kernel writes them in place), so the tensors the model reads
//! are copies made on the device after each step: one pass over the trained parameters, small
//! beside the optimizer's own (LoRA adapters are ~1% of a model).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::device::cuda::CudaRuntime;
use crate::kernels::optim::cuda::{adamw, sum_squares, DeviceClip};
use crate::kernels::optim::AdamWParams;
use crate::ops::cuda::view;
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// AdamW's `(m, v)` per tensor, on the host.
pub(crate) type Moments = Vec<(Vec<f32>, Vec<f32>)>;

pub(crate) struct CudaAdamW {
    rt: Arc<CudaRuntime>,
    shapes: Vec<Vec<usize>>,
    /// f32 masters, as bytes (the storage type of a tensor).
    masters: Vec<CudaSlice<u8>>,
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    sum_sq: CudaSlice<f64>,
    /// Copies of the masters for the model to read.
    pub params: Vec<Tensor>,
}

impl CudaAdamW {
    /// Uploads the masters and AdamW's state (`state[i] = (m, v)`; empty before the first step).
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], state: &[(Vec<f32>, Vec<f32>)], ordinal: usize) -> Result<Self> {
        let rt = crate::device::cuda::runtime(ordinal)?;
        let up = |v: &[f32]| crate::ops::cuda::upload(&rt, v);
        let mut s = CudaAdamW { rt: rt.clone(), shapes: shapes.to_vec(), masters: Vec::new(), m: Vec::new(), v: Vec::new(), sum_sq: rt.stream.alloc_zeros::<f64>(1).map_err(|e| Error::cuda("allocating the norm", e))?, params: Vec::new() };
        for (i, w) in masters.iter().enumerate() {
            s.masters.push(rt.upload(bytemuck::cast_slice(w))?);
            match state.get(i) {
                Some((m, v)) => {
                    s.m.push(up(m)?);
                    s.v.push(up(v)?);
                }
                None => {
                    let zeros = |n: usize| rt.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| Error::cuda("allocating AdamW moments", e));
                    s.m.push(zeros(w.len())?);
                    s.v.push(zeros(w.len())?);
                }
            }
        }
        s.refresh()?;
        Ok(s)
    }

    /// The model's copies of the masters.
    fn refresh(&mut self) -> Result<()> {
        let dev = Device::Cuda(self.rt.ordinal);
        self.params = self
            .masters
            .iter()
            .zip(&self.shapes)
            .map(|(b, s)| {
                let buf = self.rt.stream.clone_dtod(b).map_err(|e| Error::cuda("copying a master", e))?;
                Ok(Tensor::from_storage(Storage::Cuda { rt: self.rt.clone(), buf }, s.clone().into(), DType::F32, dev))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// One AdamW step with every tensor's f32 gradient on the device, clipped to a global norm
    /// of `max_norm` (0: none). Returns the gradients' global norm (the one value read back).
    pub fn step(&mut self, grads: &[Tensor], p: AdamWParams, max_norm: f32) -> Result<f32> {
        const OP: &str = "device AdamW (cuda)";
        if grads.len() != self.masters.len() {
            return Err(Error::InvalidArgument(format!("{OP}: {} gradients for {} tensors", grads.len(), self.masters.len())));
        }
        for (g, s) in grads.iter().zip(&self.shapes) {
            crate::ops::expect_dtype(OP, g, DType::F32)?;
            if !matches!(g.device(), Device::Cuda(i) if i == self.rt.ordinal) || g.dims() != s.as_slice() {
                return Err(Error::InvalidArgument(format!("{OP}: gradient {g:?} for a master of shape {s:?} on cuda:{}", self.rt.ordinal)));
            }
        }
        let (stream, modules) = (&self.rt.stream, &self.rt.modules);
        let views: Vec<_> = grads.iter().map(view::<f32>).collect();
        sum_squares::<f32>(stream, modules, &views, &mut self.sum_sq.slice_mut(..))?;
        let clip = DeviceClip { sum_sq: self.sum_sq.slice(..), max_norm };
        let clip = (max_norm > 0.0).then_some(&clip);
        for (i, g) in views.iter().enumerate() {
            let n = g.len();
            // SAFETY: the master holds n f32s (uploaded from a host vector of the same shape).
            let mut w = unsafe { self.masters[i].transmute_mut::<f32>(n) }.expect("a master holds its elements");
            adamw::<f32>(stream, modules, &mut w, g, None, &mut self.m[i].slice_mut(..), &mut self.v[i].slice_mut(..), p, clip)?;
        }
        let sum_sq = stream.clone_dtoh(&self.sum_sq).map_err(|e| Error::cuda("reading the gradient norm", e))?;
        self.refresh()?;
        Ok(sum_sq[0].max(0.0).sqrt() as f32)
    }

    /// The gradients' sum of squares, read back.
    pub fn sum_squares(&mut self, grads: &[Tensor]) -> Result<f64> {
        let views: Vec<_> = grads.iter().map(view::<f32>).collect();
        sum_squares::<f32>(&self.rt.stream, &self.rt.modules, &views, &mut self.sum_sq.slice_mut(..))?;
        let s = self.rt.stream.clone_dtoh(&self.sum_sq).map_err(|e| Error::cuda("reading the gradient norm", e))?;
        Ok(s[0])
    }

    /// The masters and AdamW's `(m, v)`, copied to the host.
    pub fn download(&self) -> Result<(Vec<Vec<f32>>, Moments)> {
        let dtoh = |b: &CudaSlice<f32>| self.rt.stream.clone_dtoh(b).map_err(|e| Error::cuda("copying optimizer state", e));
        let mut masters = Vec::new();
        let mut state = Vec::new();
        for (i, s) in self.shapes.iter().enumerate() {
            let n: usize = s.iter().product();
            let bytes = self.rt.download(&self.masters[i], 4 * n)?;
            masters.push(bytemuck::pod_collect_to_vec(&bytes));
            let (mut m, mut v) = (dtoh(&self.m[i])?, dtoh(&self.v[i])?);
            m.truncate(n);
            v.truncate(n);
            state.push((m, v));
        }
        Ok((masters, state))
    }
}
