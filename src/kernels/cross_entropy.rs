//! Cross-entropy from logits with an ignore index, averaged over the counted rows:
//!
//!   loss = (1/C) * sum over rows m with target t_m != ignore of (logsumexp(z_m) - z_m[t_m])
//!
//! where C is the number of counted rows (loss 0 when C = 0). logits `[M, V]`, targets `[M]` i32.
//! Backward: `dz[m, v] = dy / C * (softmax(z_m)[v] - [v == t_m])` for counted rows, 0 otherwise.

use crate::{Error, Result};

/// Checks targets: each is `ignore_index` or in `0..vocab`.
pub fn check_targets(targets: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    match targets.iter().position(|&t| t != ignore_index && (t < 0 || t as usize >= vocab)) {
        Some(pos) => {
            Err(Error::IndexOutOfRange { op: "cross_entropy", index: targets[pos] as i64, position: pos, bound: vocab })
        }
        None => Ok(()),
    }
}

pub mod reference {
    pub fn cross_entropy(logits: &[f64], targets: &[i32], v: usize, ignore_index: i32) -> f64 {
        let mut total = 0.0;
        let mut count = 0usize;
        for (row, &t) in logits.chunks(v).zip(targets) {
            if t == ignore_index {
                continue;
            }
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += lse - row[t as usize];
            count += 1;
        }
        if count == 0 {
            0.0
        } else {
            total / count as f64
        }
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use crate::kernels::reduce::cpu::softmax_row;

    /// Returns (mean loss, counted rows) and writes the softmax probabilities of every counted
    /// row into `probs` (uncounted rows are left zero) for the backward.
    pub fn forward(logits: &[f32], targets: &[i32], probs: &mut [f32], v: usize, ignore_index: i32) -> (f32, usize) {
        let (total, count) = probs
            .par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter())
            .filter(|(_, &t)| t != ignore_index)
            .map(|((p, z), &t)| {
                let lse = softmax_row(z, p);
                ((lse - z[t as usize]) as f64, 1usize)
            })
            .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let loss = if count == 0 { 0.0 } else { (total / count as f64) as f32 };
        (loss, count)
    }

    /// `dz = dy / C * (probs - onehot)` on counted rows, 0 elsewhere.
    pub fn backward(probs: &[f32], targets: &[i32], dz: &mut [f32], v: usize, ignore_index: i32, count: usize, dy: f32) {
        let s = if count == 0 { 0.0 } else { dy / count as f32 };
        dz.par_chunks_mut(v).zip(probs.par_chunks(v)).zip(targets.par_iter()).for_each(|((d, p), &t)| {
            if t == ignore_index {
                d.fill(0.0);
                return;
            }
            for (d, p) in d.iter_mut().zip(p) {
                *d = s * p;
            }
            d[t as usize] -= s;
        });
    }
}
