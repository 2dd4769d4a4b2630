//! Training state on a CUDA device: the f32 masters of the trained tensors and the optimizer's
//! state (AdamW's moments, or SM3's row and column accumulators and momentum) in device
//! buffers for the whole run, updated by `optim.cu`'s fused kernels with the clip factor
//! computed in the kernel from the device sum of squares (as on wgpu, `device.rs`).
//!
//! The masters are owned here (a kernel writes them in place), so the tensors the model reads
//! are copies made on the device after each step: one pass over the trained parameters, small
//! beside the optimizer's own (LoRA adapters are ~1% of a model).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::device::{HostOptState, StepParams};
use crate::device::cuda::CudaRuntime;
use crate::kernels::optim::cuda::{adamw, sm3, sum_squares, DeviceClip};
use crate::ops::cuda::view;
use crate::optim::Sm3State;
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// The optimizer's state on the device, one entry per trained tensor.
enum State {
    AdamW { m: Vec<CudaSlice<f32>>, v: Vec<CudaSlice<f32>> },
    /// Accumulators of each tensor seen as `[rows, cols]` (the kernel writes the new ones into
    /// `r_next`, `c_next`, then the pairs swap), and momentum.
    Sm3 { dims: Vec<(usize, usize)>, r: Vec<CudaSlice<f32>>, c: Vec<CudaSlice<f32>>, r_next: Vec<CudaSlice<f32>>, c_next: Vec<CudaSlice<f32>>, momentum: Option<Vec<CudaSlice<f32>>> },
}

pub(crate) struct CudaOptimizer {
    rt: Arc<CudaRuntime>,
    shapes: Vec<Vec<usize>>,
    /// f32 masters, as bytes (the storage type of a tensor).
    masters: Vec<CudaSlice<u8>>,
    state: State,
    sum_sq: CudaSlice<f64>,
    /// Copies of the masters for the model to read.
    pub params: Vec<Tensor>,
}

