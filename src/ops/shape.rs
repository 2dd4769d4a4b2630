use crate::tape::record;
use crate::{Error, Result, Shape, Tensor};

/// The same elements under another shape with the same count (no copy).
/// Backward: the gradient reshaped back.
pub fn reshape(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != x.elem_count() {
        return Err(Error::ShapeMismatch { op: "reshape", lhs: x.shape().clone(), rhs: shape });
    }
    let out = x.share(shape, None);
    let back = x.shape().clone();
    record("reshape", out, &[x], move |g, _| Ok(vec![Some(reshape(g, back)?)]))
}
