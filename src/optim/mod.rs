//! Optimizers over f32 master weights (AdamW, SM3), the learning-rate schedule and gradient
//! clipping. `Optimizer` is what the trainer holds: either one, over parameters described by
//! their `Layout`.

mod adamw;
mod schedule;
mod sm3;

use std::sync::Arc;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{clip_grad_norm, Schedule, ScheduleKind};
pub use sm3::{Sm3, Sm3Config, Sm3State};

use crate::{Error, Result, Tensor};

/// How a trained f32 vector maps onto a matrix, which SM3 needs for its accumulators.
#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// A dense tensor seen as `[rows, cols]` (a vector is `[len, 1]`).
    Dense { rows: usize, cols: usize },
    /// The active entries of a `[rows, cols]` matrix, as sorted flat indices.
    Sparse { rows: usize, cols: usize, indices: Arc<crate::kernels::sparse::SparseIndices> },
}

impl Layout {
    /// The dense layout of a tensor shape: the last axis is the column, the rest the rows.
    pub fn dense(shape: &[usize]) -> Layout {
        match shape {
            [] => Layout::Dense { rows: 1, cols: 1 },
            [n] => Layout::Dense { rows: *n, cols: 1 },
            [lead @ .., last] => Layout::Dense { rows: lead.iter().product(), cols: *last },
        }
    }

    pub fn matrix(&self) -> (usize, usize) {
        match self {
            Layout::Dense { rows, cols } | Layout::Sparse { rows, cols, .. } => (*rows, *cols),
        }
    }

    /// Trained elements.
    pub fn len(&self) -> usize {
        match self {
            Layout::Dense { rows, cols } => rows * cols,
            Layout::Sparse { indices, .. } => indices.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which optimizer, with its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    AdamW(AdamWConfig),
    Sm3(Sm3Config),
}

impl OptimizerConfig {
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::AdamW(_) => "adamw",
            OptimizerConfig::Sm3(_) => "sm3",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    AdamW(AdamW),
    Sm3(Sm3),
}

impl Optimizer {
    /// The optimizer for parameters laid out as `layouts`, state allocated now (so its size
    /// can be reported before the first step).
    pub fn new(config: OptimizerConfig, layouts: &[Layout]) -> Self {
        match config {
            OptimizerConfig::AdamW(c) => {
                let mut a = AdamW::new(c);
                a.state = layouts.iter().map(|l| (vec![0.0; l.len()], vec![0.0; l.len()])).collect();
                Optimizer::AdamW(a)
            }
            OptimizerConfig::Sm3(c) => Optimizer::Sm3(Sm3::new(c, layouts)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::AdamW(_) => "adamw",
            Optimizer::Sm3(_) => "sm3",
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::AdamW(a) => a.step,
            Optimizer::Sm3(s) => s.step,
        }
    }

    pub fn set_steps(&mut self, n: u64) {
        match self {
            Optimizer::AdamW(a) => a.step = n,
            Optimizer::Sm3(s) => s.step = n,
        }
    }

    /// Floats of optimizer state.
    pub fn state_len(&self) -> usize {
        match self {
            Optimizer::AdamW(a) => a.state_len(),
            Optimizer::Sm3(s) => s.state_len(),
        }
    }

    /// One update; gradients are multiplied by `grad_scale` (the clipping factor) on the fly.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], layouts: &[Layout], lr: f32, grad_scale: f32) -> Result<()> {
        match self {
            Optimizer::AdamW(a) => a.step_scaled(params, grads, lr, grad_scale),
            Optimizer::Sm3(s) => s.step(params, grads, layouts, lr, grad_scale),
        }
    }

    /// Per-element state of parameter `i` after its active set changed: `moves` lists
    /// (old position, new position) of the entries kept; new entries start at zero. SM3's
    /// row and column accumulators belong to the matrix and are kept as they are.
    pub fn remap(&mut self, i: usize, moves: &[(usize, usize)], new_len: usize) {
        let remap = |v: &mut Vec<f32>| {
            let mut out = vec![0.0; new_len];
            for &(o, n) in moves {
                out[n] = v[o];
            }
            *v = out;
        };
        match self {
            Optimizer::AdamW(a) => {
                let (m, v) = &mut a.state[i];
                remap(m);
                remap(v);
            }
            Optimizer::Sm3(s) => {
                if let Some(m) = &mut s.state[i].momentum {
                    remap(m);
                }
            }
        }
    }

    /// The state as named tensors (for checkpoints): `m.NAME`, `v.NAME` for AdamW; `r.NAME`,
    /// `c.NAME` (and `momentum.NAME`) for SM3.
    pub fn state_tensors(&self, names: &[String]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let vec = |v: &Vec<f32>| Tensor::from_vec(v.clone(), [v.len()]);
        match self {
            Optimizer::AdamW(a) => {
                for (n, (m, v)) in names.iter().zip(&a.state) {
                    out.push((format!("m.{n}"), vec(m)?));
                    out.push((format!("v.{n}"), vec(v)?));
                }
            }
            Optimizer::Sm3(s) => {
                for (n, st) in names.iter().zip(&s.state) {
                    out.push((format!("r.{n}"), vec(&st.r)?));
                    out.push((format!("c.{n}"), vec(&st.c)?));
                    if let Some(m) = &st.momentum {
                        out.push((format!("momentum.{n}"), vec(m)?));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Restores the state written by `state_tensors`; `get(key, len)` reads one vector and
    /// fails with a clear error when it is missing or of another length.
    pub fn load_state(&mut self, names: &[String], mut get: impl FnMut(&str, usize) -> Result<Vec<f32>>) -> Result<()> {
        match self {
            Optimizer::AdamW(a) => {
                for (n, (m, v)) in names.iter().zip(&mut a.state) {
                    *m = get(&format!("m.{n}"), m.len())?;
                    *v = get(&format!("v.{n}"), v.len())?;
                }
            }
            Optimizer::Sm3(s) => {
                for (n, st) in names.iter().zip(&mut s.state) {
                    st.r = get(&format!("r.{n}"), st.r.len())?;
                    st.c = get(&format!("c.{n}"), st.c.len())?;
                    if let Some(m) = &mut st.momentum {
                        *m = get(&format!("momentum.{n}"), m.len())?;
                    }
                }
            }
        }
        if names.len() != self.param_count() {
            return Err(Error::InvalidArgument(format!("optimizer state for {} parameters, given {} names", self.param_count(), names.len())));
        }
        Ok(())
    }

    fn param_count(&self) -> usize {
        match self {
            Optimizer::AdamW(a) => a.state.len(),
            Optimizer::Sm3(s) => s.state.len(),
        }
    }
}
