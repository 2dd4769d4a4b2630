//! Rotary position embedding in the Hugging Face `rotate_half` convention: element i of a head
//! pairs with element i + D/2. For a token at position p and `f_i = p * inv_freq[i]`
//! (i < D/2):
//!
//!   y[i]       = x[i] * cos f_i - x[i + D/2] * sin f_i
//!   y[i + D/2] = x[i + D/2] * cos f_i + x[i] * sin f_i
//!
//! Backward is the transposed rotation:
//!   dx[i]       =  dy[i] * cos f_i + dy[i + D/2] * sin f_i
//!   dx[i + D/2] = -dy[i] * sin f_i + dy[i + D/2] * cos f_i
//!
//! Layout: x `[tokens, heads, D]` row-major; positions `[tokens]` (i32); inv_freq `[D/2]` f32.
//! Angles are computed as f32 `p * inv_freq[i]` and f32 cos/sin, as transformers does.

/// Whether a pass rotates forward (the forward op) or backward (its gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

pub mod reference {
    use super::Direction;

    pub fn rope(x: &[f64], positions: &[i32], inv_freq: &[f32], heads: usize, dir: Direction) -> Vec<f64> {
        let half = inv_freq.len();
        let d = 2 * half;
        let sign = if dir == Direction::Forward { 1.0 } else { -1.0 };
        let mut y = vec![0.0; x.len()];
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let base = (t * heads + h) * d;
                for i in 0..half {
                    let f = (p as f64) * inv_freq[i] as f64;
                    let (s, c) = (sign * f.sin(), f.cos());
                    let (a, b) = (x[base + i], x[base + i + half]);
                    y[base + i] = a * c - b * s;
                    y[base + i + half] = b * c + a * s;
                }
            }
        }
        y
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use super::Direction;

    pub fn rope(x: &[f32], y: &mut [f32], positions: &[i32], inv_freq: &[f32], heads: usize, dir: Direction) {
        let half = inv_freq.len();
        let d = 2 * half;
        let row = heads * d;
        y.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions.par_iter()).for_each(|((y, x), &p)| {
            // cos/sin once per token, shared by its heads.
            let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
            for i in 0..half {
                let f = p as f32 * inv_freq[i];
                cos[i] = f.cos();
                sin[i] = if dir == Direction::Forward { f.sin() } else { -f.sin() };
            }
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    y[i] = a * cos[i] - b * sin[i];
                    y[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
    }
}
