use crate::kernels::elementwise::cpu;
use crate::ops::{expect_dtype, same_device, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Checks that `b`'s shape is a suffix of `a`'s (b broadcasts over a's leading dims).
fn check_broadcast(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    same_device(op, a, b)?;
    expect_dtype(op, a, DType::F32)?;
    expect_dtype(op, b, DType::F32)?;
    let (ad, bd) = (a.dims(), b.dims());
    if bd.len() > ad.len() || ad[ad.len() - bd.len()..] != *bd {
        return Err(Error::ShapeMismatch { op, lhs: a.shape().clone(), rhs: b.shape().clone() });
    }
    Ok(())
}

fn binary(op: &'static str, a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Result<Tensor> {
    check_broadcast(op, a, b)?;
    match a.device() {
        Device::Cpu => Tensor::from_vec(cpu::broadcast_new(a.cpu_f32(op)?, b.cpu_f32(op)?, f), a.shape().clone()),
        d => Err(Error::Unsupported { op, device: d }),
    }
}

/// Reduces a gradient of `a`'s shape to `b`'s shape (sum over the broadcast dims).
fn unbroadcast(g: &Tensor, b_shape: &crate::Shape) -> Result<Tensor> {
    if g.shape() == b_shape {
        return Ok(g.clone());
    }
    let summed = cpu::sum_rows_into(g.cpu_f32("broadcast backward")?, b_shape.elem_count());
    Tensor::from_vec(summed, b_shape.clone())
}

/// `a + b`, with b broadcast over a's leading dims (b's shape a suffix of a's).
/// Backward: `da = dy`, `db = dy` summed over the broadcast dims.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = binary("add", a, b, |x, y| x + y)?;
    let b_shape = b.shape().clone();
    record("add", out, &[a, b], move |g, needs| {
        let db = if needs[1] { Some(unbroadcast(g, &b_shape)?) } else { None };
        Ok(vec![needs[0].then(|| g.clone()), db])
    })
}

/// `a * b` element-wise, with b broadcast as in `add`.
/// Backward: `da = dy * b`, `db = dy * a` summed over the broadcast dims.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = binary("mul", a, b, |x, y| x * y)?;
    let (sa, sb) = (saved(a), saved(b));
    record("mul", out, &[a, b], move |g, needs| {
        let da = if needs[0] { Some(mul(g, &sb)?) } else { None };
        let db = if needs[1] { Some(unbroadcast(&mul(g, &sa)?, sb.shape())?) } else { None };
        Ok(vec![da, db])
    })
}

fn unary(op: &'static str, a: &Tensor, f: impl Fn(f32) -> f32 + Sync + Send) -> Result<Tensor> {
    expect_dtype(op, a, DType::F32)?;
    match a.device() {
        Device::Cpu => Tensor::from_vec(cpu::map_new(a.cpu_f32(op)?, f), a.shape().clone()),
        d => Err(Error::Unsupported { op, device: d }),
    }
}

/// `s * a`. Backward: `da = s * dy`.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    let out = unary("scale", a, |x| x * s)?;
    record("scale", out, &[a], move |g, _| Ok(vec![Some(scale(g, s)?)]))
}

/// `silu(x) = x * sigmoid(x)`. Backward: `dx = dy * sigmoid(x) * (1 + x * (1 - sigmoid(x)))`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let out = unary("silu", x, cpu::silu)?;
    let sx = saved(x);
    record("silu", out, &[x], move |g, _| {
        let local = unary("silu backward", &sx, cpu::silu_grad)?;
        Ok(vec![Some(mul(g, &local)?)])
    })
}
