//! Training state on the device (`DeviceOptimizer`): wgpu here, CUDA in `device_cuda.rs`.
//!
//! On a wgpu device: the f32 masters of the trained tensors and the optimizer's
//! state (AdamW's moments, or SM3's row and column accumulators and momentum) live in device
//! buffers for the whole run. A step's gradients stay on the device, their global norm is
//! reduced there and the clip factor computed inside the optimizer kernel, so the host reads
//! back only the loss and the squared norm (one float), queued behind the step and collected
//! once the next step is queued (`PendingStep`). The host copies (the trainer's
//! `masters`, the optimizer's state) are refreshed when read: checkpoints, tests, and sparse
//! fine-tuning's reselections (which change the active entries on the host, then upload the
//! state again). Sparse deltas keep their active indices on the device for SM3's sparse kernel.

use crate::kernels::optim::wgsl::{adamw, sm3, sm3_sparse, sum_squares, DeviceClip};
use crate::kernels::optim::{AdamWParams, Sm3Params};
use crate::ops::gpu::wgpu_buf;
use std::sync::Arc;

use crate::kernels::sparse::{DeviceIndices, SparseIndices};
use crate::optim::{Layout, Sm3State};
use crate::device::PendingRead;
use crate::{DType, Device, Error, PendingValues, Result, Tensor};

/// The optimizer's state on the host, as `optim::{AdamW, Sm3}` keep it.
pub(crate) enum HostOptState {
    /// Per tensor (m, v); empty before the first step.
    AdamW(Vec<(Vec<f32>, Vec<f32>)>),
    Sm3(Vec<Sm3State>),
}

/// The optimizer's state on a device, one entry per trained tensor, in buffers of type `B`
/// (wgpu tensors, CUDA slices).
pub(crate) enum State<B> {
    AdamW { m: Vec<B>, v: Vec<B> },
    /// Accumulators r `[rows]`, c `[cols]` of each tensor seen as `[rows, cols]` (the dense
    /// kernel writes the new ones into `r_next`, `c_next`, then the pairs swap; the sparse
    /// kernel updates r and c in place), and momentum.
    Sm3 { dims: Vec<(usize, usize)>, r: Vec<B>, c: Vec<B>, r_next: Vec<B>, c_next: Vec<B>, momentum: Option<Vec<B>> },
}

