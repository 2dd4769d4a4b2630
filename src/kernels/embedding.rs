//! Embedding gather: `y[t, :] = table[ids[t], :]`, table `[V, E]`, ids `[T]` (i32), y `[T, E]`.
//!
//! Backward (scatter-add): `dtable[v, :] = sum over t with ids[t] == v of dy[t, :]`; the ids
//! get no gradient.

use crate::{Error, Result};

/// Checks every id against the vocabulary size, naming the first bad one and its position.
pub fn check_ids(ids: &[i32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&i| i < 0 || i as usize >= vocab) {
        Some(pos) => Err(Error::IndexOutOfRange { op: "embedding", index: ids[pos] as i64, position: pos, bound: vocab }),
        None => Ok(()),
    }
}

pub mod reference {
    pub fn gather(table: &[f64], ids: &[i32], e: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(ids.len() * e);
        for &id in ids {
            out.extend_from_slice(&table[id as usize * e..(id as usize + 1) * e]);
        }
        out
    }
}

pub mod cpu {
    use rayon::prelude::*;

    /// Ids must have been checked with `check_ids`.
    pub fn gather(table: &[f32], ids: &[i32], out: &mut [f32], e: usize) {
        out.par_chunks_mut(e).zip(ids.par_iter()).for_each(|(o, &id)| {
            o.copy_from_slice(&table[id as usize * e..(id as usize + 1) * e]);
        });
    }

    /// Adds each row of dy into its id's row of dtable (sequential: ids repeat).
    pub fn scatter_add(dy: &[f32], ids: &[i32], dtable: &mut [f32], e: usize) {
        for (row, &id) in dy.chunks(e).zip(ids) {
            for (d, g) in dtable[id as usize * e..(id as usize + 1) * e].iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}
