//! Reverse-mode autograd in few concepts: a tape of backward closures pushed at forward time,
//! replayed in reverse, accumulating gradients in a map keyed by tensor id.
//!
//! Only tensors that depend on a trainable parameter are recorded: an op records an entry
//! only when one of its inputs is tracked, so frozen weights and the activations computed from
//! them alone cost nothing on the tape. Each op's backward is written by hand next to its
//! forward (in `ops/`), and asks only for the input gradients that are needed.
//!
//! ```
//! use tuna::{ops, Device, Tape, Tensor};
//! let tape = Tape::new();
//! let w = tape.param(&Tensor::from_slice(&[1.0f32, 2.0, 3.0], [3], &Device::Cpu)?);
//! let loss = ops::sum(&ops::mul(&w, &w)?)?;
//! let grads = tape.backward(&loss)?;
//! assert_eq!(grads.get(&w).unwrap().to_vec::<f32>()?, vec![2.0, 4.0, 6.0]);
//! # Ok::<(), tuna::Error>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use crate::tensor::{Tensor, TensorId};
use crate::{ops, Device, Error, Result};

/// The gradients of an op's outputs in (`None` for an output the loss does not depend on),
/// one optional gradient per input out (`None` where the input needs none).
pub(crate) type BackwardFn = Box<dyn FnOnce(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + Send>;

struct Entry {
    outputs: Vec<TensorId>,
    inputs: Vec<TensorId>,
    backward: BackwardFn,
}

pub(crate) struct TapeInner {
    entries: Mutex<Vec<Entry>>,
    params: Mutex<HashSet<TensorId>>,
}

/// A recording of the ops that depend on trainable parameters. See the module docs.
#[derive(Clone)]
pub struct Tape(Arc<TapeInner>);

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    pub fn new() -> Self {
        Tape(Arc::new(TapeInner { entries: Mutex::new(Vec::new()), params: Mutex::new(HashSet::new()) }))
    }

    /// A handle to `t` (same storage) that is a trainable parameter on this tape.
    pub fn param(&self, t: &Tensor) -> Tensor {
        let p = t.share(t.shape().clone(), Some(Arc::downgrade(&self.0)));
        self.0.params.lock().expect("tape poisoned").insert(p.id());
        p
    }

    /// Number of recorded entries (for tests and for memory accounting).
    pub fn len(&self) -> usize {
        self.0.entries.lock().expect("tape poisoned").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replays the tape from a one-element `loss`, returning the gradients of every parameter
    /// the loss depends on. The entries are consumed, so the tape is ready for the next step.
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        if loss.elem_count() != 1 {
            return Err(Error::Tape(format!("backward needs a one-element loss, got shape {}", loss.shape())));
        }
        self.backward_from(loss, &Tensor::full(1.0, loss.shape().clone(), &loss.device())?)
    }

    /// Replays the tape from `output` with `seed` as its gradient (a vector-Jacobian product):
    /// what an op recomputed on an inner tape (`ops::checkpoint`) uses to pass on the gradient
    /// it was given.
    pub fn backward_from(&self, output: &Tensor, seed: &Tensor) -> Result<Gradients> {
        if seed.shape() != output.shape() {
            return Err(Error::ShapeMismatch { op: "backward_from (seed vs output)", lhs: seed.shape().clone(), rhs: output.shape().clone() });
        }
        // On the CPU the backward ops run on a rayon worker (see `device::cpu::on_pool`).
        if output.device() == Device::Cpu {
            crate::device::cpu::on_pool(|| self.replay(output, seed))
        } else {
            self.replay(output, seed)
        }
    }

    fn replay(&self, output: &Tensor, seed: &Tensor) -> Result<Gradients> {
        let entries = std::mem::take(&mut *self.0.entries.lock().expect("tape poisoned"));
        let params = self.0.params.lock().expect("tape poisoned").clone();
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        if !output.is_tracked() {
            return Ok(Gradients(grads));
        }
        grads.insert(output.id(), seed.clone());
        for entry in entries.into_iter().rev() {
            // Every consumer of an entry's outputs was recorded after it, so their gradients are
            // complete here. Outputs the loss does not depend on have none; an entry with none at
            // all is skipped. Outputs are never parameters, so their gradients can be dropped.
            let gs: Vec<Option<Tensor>> = entry.outputs.iter().map(|id| grads.remove(id)).collect();
            if gs.iter().all(Option::is_none) {
                continue;
            }
            let input_grads = (entry.backward)(&gs)?;
            for (id, ig) in entry.inputs.into_iter().zip(input_grads) {
                if let Some(ig) = ig {
                    accumulate(&mut grads, id, ig)?;
                }
            }
        }
        grads.retain(|id, _| params.contains(id));
        Ok(Gradients(grads))
    }
}

fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    let sum = match grads.remove(&id) {
        Some(prev) => ops::add(&prev, &g)?,
        None => g,
    };
    grads.insert(id, sum);
    Ok(())
}

/// Gradients of the parameters, keyed by tensor id.
#[derive(Debug)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    /// The gradient of a parameter (`None` when the loss does not depend on it).
    pub fn get(&self, param: &Tensor) -> Option<&Tensor> {
        self.0.get(&param.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The tape shared by the tracked tensors among `inputs`, if any; two different tapes are an
/// error.
pub(crate) fn tape_of(op: &'static str, inputs: &[&Tensor]) -> Result<Option<Arc<TapeInner>>> {
    let mut found: Option<Arc<TapeInner>> = None;
    for t in inputs {
        if let Some(tape) = t.0.tape.as_ref().and_then(Weak::upgrade) {
            match &found {
                Some(f) if !Arc::ptr_eq(f, &tape) => {
                    return Err(Error::Tape(format!("{op}: inputs are recorded on two different tapes")))
                }
                _ => found = Some(tape),
            }
        }
    }
    Ok(found)
}

/// Records `out` (computed from `inputs`) with its backward when any input is tracked, and
/// returns the tensor to hand to the caller: tracked if recorded, `out` itself otherwise.
/// `backward` receives the output gradient and which inputs need a gradient.
pub(crate) fn record(
    op: &'static str,
    out: Tensor,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + 'static,
) -> Result<Tensor> {
    let mut outs = record_many(op, vec![out], inputs, move |gs, needs| {
        backward(gs[0].as_ref().expect("a single-output entry runs only with its gradient"), needs)
    })?;
    Ok(outs.remove(0))
}

/// `record` for an op with several outputs: one entry, whose backward receives one optional
/// gradient per output (`None`: the loss does not depend on that output).
pub(crate) fn record_many(
    op: &'static str,
    outs: Vec<Tensor>,
    inputs: &[&Tensor],
    backward: impl FnOnce(&[Option<Tensor>], &[bool]) -> Result<Vec<Option<Tensor>>> + Send + 'static,
) -> Result<Vec<Tensor>> {
    let Some(tape) = tape_of(op, inputs)? else { return Ok(outs) };
    let needs: Vec<bool> = inputs.iter().map(|t| t.is_tracked()).collect();
    let tracked: Vec<Tensor> = outs.iter().map(|o| o.share(o.shape().clone(), Some(Arc::downgrade(&tape)))).collect();
    let entry = Entry {
        outputs: tracked.iter().map(Tensor::id).collect(),
        inputs: inputs.iter().map(|t| t.id()).collect(),
        backward: Box::new(move |gs| backward(gs, &needs)),
    };
    tape.entries.lock().expect("tape poisoned").push(entry);
    Ok(tracked)
}
