//! Training state on a wgpu device: the f32 masters of the trained tensors and AdamW's moments
//! live in device buffers for the whole run. A step's gradients stay on the device, their
//! global norm is reduced there and the clip factor computed inside the AdamW kernel, so the
//! host reads back only the loss and the squared norm (one float). The host copies (the
//! trainer's `masters`, the optimizer's state) are refreshed when read: checkpoints, tests.

use crate::kernels::optim::wgsl::{adamw, sum_squares, DeviceClip};
use crate::kernels::optim::AdamWParams;
use crate::ops::gpu::wgpu_buf;
use crate::{DType, Device, Error, Result, Tensor};

/// Host copies of the device state: the masters, and per tensor AdamW's (m, v).
pub(crate) type HostState = (Vec<Vec<f32>>, Vec<(Vec<f32>, Vec<f32>)>);

pub(crate) struct DeviceAdamW {
    /// The masters, one tensor per trained tensor; the kernels update their buffers in place.
    pub params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    sum_sq: Tensor,
}

impl DeviceAdamW {
    /// Uploads the masters and the moments (`state`: per tensor (m, v), as the host AdamW
    /// keeps them; empty before the first step).
    pub fn new(masters: &[Vec<f32>], shapes: &[Vec<usize>], state: &[(Vec<f32>, Vec<f32>)], dev: Device) -> Result<Self> {
        let up = |v: &[f32], s: &[usize]| Tensor::from_vec(v.to_vec(), s.to_vec())?.to_device(&dev);
        let params = masters.iter().zip(shapes).map(|(m, s)| up(m, s)).collect::<Result<Vec<_>>>()?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, s) in shapes.iter().enumerate() {
            match state.get(i) {
                Some((sm, sv)) => {
                    m.push(up(sm, s)?);
                    v.push(up(sv, s)?);
                }
                None => {
                    m.push(Tensor::zeros(s.clone(), DType::F32, &dev)?);
                    v.push(Tensor::zeros(s.clone(), DType::F32, &dev)?);
                }
            }
        }
        let sum_sq = Tensor::zeros([1], DType::F32, &dev)?;
        Ok(DeviceAdamW { params, m, v, sum_sq })
    }

    /// One AdamW step over every tensor with its device gradient, clipped to a global norm of
    /// `max_norm` (0: no clipping). Returns the gradient's global norm.
    pub fn step(&mut self, grads: &[Tensor], p: AdamWParams, max_norm: f32) -> Result<f32> {
        if grads.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!("device AdamW: {} gradients for {} tensors", grads.len(), self.params.len())));
        }
        let (rt, ss) = wgpu_buf(&self.sum_sq);
        let bufs: Vec<(&wgpu::Buffer, usize)> = grads.iter().map(|g| (wgpu_buf(g).1, g.elem_count())).collect();
        sum_squares(&rt.device, &rt.queue, &rt.kernels, &bufs, ss)?;
        let clip = DeviceClip { sum_sq: ss, max_norm };
        for (i, g) in grads.iter().enumerate() {
            let n = g.elem_count();
            let (w, m, v) = (wgpu_buf(&self.params[i]).1, wgpu_buf(&self.m[i]).1, wgpu_buf(&self.v[i]).1);
            adamw(&rt.device, &rt.queue, &rt.kernels, w, wgpu_buf(g).1, m, v, n, p, (max_norm > 0.0).then_some(&clip))?;
        }
        Ok(self.sum_sq.to_scalar()?.max(0.0).sqrt())
    }

    /// The masters and the moments, copied to the host.
    pub fn download(&self) -> Result<HostState> {
        let masters = self.params.iter().map(|t| t.to_vec_f32()).collect::<Result<_>>()?;
        let state = self.m.iter().zip(&self.v).map(|(m, v)| Ok((m.to_vec_f32()?, v.to_vec_f32()?))).collect::<Result<_>>()?;
        Ok((masters, state))
    }
}
