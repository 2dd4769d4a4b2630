use crate::kernels::elementwise::{cpu, cuda as ew_cuda, wgsl, GluAct, GluParams};
use crate::ops::cuda::{by_float, cuda_buf, view, CudaOut};
use crate::ops::gpu::{WGPU_FLOAT, float_dtype, forward_only, wgpu_buf, wgpu_output, wgpu_precision};
use crate::ops::{expect_dtype, same_device, same_dtype, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Checks that `b`'s shape is a suffix of `a`'s (b broadcasts over a's leading dims) and that
/// both have one dtype the device runs.
fn check_broadcast(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    same_device(op, a, b)?;
    same_dtype(op, a, b)?;
    float_dtype(op, a)?;
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
        // `add`'s backward is device-agnostic (dy passes through; a broadcast b sums on the
        // CPU), so only a broadcast b is refused for training.
        Device::Wgpu(_) if op == "add" => {
            if b.shape() != a.shape() {
                forward_only(op, &[b])?;
            }
            let (rt, ab) = wgpu_buf(a);
            let y = wgpu_output(op, rt, a.shape().clone(), a.dtype())?;
            let pr = wgpu_precision(a.dtype()).expect("checked by check_broadcast");
            wgsl::add(&rt.device, &rt.queue, &rt.kernels, ab, wgpu_buf(b).1, wgpu_buf(&y).1, a.elem_count(), b.elem_count(), pr)?;
            Ok(y)
        }
        Device::Cuda(_) if op == "add" => {
            if b.shape() != a.shape() {
                forward_only(op, &[b])?;
            }
            let rt = cuda_buf(a).0;
            let mut y = CudaOut::uninit(rt, a.shape().clone(), a.dtype())?;
            by_float!(a.dtype(), T => ew_cuda::add::<T>(&rt.stream, &rt.modules, &view(a), &view(b), &mut y.view_mut())?);
            Ok(y.tensor())
        }
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
    let out = match a.device() {
        Device::Wgpu(_) => {
            let dt = float_dtype("scale", a)?;
            let (rt, ab) = wgpu_buf(a);
            let y = wgpu_output("scale", rt, a.shape().clone(), dt)?;
            let pr = wgpu_precision(dt).expect(WGPU_FLOAT);
            wgsl::scale(&rt.device, &rt.queue, &rt.kernels, ab, wgpu_buf(&y).1, a.elem_count(), s, pr)?;
            y
        }
        Device::Cuda(_) => {
            let dt = float_dtype("scale", a)?;
            let rt = cuda_buf(a).0;
            let mut y = CudaOut::uninit(rt, a.shape().clone(), dt)?;
            by_float!(dt, T => ew_cuda::scale::<T>(&rt.stream, &rt.modules, &view(a), &mut y.view_mut(), s)?);
            y.tensor()
        }
        _ => unary("scale", a, |x| x * s)?,
    };
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

/// The SwiGLU of a Llama MLP, fused: `silu(g) * u` ([`glu`] with SiLU).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    glu(g, u, GluAct::Silu)
}

/// The gated linear unit of an MLP, fused: `act(g) * u`, g and u `[..., F]` of one shape;
/// SwiGLU (Llama) or GeGLU with the tanh GELU (Gemma). Backward (`kernels::elementwise`):
/// `dg = dy * u * act'(g)`, `du = dy * act(g)`.
pub fn glu(g: &Tensor, u: &Tensor, act: GluAct) -> Result<Tensor> {
    const OP: &str = "glu";
    same_device(OP, g, u)?;
    same_dtype(OP, g, u)?;
    let dt = float_dtype(OP, g)?;
    let pr = wgpu_precision(dt);
    if g.shape() != u.shape() || g.shape().rank() == 0 {
        return Err(Error::ShapeMismatch { op: "glu (g and u of one shape)", lhs: g.shape().clone(), rhs: u.shape().clone() });
    }
    let p = GluParams { rows: g.shape().rows(), cols: g.shape().last(), act };
    let out = match g.device() {
        Device::Cpu => {
            let mut y = vec![0.0f32; g.elem_count()];
            cpu::glu(g.cpu_f32(OP)?, u.cpu_f32(OP)?, &mut y, p)?;
            Tensor::from_vec(y, g.shape().clone())?
        }
        Device::Wgpu(_) => {
            let (rt, gb) = wgpu_buf(g);
            let y = wgpu_output(OP, rt, g.shape().clone(), dt)?;
            wgsl::forward(&rt.device, &rt.queue, &rt.kernels, gb, wgpu_buf(u).1, wgpu_buf(&y).1, p, pr.expect(WGPU_FLOAT))?;
            y
        }
        Device::Cuda(_) => {
            let rt = cuda_buf(g).0;
            let mut y = CudaOut::uninit(rt, g.shape().clone(), dt)?;
            by_float!(dt, T => ew_cuda::forward::<T>(&rt.stream, &rt.modules, &view(g), &view(u), &mut y.view_mut(), p)?);
            y.tensor()
        }
    };
    let (sg, su) = (saved(g), saved(u));
    record(OP, out, &[g, u], move |dy, _| {
        if let Device::Wgpu(_) = sg.device() {
            let (rt, gb) = wgpu_buf(&sg);
            let (dg, du) = (wgpu_output("glu (backward)", rt, sg.shape().clone(), dt)?, wgpu_output("glu (backward)", rt, su.shape().clone(), dt)?);
            wgsl::backward(&rt.device, &rt.queue, &rt.kernels, gb, wgpu_buf(&su).1, wgpu_buf(dy).1, wgpu_buf(&dg).1, wgpu_buf(&du).1, p, pr.expect(WGPU_FLOAT))?;
            return Ok(vec![Some(dg), Some(du)]);
        }
        if let Device::Cuda(_) = sg.device() {
            let rt = cuda_buf(&sg).0;
            let (mut dg, mut du) = (CudaOut::uninit(rt, sg.shape().clone(), dt)?, CudaOut::uninit(rt, su.shape().clone(), dt)?);
            by_float!(dt, T => ew_cuda::backward::<T>(&rt.stream, &rt.modules, &view(&sg), &view(&su), &view(dy), &mut dg.view_mut(), &mut du.view_mut(), p)?);
            return Ok(vec![Some(dg.tensor()), Some(du.tensor())]);
        }
        let (mut dg, mut du) = (vec![0.0f32; sg.elem_count()], vec![0.0f32; su.elem_count()]);
        cpu::glu_backward(sg.cpu_f32(OP)?, su.cpu_f32(OP)?, dy.cpu_f32(OP)?, &mut dg, &mut du, p)?;
        Ok(vec![Some(Tensor::from_vec(dg, sg.shape().clone())?), Some(Tensor::from_vec(du, su.shape().clone())?)])
    })
}
