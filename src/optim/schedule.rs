//! Learning-rate schedule (linear warmup, then cosine or linear decay to zero) and clipping by
//! the global gradient norm.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based): `peak·(step+1)/warmup` during
    /// warmup, then the decay from peak to 0 at `total_steps`, as transformers' schedulers.
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f32 / decay_steps as f32).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Linear => self.peak_lr * (1.0 - progress),
            ScheduleKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (in f64, summed per tensor in parallel).
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f32) -> f32 {
    let sq: f64 = grads.iter().map(|g| g.par_iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum();
    let norm = sq.sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}
