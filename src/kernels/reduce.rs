//! Reductions: sum of all elements, and softmax over the last axis.
//!
//! Backward:
//! - sum: `dx[i] = dy` (mean: `dy / count`)
//! - softmax `y = exp(x - max) / sum exp(x - max)` per row: `dx = y * (dy - sum_j dy_j * y_j)`

pub mod reference {
    pub fn sum(a: &[f64]) -> f64 {
        a.iter().sum()
    }

    pub fn softmax(a: &[f64], n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(a.len());
        for row in a.chunks(n) {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
            out.extend(row.iter().map(|x| (x - max).exp() / z));
        }
        out
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use crate::device::cpu::rows_per_task;

    /// Sum in f64 partials per chunk, so a long sum does not drift.
    pub fn sum(a: &[f32]) -> f32 {
        a.par_chunks(1 << 14).map(|c| c.iter().map(|&x| x as f64).sum::<f64>()).sum::<f64>() as f32
    }

    pub fn softmax(a: &[f32], out: &mut [f32], n: usize) {
        let chunk = rows_per_task(n) * n;
        out.par_chunks_mut(chunk).zip(a.par_chunks(chunk)).for_each(|(o, a)| {
            for (o, a) in o.chunks_mut(n).zip(a.chunks(n)) {
                softmax_row(a, o);
            }
        });
    }

    /// Numerically stable softmax of one row; returns log(sum exp(x - max)) + max (the
    /// log-sum-exp), which cross-entropy reuses.
    pub fn softmax_row(a: &[f32], o: &mut [f32]) -> f32 {
        let max = crate::kernels::math::max(a);
        o.copy_from_slice(a);
        let z = crate::kernels::math::exp_shifted_sum(o, max);
        crate::kernels::math::scale(o, 1.0 / z);
        max + z.ln()
    }

    /// `dx = y * (dy - <dy, y>)` per row.
    pub fn softmax_backward(y: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        let chunk = rows_per_task(n) * n;
        dx.par_chunks_mut(chunk).zip(y.par_chunks(chunk)).zip(dy.par_chunks(chunk)).for_each(|((dx, y), dy)| {
            for ((dx, y), dy) in dx.chunks_mut(n).zip(y.chunks(n)).zip(dy.chunks(n)) {
                let dot = crate::kernels::math::dot(y, dy);
                for ((d, y), g) in dx.iter_mut().zip(y).zip(dy) {
                    *d = y * (g - dot);
                }
            }
        });
    }
}
