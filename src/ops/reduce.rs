use crate::kernels::reduce::cpu;
use crate::ops::{expect_dtype, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Sum of all elements, as a one-element tensor of shape `[]`. Backward: `dx = dy` everywhere.
pub fn sum(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "sum";
    expect_dtype(OP, x, DType::F32)?;
    let out = match x.device() {
        Device::Cpu => Tensor::from_vec(vec![cpu::sum(x.cpu_f32(OP)?)], Vec::new())?,
        d => return Err(Error::Unsupported { op: OP, device: d }),
    };
    let shape = x.shape().clone();
    record(OP, out, &[x], move |g, _| {
        let dy = g.to_device(&Device::Cpu)?.to_scalar()?;
        Ok(vec![Some(Tensor::full(dy, shape, &g.device())?)])
    })
}

/// Mean of all elements. Backward: `dx = dy / count`.
pub fn mean(x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    if n == 0 {
        return Err(Error::BadShape { op: "mean", shape: x.shape().clone(), expected: "at least one element".into() });
    }
    crate::ops::scale(&sum(x)?, 1.0 / n as f32)
}

/// Softmax over the last axis. Backward: `dx = y * (dy - sum_j dy_j y_j)` per row.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "softmax";
    expect_dtype(OP, x, DType::F32)?;
    let n = x.shape().last();
    let out = match x.device() {
        Device::Cpu => {
            let mut y = vec![0.0f32; x.elem_count()];
            if n > 0 {
                cpu::softmax(x.cpu_f32(OP)?, &mut y, n);
            }
            Tensor::from_vec(y, x.shape().clone())?
        }
        d => return Err(Error::Unsupported { op: OP, device: d }),
    };
    let sy = saved(&out);
    record(OP, out, &[x], move |g, _| {
        let mut dx = vec![0.0f32; sy.elem_count()];
        if n > 0 {
            cpu::softmax_backward(sy.cpu_f32(OP)?, g.cpu_f32(OP)?, &mut dx, n);
        }
        Ok(vec![Some(Tensor::from_vec(dx, sy.shape().clone())?)])
    })
}