impl CudaOptimizer {
    /// Uploads the masters and the optimizer's state. `dims` gives each tensor's `[rows, cols]`
    /// view for SM3.
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], dims: &[(usize, usize)], host: &HostOptState, ordinal: usize) -> Result<Self> {
        let rt = crate::device::cuda::runtime(ordinal)?;
        let up = |v: &[f32]| crate::ops::cuda::upload(&rt, v);
        let zeros = |n: usize| rt.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| Error::cuda("allocating optimizer state", e));
        let state = match host {
            HostOptState::AdamW(state) => {
                let (mut m, mut v) = (Vec::new(), Vec::new());
                for (i, w) in masters.iter().enumerate() {
                    match state.get(i) {
                        Some((sm, sv)) => {
                            m.push(up(sm)?);
                            v.push(up(sv)?);
                        }
                        None => {
                            m.push(zeros(w.len())?);
                            v.push(zeros(w.len())?);
                        }
                    }
                }
                State::AdamW { m, v }
            }
            HostOptState::Sm3(state) => {
                if state.len() != masters.len() || dims.len() != masters.len() {
                    return Err(Error::InvalidArgument(format!("device SM3 (cuda): state for {} tensors, {} masters", state.len(), masters.len())));
                }
                let (mut r, mut c, mut r_next, mut c_next) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let mut momentum = state.iter().all(|s| s.momentum.is_some()).then(Vec::new);
                for (s, &(rows, cols)) in state.iter().zip(dims) {
                    r.push(up(&s.r)?);
                    c.push(up(&s.c)?);
                    r_next.push(zeros(rows)?);
                    c_next.push(zeros(cols)?);
                    if let (Some(ms), Some(m)) = (momentum.as_mut(), &s.momentum) {
                        ms.push(up(m)?);
                    }
                }
                State::Sm3 { dims: dims.to_vec(), r, c, r_next, c_next, momentum }
            }
        };
        let sum_sq = rt.stream.alloc_zeros::<f64>(1).map_err(|e| Error::cuda("allocating the norm", e))?;
        let masters = masters.iter().map(|w| rt.upload(bytemuck::cast_slice(w))).collect::<Result<_>>()?;
        let mut s = CudaOptimizer { rt, shapes: shapes.to_vec(), masters, state, sum_sq, params: Vec::new() };
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

    fn check(&self, grads: &[Tensor]) -> Result<()> {
        const OP: &str = "device optimizer (cuda)";
        if grads.len() != self.masters.len() {
            return Err(Error::InvalidArgument(format!("{OP}: {} gradients for {} tensors", grads.len(), self.masters.len())));
        }
        for (g, s) in grads.iter().zip(&self.shapes) {
            crate::ops::expect_dtype(OP, g, DType::F32)?;
            if !matches!(g.device(), Device::Cuda(i) if i == self.rt.ordinal) || g.dims() != s.as_slice() {
                return Err(Error::InvalidArgument(format!("{OP}: gradient {g:?} for a master of shape {s:?} on cuda:{}", self.rt.ordinal)));
            }
        }
        Ok(())
    }

    /// One step with every tensor's f32 gradient on the device, clipped to a global norm of
    /// `max_norm` (0: none). Returns the gradients' global norm (the one value read back).
    pub fn step(&mut self, grads: &[Tensor], p: StepParams, max_norm: f32) -> Result<f32> {
        self.check(grads)?;
        let (stream, modules) = (&self.rt.stream, &self.rt.modules);
        let views: Vec<_> = grads.iter().map(view::<f32>).collect();
        sum_squares::<f32>(stream, modules, &views, &mut self.sum_sq.slice_mut(..))?;
        let clip = DeviceClip { sum_sq: self.sum_sq.slice(..), max_norm };
        let clip = (max_norm > 0.0).then_some(&clip);
        for (i, g) in views.iter().enumerate() {
            let n = g.len();
            // SAFETY: the master holds n f32s (uploaded from a host vector of the same shape).
            let mut w = unsafe { self.masters[i].transmute_mut::<f32>(n) }.expect("a master holds its elements");
            match (&mut self.state, &p) {
                (State::AdamW { m, v }, StepParams::AdamW(p)) => adamw::<f32>(stream, modules, &mut w, g, None, &mut m[i].slice_mut(..), &mut v[i].slice_mut(..), *p, clip)?,
                (State::Sm3 { dims, r, c, r_next, c_next, momentum }, StepParams::Sm3(p)) => {
                    let (rows, cols) = dims[i];
                    let mut mom = momentum.as_mut().map(|ms| ms[i].slice_mut(..));
                    sm3::<f32>(stream, modules, &mut w, g, None, &r[i].slice(..), &c[i].slice(..), &mut r_next[i].slice_mut(..), &mut c_next[i].slice_mut(..), mom.as_mut(), rows, cols, *p, clip)?;
                    std::mem::swap(&mut r[i], &mut r_next[i]);
                    std::mem::swap(&mut c[i], &mut c_next[i]);
                }
                _ => return Err(Error::InvalidArgument("device optimizer (cuda): step parameters of another optimizer".into())),
            }
        }
        let sum_sq = stream.clone_dtoh(&self.sum_sq).map_err(|e| Error::cuda("reading the gradient norm", e))?;
        self.refresh()?;
        Ok(sum_sq[0].max(0.0).sqrt() as f32)
    }

    /// The gradients' sum of squares, read back.
    pub fn sum_squares(&mut self, grads: &[Tensor]) -> Result<f64> {
        self.check(grads)?;
        let views: Vec<_> = grads.iter().map(view::<f32>).collect();
        sum_squares::<f32>(&self.rt.stream, &self.rt.modules, &views, &mut self.sum_sq.slice_mut(..))?;
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
        let state = match &self.state {
            State::AdamW { m, v } => HostOptState::AdamW((0..m.len()).map(|i| Ok((dtoh(&m[i], sizes[i])?, dtoh(&v[i], sizes[i])?))).collect::<Result<_>>()?),
            State::Sm3 { dims, r, c, momentum, .. } => HostOptState::Sm3(
                (0..r.len())
                    .map(|i| {
                        let (rows, cols) = dims[i];
                        Ok(Sm3State { r: dtoh(&r[i], rows)?, c: dtoh(&c[i], cols)?, momentum: momentum.as_ref().map(|ms| dtoh(&ms[i], sizes[i])).transpose()? })
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        Ok((masters, state))
    }
}
