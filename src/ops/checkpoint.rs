//! Activation checkpointing: `f(inputs)` computed without keeping its intermediates, and
//! computed again in the backward.
//!
//! Forward: `f` runs on detached copies of the inputs, so none of its ops are recorded and its
//! activations are freed as soon as it returns; one tape entry is recorded for the whole call,
//! holding only the inputs. Backward: `f` runs again on a fresh inner tape with the tracked
//! inputs as that tape's parameters, and the inner tape is replayed from the output with the
//! incoming gradient as its seed (`Tape::backward_from`), giving each input's gradient. The
//! same ops run in the same order on the same values, so the gradients equal those without
//! checkpointing bit for bit; `f` must be deterministic (dropout from a seed is).

use std::sync::Arc;

use crate::ops::saved;
use crate::tape::record_many;
use crate::{Error, Result, Tape, Tensor};

/// `f(inputs)`, recomputed in the backward instead of stored. Every tensor `f` reads that may
/// need a gradient must be among `inputs` (tensors it captures get none).
pub fn checkpoint(inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| saved(t)).collect();
    let out = f(&detached)?;
    let f = Arc::new(f);
    let mut outs = record_many("checkpoint", vec![out], inputs, move |gs, needs| {
        let Some(g) = &gs[0] else { return Ok(vec![None; needs.len()]) };
        let tape = Tape::new();
        let ins: Vec<Tensor> = detached.iter().zip(needs).map(|(t, &n)| if n { tape.param(t) } else { t.clone() }).collect();
        let out = f(&ins)?;
        if out.shape() != g.shape() {
            return Err(Error::Tape(format!("checkpoint: the recomputed output is {} but its gradient is {}", out.shape(), g.shape())));
        }
        let grads = tape.backward_from(&out, g)?;
        Ok(ins.iter().zip(needs).map(|(t, &n)| if n { grads.get(t).cloned() } else { None }).collect())
    })?;
    Ok(outs.remove(0))
}
