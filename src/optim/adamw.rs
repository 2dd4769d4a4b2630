//! AdamW (Loshchilov & Hutter) with decoupled weight decay and bias correction, in the update
//! order torch.optim.AdamW uses, so one step matches it to rounding:
//!
//!   w ← w · (1 - lr·λ)
//!   m ← m + (1 - β1)·(g - m)            (torch's lerp)
//!   v ← β2·v + (1 - β2)·g²
//!   w ← w - (lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)
//!
//! Parameters are f32 master copies owned by the caller; the state is two f32 vectors per
//! parameter, created on the first step. The arithmetic is `kernels::optim::cpu::adamw`.

use crate::kernels::optim::{cpu, AdamWParams};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (t in the bias correction).
    pub step: u64,
    /// Per parameter: (m, v).
    pub state: Vec<(Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, state: Vec::new() }
    }

    /// Floats of optimizer state (for memory reports).
    pub fn state_len(&self) -> usize {
        self.state.iter().map(|(m, v)| m.len() + v.len()).sum()
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32) -> Result<()> {
        self.step_scaled(params, grads, lr, 1.0)
    }

    /// As `step`, with every gradient multiplied by `grad_scale` (the clipping factor) on the
    /// fly.
    pub fn step_scaled(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f32, grad_scale: f32) -> Result<()> {
        if params.len() != grads.len() {
            return Err(Error::InvalidArgument(format!("AdamW: {} parameters but {} gradients", params.len(), grads.len())));
        }
        if self.state.is_empty() {
            self.state = params.iter().map(|p| (vec![0.0; p.len()], vec![0.0; p.len()])).collect();
        }
        if self.state.len() != params.len() {
            return Err(Error::InvalidArgument(format!("AdamW: state for {} parameters, given {}", self.state.len(), params.len())));
        }
        self.step += 1;
        let c = self.config;
        let p = AdamWParams { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, step: self.step as u32, grad_scale };
        for (i, ((w, g), (m, v))) in params.iter_mut().zip(grads).zip(self.state.iter_mut()).enumerate() {
            cpu::adamw(w, g, m, v, p).map_err(|e| Error::InvalidArgument(format!("AdamW, parameter {i}: {e}")))?;
        }
        Ok(())
    }
}
