//! Launchers: one module per kernel family, each with the same sections:
//!
//! - `reference`: plain loops in f64, written to be read; the spec every other path is tested
//!   against and the function the gradient checks differentiate numerically;
//! - `cpu`: the fast CPU path (f32, rayon, the `gemm` crate);
//! - `cuda`: launchers over cudarc's native types (a stream, device slices);
//! - `wgsl`: launchers over wgpu's native types (a device, a queue, buffers).
//!
//! Launchers take no tuna tensors, so another program can call a tuna kernel with its own
//! cudarc stream or wgpu device. Families without a GPU kernel yet have only the first two.

pub mod attention;
pub mod cast;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod math;
pub mod matmul;
pub mod nf4;
pub mod optim;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod sparse;

use crate::{Error, Result};

/// Checks that a buffer named `what` holds at least `need` elements.
pub(crate) fn check_len(op: &'static str, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::InvalidArgument(format!("{op}: `{what}` holds {have} elements, needs {need}")));
    }
    Ok(())
}
