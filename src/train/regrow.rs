//! Sparse fine-tuning's changes of the active entries (SpIEL): when they are due, the
//! gradient sums that score regrowth by gradients (`Regrow::Grad`), and the reselection
//! itself, which runs on the host (on a GPU the masters and the optimizer's state come back
//! for it and go up again).

use std::sync::Arc;

use super::{Method, Trainer};
use crate::optim::{Layout, Optimizer};
use crate::peft::sparse::{reselect, Regrow};
use crate::{ops, DType, Device, Error, Result, Tensor};

/// The dense gradient of each sparse target matrix summed over a regrowth window: on the host
/// (CPU training, checkpoints), or in f32 tensors on the device the model trains on (each
/// step's dW added there: no download of every target's dense gradient per step).
pub(crate) enum GradSums {
    Host(Vec<Vec<f32>>),
    Device(Vec<Tensor>),
}

impl GradSums {
    /// Zeros for every target matrix, on `device` (None: the host).
    pub fn zeros(layouts: &[Layout], device: Option<Device>) -> Result<Self> {
        let sizes = layouts.iter().map(|l| l.matrix().0 * l.matrix().1);
        Ok(match device {
            None => GradSums::Host(sizes.map(|n| vec![0.0; n]).collect()),
            Some(d) => GradSums::Device(sizes.map(|n| Tensor::zeros([n], DType::F32, &d)).collect::<Result<_>>()?),
        })
    }

    /// Adds one piece's dense gradients (one per target; None: no gradient) times `scale`
    /// (the inverse loss scale), where the sums are; host sums meeting device gradients (after
    /// a checkpoint load) move to the device first.
    pub fn add(&mut self, grads: &[Option<Tensor>], scale: f32) -> Result<()> {
        if let (GradSums::Host(v), Some(g)) = (&*self, grads.iter().flatten().next()) {
            if g.device() != Device::Cpu {
                let dev = g.device();
                *self = GradSums::Device(v.iter().map(|s| Tensor::from_vec(s.clone(), [s.len()])?.to_device(&dev)).collect::<Result<_>>()?);
            }
        }
        match self {
            GradSums::Host(sums) => {
                for (acc, g) in sums.iter_mut().zip(grads) {
                    if let Some(g) = g {
                        acc.iter_mut().zip(g.to_vec_f32()?).for_each(|(a, v)| *a += v * scale);
                    }
                }
            }
            GradSums::Device(sums) => {
                for (acc, g) in sums.iter_mut().zip(grads) {
                    if let Some(g) = g {
                        let mut g = ops::reshape(&g.to_dtype(DType::F32)?, [acc.elem_count()])?;
                        if scale != 1.0 {
                            g = ops::scale(&g, scale)?;
                        }
                        *acc = ops::add(acc, &g)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The sums on the host.
    pub fn into_host(self) -> Result<Vec<Vec<f32>>> {
        match self {
            GradSums::Host(v) => Ok(v),
            GradSums::Device(ts) => ts.iter().map(Tensor::to_vec_f32).collect(),
        }
    }

    /// Moves device sums to the host (for a checkpoint); on a failed copy they stay put.
    pub fn move_to_host(&mut self) -> Result<()> {
        if let GradSums::Device(ts) = self {
            let v = ts.iter().map(Tensor::to_vec_f32).collect::<Result<_>>()?;
            *self = GradSums::Host(v);
        }
        Ok(())
    }

    /// Adds `other` (a step's sums, where these are) times `scale`.
    pub fn absorb(&mut self, other: GradSums, scale: f32) -> Result<()> {
        let grads: Vec<Option<Tensor>> = match other {
            GradSums::Host(v) => v
                .into_iter()
                .map(|s| {
                    let n = s.len();
                    Tensor::from_vec(s, [n]).map(Some)
                })
                .collect::<Result<_>>()?,
            GradSums::Device(ts) => ts.into_iter().map(Some).collect(),
        };
        self.add(&grads, scale)
    }
}

impl Trainer {
    /// Sparse reselection after a device step, when due (every `reselect_every` steps): it runs
    /// on the host, so the masters and the optimizer's state come back, change their active
    /// entries, and go up again (then into the model).
    pub(super) fn device_reselect(&mut self) -> Result<()> {
        if self.reselect_due() {
            self.sync_host()?;
            self.maybe_reselect()?;
            self.reset_device_state()?;
            self.install(None)?;
        }
        Ok(())
    }

    /// Sparse fine-tuning: whether the step about to run sums dense gradients for regrowth.
    pub(super) fn in_grad_window(&self) -> bool {
        let Method::Sparse(s) = &self.config.method else { return false };
        if s.regrow != Regrow::Grad || s.reselect_every == 0 {
            return false;
        }
        let left = s.reselect_every - self.step % s.reselect_every;
        left <= s.grad_window.max(1) && self.step + left < self.total_steps()
    }

    /// Sparse fine-tuning: after every `reselect_every` steps (but not at the end), drop the
    /// smallest deltas and grow the best-scoring inactive entries.
    pub(super) fn maybe_reselect(&mut self) -> Result<()> {
        let Method::Sparse(s) = &self.config.method else { return Ok(()) };
        if !self.reselect_due() {
            return Ok(());
        }
        // Gradient sums made on a device come to the host, where the scores are read.
        let sums = self.grad_sums.take().map(GradSums::into_host).transpose()?;
        for i in 0..self.layouts.len() {
            let Layout::Sparse { rows, cols, indices } = &self.layouts[i] else { continue };
            let (rows, cols) = (*rows, *cols);
            let n = s.changes(indices.len(), self.step, self.total_steps());
            let sel = match (s.regrow, &self.optimizer, &sums) {
                (Regrow::Sm3, Optimizer::Sm3(o), _) => {
                    let (r, c) = (&o.state[i].r, &o.state[i].c);
                    reselect(indices, &self.masters[i], rows * cols, n, |e| r[e as usize / cols] * c[e as usize % cols])
                }
                (Regrow::Grad, _, Some(sums)) => reselect(indices, &self.masters[i], rows * cols, n, |e| sums[i][e as usize].abs()),
                _ => return Err(Error::InvalidArgument("sparse regrowth: no scores (SM3 regrowth needs the SM3 optimizer)".into())),
            };
            let mut values = vec![0.0; sel.indices.len()];
            for &(o, n) in &sel.moves {
                values[n] = self.masters[i][o];
            }
            self.masters[i] = values;
            self.optimizer.remap(i, &sel.moves, sel.indices.len());
            self.layouts[i] = Layout::Sparse { rows, cols, indices: Arc::new(sel.indices.into()) };
        }
        Ok(())
    }

    /// Sparse fine-tuning: whether the step just taken ends a reselection period.
    pub(super) fn reselect_due(&self) -> bool {
        let Method::Sparse(s) = &self.config.method else { return false };
        s.reselect_every > 0 && self.step.is_multiple_of(s.reselect_every) && self.step < self.total_steps()
    }

    /// The gradient sums of an open regrowth window, on the host (for checkpoints, after
    /// `sync_host`): None outside a window, or while the sums are on a device.
    pub(crate) fn grad_sums(&self) -> Option<&Vec<Vec<f32>>> {
        match &self.grad_sums {
            Some(GradSums::Host(v)) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn set_grad_sums(&mut self, sums: Option<Vec<Vec<f32>>>) {
        self.grad_sums = sums.map(GradSums::Host);
    }
}
