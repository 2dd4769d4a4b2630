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

/// `x` with its elements converted to `dtype` (f32, f16, bf16; round to nearest even) on its
/// device (`Tensor::to_dtype`). Backward: the gradient converted back to x's dtype. The same
/// dtype is the identity (no copy, no tape entry). The seam of mixed precision: f32 master
/// weights cast to a half type for the math, their gradients cast back.
pub fn cast(x: &Tensor, dtype: crate::DType) -> Result<Tensor> {
    let from = x.dtype();
    if dtype == from {
        return Ok(x.clone());
    }
    let out = x.to_dtype(dtype)?;
    record("cast", out, &[x], move |g, _| Ok(vec![Some(g.to_dtype(from)?)]))
}