impl<B> State<B> {
    /// The host state uploaded with `up` (AdamW's moments before the first step: zeros, made by
    /// `zeros(n)`), for tensors of `sizes` elements seen as `dims` matrices.
    pub fn upload(host: &HostOptState, sizes: &[usize], dims: &[(usize, usize)], up: impl Fn(&[f32]) -> Result<B>, zeros: impl Fn(usize) -> Result<B>) -> Result<Self> {
        Ok(match host {
            HostOptState::AdamW(state) => {
                let (mut m, mut v) = (Vec::new(), Vec::new());
                for (i, &n) in sizes.iter().enumerate() {
                    match state.get(i) {
                        Some((sm, sv)) => {
                            m.push(up(sm)?);
                            v.push(up(sv)?);
                        }
                        None => {
                            m.push(zeros(n)?);
                            v.push(zeros(n)?);
                        }
                    }
                }
                State::AdamW { m, v }
            }
            HostOptState::Sm3(state) => {
                if state.len() != sizes.len() || dims.len() != sizes.len() {
                    return Err(Error::InvalidArgument(format!("device SM3: state for {} tensors, {} trained", state.len(), sizes.len())));
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
        })
    }

    /// The state copied to the host with `down(buffer, elements)`.
    pub fn download(&self, sizes: &[usize], down: impl Fn(&B, usize) -> Result<Vec<f32>>) -> Result<HostOptState> {
        Ok(match self {
            State::AdamW { m, v } => HostOptState::AdamW((0..m.len()).map(|i| Ok((down(&m[i], sizes[i])?, down(&v[i], sizes[i])?))).collect::<Result<_>>()?),
            State::Sm3 { dims, r, c, momentum, .. } => HostOptState::Sm3(
                (0..r.len())
                    .map(|i| {
                        let (rows, cols) = dims[i];
                        Ok(Sm3State { r: down(&r[i], rows)?, c: down(&c[i], cols)?, momentum: momentum.as_ref().map(|ms| down(&ms[i], sizes[i])).transpose()? })
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// One optimizer step's hyper-parameters (the clip factor comes from the device norm).
pub(crate) enum StepParams {
    AdamW(AdamWParams),
    Sm3(Sm3Params),
}

/// The training state on the device the model is on.
pub(crate) enum DeviceOptimizer {
    Wgpu(WgpuOptimizer),
    Cuda(super::device_cuda::CudaOptimizer),
}

impl DeviceOptimizer {
    /// Uploads the masters and the optimizer state (AdamW or SM3) to `dev`; the model reads the
    /// parameters in `param_dtype` (f32 masters, or 16-bit copies of them: bf16 on CUDA, f16 on
    /// wgpu, rewritten from the masters after each step), in a model of `model_dtype` (on CUDA,
    /// f32 parameters of a bf16 model get bf16 copies beside them, see `CudaOptimizer`). A sparse
    /// layout (sparse fine-tuning's deltas, f32) keeps its active indices: SM3 runs its sparse
    /// kernel on their device copy, the one the model's sparse linears use (AdamW is
    /// elementwise, the same for both layouts).
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], layouts: &[Layout], host: &HostOptState, dev: Device, (param_dtype, model_dtype): (DType, DType)) -> Result<Self> {
        if layouts.len() != masters.len() {
            return Err(Error::InvalidArgument(format!("device optimizer: {} layouts for {} tensors", layouts.len(), masters.len())));
        }
        let indices = layouts
            .iter()
            .map(|l| match l {
                Layout::Dense { .. } => Ok(None),
                Layout::Sparse { .. } if param_dtype != DType::F32 => Err(Error::UnsupportedDType { op: "device optimizer: sparse deltas", dtype: param_dtype }),
                Layout::Sparse { indices, .. } => Ok(Some(indices.clone())),
            })
            .collect::<Result<Vec<_>>>()?;
        let dims: Vec<(usize, usize)> = layouts.iter().map(Layout::matrix).collect();
        match dev {
            Device::Cuda(i) => Ok(DeviceOptimizer::Cuda(super::device_cuda::CudaOptimizer::new(masters, shapes, &dims, indices, host, i, param_dtype, model_dtype)?)),
            _ if !matches!(param_dtype, DType::F32 | DType::F16) => Err(Error::UnsupportedDType { op: "device optimizer (wgpu): trained parameters", dtype: param_dtype }),
            _ => Ok(DeviceOptimizer::Wgpu(WgpuOptimizer::new(masters, shapes, &dims, indices, host, dev, param_dtype)?)),
        }
    }

    /// The masters as the model reads them, one tensor per trained tensor.
    pub fn params(&self) -> &[Tensor] {
        match self {
            DeviceOptimizer::Wgpu(w) => &w.params,
            DeviceOptimizer::Cuda(c) => &c.params,
        }
    }

    /// One step over every tensor with its device gradient; returns the gradients' sum of
    /// squares, on its way to the host.
    pub fn step(&mut self, grads: &[Tensor], p: StepParams, max_norm: f32) -> Result<PendingSumSq> {
        match (self, p) {
            (DeviceOptimizer::Wgpu(w), p) => w.step(grads, p, max_norm),
            (DeviceOptimizer::Cuda(c), p) => c.step(grads, p, max_norm),
        }
    }

    /// The sum of squares of every gradient (read back: one float), before a step decides
    /// whether to take it (loss scaling).
    pub fn sum_squares(&mut self, grads: &[Tensor]) -> Result<f64> {
        match self {
            DeviceOptimizer::Wgpu(w) => w.sum_squares(grads),
            DeviceOptimizer::Cuda(c) => c.sum_squares(grads),
        }
    }

    /// The masters and the optimizer state, copied to the host.
    pub fn download(&self) -> Result<(Vec<Vec<f32>>, HostOptState)> {
        match self {
            DeviceOptimizer::Wgpu(w) => w.download(),
            DeviceOptimizer::Cuda(c) => c.download(),
        }
    }
}

/// A step's squared gradient norm on its way to the host (f32 on wgpu, f64 on CUDA).
pub(crate) enum PendingSumSq {
    F32(PendingValues),
    F64(PendingRead),
}

impl PendingSumSq {
    pub fn wait(self) -> Result<f64> {
        match self {
            PendingSumSq::F32(p) => Ok(p.wait()?[0] as f64),
            PendingSumSq::F64(p) => Ok(bytemuck::pod_read_unaligned::<f64>(&p.wait()?)),
        }
    }
}

/// The wgpu state: masters and optimizer state in buffers the kernels update in place.
pub(crate) struct WgpuOptimizer {
    /// What the model reads, one tensor per trained tensor: the masters themselves (f32), or
    /// their f16 copies (an f16 model's trained base weights), rewritten in place from the
    /// masters after each tensor's step.
    pub params: Vec<Tensor>,
    /// The f32 masters; the kernels update their buffers in place.
    masters: Vec<Tensor>,
    param_dtype: DType,
    /// The active indices of each sparse tensor, None for a dense one.
    indices: Vec<Option<Arc<SparseIndices>>>,
    state: State<Tensor>,
    sum_sq: Tensor,
}

impl WgpuOptimizer {
    /// Uploads the masters and the optimizer state. `dims` gives each tensor's `[rows, cols]`
    /// matrix for SM3, `indices` the active entries of the sparse ones.
    #[allow(clippy::too_many_arguments)]
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], dims: &[(usize, usize)], indices: Vec<Option<Arc<SparseIndices>>>, host: &HostOptState, dev: Device, param_dtype: DType) -> Result<Self> {
        let masters_dev = masters.iter().zip(shapes).map(|(m, s)| Tensor::from_vec(m.clone(), s.clone())?.to_device(&dev)).collect::<Result<Vec<_>>>()?;
        // What the model reads: the masters themselves in f32, else copies in `param_dtype`.
        let params = masters_dev.iter().map(|m| m.to_dtype(param_dtype)).collect::<Result<Vec<_>>>()?;
        // The state's tensors are flat: the kernels see buffers.
        let sizes: Vec<usize> = masters.iter().map(Vec::len).collect();
        let up = |v: &[f32]| Tensor::from_vec(v.to_vec(), [v.len()])?.to_device(&dev);
        let state = State::upload(host, &sizes, dims, up, |n| Tensor::zeros([n], DType::F32, &dev))?;
        let sum_sq = Tensor::zeros([1], DType::F32, &dev)?;
        Ok(WgpuOptimizer { params, masters: masters_dev, param_dtype, indices, state, sum_sq })
    }

    /// One step over every tensor with its device gradient, clipped to a global norm of
    /// `max_norm` (0: no clipping). Returns the gradients' sum of squares, on its way to the
    /// host (read behind the step, before the next step's reduction overwrites it).
    pub fn step(&mut self, grads: &[Tensor], p: StepParams, max_norm: f32) -> Result<PendingSumSq> {
        if grads.len() != self.masters.len() {
            return Err(Error::InvalidArgument(format!("device optimizer: {} gradients for {} tensors", grads.len(), self.masters.len())));
        }
        self.dispatch_sum_squares(grads)?;
        let (rt, ss) = wgpu_buf(&self.sum_sq);
        let clip = DeviceClip { sum_sq: ss, max_norm };
        let clip = (max_norm > 0.0).then_some(&clip);
        let (d, q, k) = (&rt.device, &rt.queue, &rt.kernels);
        for (i, g) in grads.iter().enumerate() {
            // An f16 gradient (an f16 model's trained base weights) is read in f32 one tensor at
            // a time (its f32 copy goes back to the pool for the next tensor's), so a step holds
            // one f32 copy at most; an overflow stays infinite, so a loss-scaled step sees it.
            let g = &g.to_dtype(DType::F32)?;
            let (w, gb) = (wgpu_buf(&self.masters[i]).1, wgpu_buf(g).1);
            match (&mut self.state, &p) {
                (State::AdamW { m, v }, StepParams::AdamW(p)) => adamw(d, q, k, w, gb, wgpu_buf(&m[i]).1, wgpu_buf(&v[i]).1, g.elem_count(), *p, clip)?,
                (State::Sm3 { dims, r, c, r_next, c_next, momentum }, StepParams::Sm3(p)) => {
                    let (rows, cols) = dims[i];
                    let mom = momentum.as_ref().map(|ms| wgpu_buf(&ms[i]).1);
                    if let Some(idx) = &self.indices[i] {
                        // r and c are updated in place by the sparse kernel.
                        let DeviceIndices::Wgpu(ib) = &*idx.on_device_of(&self.masters[i])? else { unreachable!("a wgpu tensor's indices are on wgpu") };
                        sm3_sparse(d, q, k, ib.buffer(), idx.len(), w, gb, wgpu_buf(&r[i]).1, wgpu_buf(&c[i]).1, mom, rows, cols, *p, clip)?;
                    } else {
                        sm3(d, q, k, w, gb, wgpu_buf(&r[i]).1, wgpu_buf(&c[i]).1, wgpu_buf(&r_next[i]).1, wgpu_buf(&c_next[i]).1, mom, rows, cols, *p, clip)?;
                        std::mem::swap(&mut r[i], &mut r_next[i]);
                        std::mem::swap(&mut c[i], &mut c_next[i]);
                    }
                }
                _ => return Err(Error::InvalidArgument("device optimizer: step parameters of another optimizer".into())),
            }
            // The model's copy rewritten in place from the new master (queued after the
            // backward that read it): no second set of copies while the model holds the first.
            if self.param_dtype != DType::F32 {
                let pm = &self.params[i];
                crate::kernels::cast::wgsl::cast(d, q, k, w, DType::F32, wgpu_buf(pm).1, self.param_dtype, pm.elem_count())?;
            }
        }
        Ok(PendingSumSq::F32(self.sum_sq.read_later()?))
    }

    /// Queues the gradients' sum of squares (f32 or f16, read as they are) into `sum_sq`.
    fn dispatch_sum_squares(&self, grads: &[Tensor]) -> Result<()> {
        let (rt, ss) = wgpu_buf(&self.sum_sq);
        let bufs = grads
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let pr = crate::ops::gpu::wgpu_precision(g.dtype())
                    .ok_or_else(|| Error::InvalidArgument(format!("device optimizer: the gradient of trained tensor {i} is {} (f32 or f16 on wgpu)", g.dtype())))?;
                Ok((wgpu_buf(g).1, g.elem_count(), pr))
            })
            .collect::<Result<Vec<_>>>()?;
        sum_squares(&rt.device, &rt.queue, &rt.kernels, &bufs, ss)
    }

    /// The gradients' sum of squares, read back.
    pub fn sum_squares(&mut self, grads: &[Tensor]) -> Result<f64> {
        self.dispatch_sum_squares(grads)?;
        Ok(self.sum_sq.to_scalar()? as f64)
    }

    /// The masters and the optimizer state, copied to the host.
    pub fn download(&self) -> Result<(Vec<Vec<f32>>, HostOptState)> {
        let masters: Vec<Vec<f32>> = self.masters.iter().map(|t| t.to_vec_f32()).collect::<Result<_>>()?;
        let sizes: Vec<usize> = masters.iter().map(Vec::len).collect();
        let state = self.state.download(&sizes, |t, _| t.to_vec_f32())?;
        Ok((masters, state))
    }
}
