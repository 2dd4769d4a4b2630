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

/// Greedy decoding's pick in each row of `x` over its last axis: an i32 tensor of `x`'s shape
/// without that axis, on `x`'s device, not recorded. Per row the first index of the largest
/// number, NaNs skipped, 0 when the row's first value is NaN
/// ([`crate::kernels::cross_entropy::reference::argmax`]). On a GPU the pick is made there
/// (f32 and bf16 on CUDA, f32 on wgpu; other float types are widened first, exactly), so a
/// decoding step reads back one index a row instead of the vocabulary's logits.
pub fn argmax_last(x: &Tensor) -> Result<Tensor> {
    use crate::kernels::cross_entropy as ce;
    const OP: &str = "argmax_last";
    let Some((&v, rows)) = x.dims().split_last() else {
        return Err(Error::BadShape { op: OP, shape: x.shape().clone(), expected: "at least one axis".into() });
    };
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { op: OP, dtype: x.dtype() });
    }
    let (rows, m) = (rows.to_vec(), rows.iter().product::<usize>());
    match x.device() {
        Device::Cpu => {
            let z = x.to_vec_f32()?;
            let picks = (0..m).map(|r| crate::kernels::math::argmax(&z[r * v..(r + 1) * v]) as i32).collect();
            Tensor::from_vec_i32(picks, rows)
        }
        Device::Cuda(_) => {
            use crate::ops::cuda::{cuda_buf, view, CudaOut};
            let x = if matches!(x.dtype(), DType::F32 | DType::BF16) { x.clone() } else { x.to_dtype(DType::F32)? };
            let rt = cuda_buf(&x).0;
            let mut out = CudaOut::uninit(rt, rows, DType::I32)?;
            if x.dtype() == DType::F32 {
                ce::cuda::argmax_rows::<f32>(&rt.stream, &rt.modules, &view(&x), &mut out.view_mut(), (m, v))?;
            } else {
                ce::cuda::argmax_rows::<u16>(&rt.stream, &rt.modules, &view(&x), &mut out.view_mut(), (m, v))?;
            }
            Ok(out.tensor())
        }
        Device::Wgpu(_) => {
            use crate::ops::gpu::{wgpu_buf, wgpu_output};
            let x = if x.dtype() == DType::F32 { x.clone() } else { x.to_dtype(DType::F32)? };
            let (rt, zb) = wgpu_buf(&x);
            let out = wgpu_output(OP, rt, rows, DType::I32)?;
            ce::wgsl::argmax_rows(&rt.device, &rt.queue, &rt.kernels, zb, wgpu_buf(&out).1, (m, v))?;
            Ok(out)
        }
    }
}
