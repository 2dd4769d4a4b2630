//! SM3 (Anil et al., 2019, "Memory-Efficient Adaptive Optimization"): an Adagrad-like
//! optimizer whose state for an `[R, C]` matrix is R + C accumulators instead of R·C (plus R·C
//! with momentum). Dense matrices, vectors (the `[L, 1]` case) and the active entries of a
//! sparse delta (`Layout::Sparse`, for sparse fine-tuning) share one implementation:
//! `kernels::optim::cpu::{sm3, sm3_sparse}`, whose module doc gives the update.

use super::Layout;
use crate::kernels::optim::{cpu, Sm3Params};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sm3Config {
    /// Momentum β1 (0: none, and no momentum buffer).
    pub beta1: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for Sm3Config {
    fn default() -> Self {
        Sm3Config { beta1: 0.9, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// State of one parameter: row and column accumulators, and momentum per trained element.
#[derive(Clone, Debug, PartialEq)]
pub struct Sm3State {
    pub r: Vec<f32>,
    pub c: Vec<f32>,
    pub momentum: Option<Vec<f32>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sm3 {
    pub config: Sm3Config,
    pub step: u64,
    pub state: Vec<Sm3State>,
}

impl Sm3 {
    /// State for parameters laid out as `layouts`, all accumulators zero.
    pub fn new(config: Sm3Config, layouts: &[Layout]) -> Self {
        let state = layouts
            .iter()
            .map(|l| {
                let (rows, cols) = l.matrix();
                Sm3State { r: vec![0.0; rows], c: vec![0.0; cols], momentum: (config.beta1 > 0.0).then(|| vec![0.0; l.len()]) }
            })
            .collect();
        Sm3 { config, step: 0, state }
    }

    pub fn state_len(&self) -> usize {
        self.state.iter().map(|s| s.r.len() + s.c.len() + s.momentum.as_ref().map_or(0, Vec::len)).sum()
    }

    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], layouts: &[Layout], lr: f32, grad_scale: f32) -> Result<()> {
        if params.len() != grads.len() || params.len() != layouts.len() || params.len() != self.state.len() {
            return Err(Error::InvalidArgument(format!(
                "SM3: {} parameters, {} gradients, {} layouts, state for {}",
                params.len(),
                grads.len(),
                layouts.len(),
                self.state.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let p = Sm3Params { lr, eps: c.eps, beta1: c.beta1, weight_decay: c.weight_decay, grad_scale };
        for (i, (((w, g), l), s)) in params.iter_mut().zip(grads).zip(layouts).zip(&mut self.state).enumerate() {
            let mom = s.momentum.as_deref_mut();
            let (rows, cols) = l.matrix();
            match l {
                Layout::Dense { .. } => cpu::sm3(w, g, &mut s.r, &mut s.c, mom, rows, cols, p),
                Layout::Sparse { indices, .. } => cpu::sm3_sparse(indices, w, g, &mut s.r, &mut s.c, mom, rows, cols, p),
            }
            .map_err(|e| Error::InvalidArgument(format!("SM3, parameter {i}: {e}")))?;
        }
        Ok(())
    }
}
