//! Element-wise ops: add and mul with a broadcast right-hand side, scale, SiLU.
//!
//! Broadcasting is the one form the model needs: `rhs` has the trailing dims of `lhs` (a bias
//! `[N]` onto `[M, N]`), so element i of lhs meets element `i % rhs.len()` of rhs.
//!
//! Backward:
//! - add: `dlhs = dy`, `drhs = sum over the broadcast rows of dy`
//! - mul: `dlhs = dy * rhs`, `drhs = sum over the broadcast rows of dy * lhs`
//! - scale by s: `dx = s * dy`
//! - silu(x) = x·σ(x): `dx = dy * σ(x) * (1 + x * (1 - σ(x)))`

pub mod reference {
    pub fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().enumerate().map(|(i, x)| x + b[i % b.len()]).collect()
    }
    pub fn mul(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().enumerate().map(|(i, x)| x * b[i % b.len()]).collect()
    }
    pub fn scale(a: &[f64], s: f64) -> Vec<f64> {
        a.iter().map(|x| x * s).collect()
    }
    pub fn silu(a: &[f64]) -> Vec<f64> {
        a.iter().map(|&x| x / (1.0 + (-x).exp())).collect()
    }
}

pub mod cpu {
    use rayon::prelude::*;

    const CHUNK: usize = 1 << 14;

    /// `f(a[i], b[i % b.len()])` for every i; `a.len()` must be a multiple of `b.len()`.
    pub fn broadcast_new(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
        if b.len() == a.len() {
            return a.par_iter().with_min_len(CHUNK).zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect();
        }
        let mut out = vec![0.0f32; a.len()];
        if !out.is_empty() {
            broadcast(a, b, &mut out, f);
        }
        out
    }

    /// `f(a[i])` for every i, into a new vector.
    pub fn map_new(a: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
        a.par_iter().with_min_len(CHUNK).map(|&x| f(x)).collect()
    }

    /// `out[i] = f(a[i], b[i % b.len()])`; `a.len()` must be a multiple of `b.len()`.
    pub fn broadcast(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
        let nb = b.len();
        if nb == a.len() {
            out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = f(*a, *b);
                }
            });
        } else {
            let rows = (CHUNK / nb.max(1)).max(1) * nb;
            out.par_chunks_mut(rows).zip(a.par_chunks(rows)).for_each(|(o, a)| {
                for (o, a) in o.chunks_mut(nb).zip(a.chunks(nb)) {
                    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                        *o = f(*a, *b);
                    }
                }
            });
        }
    }

    /// Sums `a` (a multiple of `n` long) over its rows of length n: the backward of a broadcast.
    pub fn sum_rows_into(a: &[f32], n: usize) -> Vec<f32> {
        let rows = (CHUNK / n.max(1)).max(1) * n;
        a.par_chunks(rows)
            .map(|block| {
                let mut acc = vec![0.0f32; n];
                for row in block.chunks(n) {
                    for (s, v) in acc.iter_mut().zip(row) {
                        *s += v;
                    }
                }
                acc
            })
            .reduce(
                || vec![0.0f32; n],
                |mut x, y| {
                    for (a, b) in x.iter_mut().zip(y) {
                        *a += b;
                    }
                    x
                },
            )
    }

    pub fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + crate::kernels::math::exp(-x))
    }

    pub fn silu(x: f32) -> f32 {
        x * sigmoid(x)
    }

    /// d silu(x) / dx.
    pub fn silu_grad(x: f32) -> f32 {
        let s = sigmoid(x);
        s * (1.0 + x * (1.0 - s))
    }
}
