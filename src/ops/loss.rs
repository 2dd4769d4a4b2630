//! Losses: cross-entropy from logits, and fused with the final projection so the logits are
//! never held in full.

use crate::kernels::cross_entropy::{self as ce, LinearCeParams};
use crate::kernels::elementwise::wgsl as ew;
use crate::ops::gpu::{wgpu_buf, wgpu_output};
use crate::ops::{expect_dtype, expect_weight_dtype, same_device, saved, scale};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Mean cross-entropy of `logits [M, V]` against `targets [M]` (i32), skipping rows whose
/// target is `ignore_index`; see `kernels::cross_entropy` for the math and the backward.
/// Returns a one-element tensor (0 when every row is ignored).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i32) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    same_device(OP, logits, targets)?;
    expect_dtype(OP, logits, DType::F32)?;
    expect_dtype(OP, targets, DType::I32)?;
    if logits.shape().rank() != 2 || targets.dims() != [logits.dims()[0]] {
        return Err(Error::ShapeMismatch { op: "cross_entropy (logits [M, V] vs targets [M])", lhs: logits.shape().clone(), rhs: targets.shape().clone() });
    }
    let v = logits.dims()[1];
    let (out, probs, count) = match logits.device() {
        Device::Cpu => {
            let t = targets.cpu_i32(OP)?;
            ce::check_targets(t, v, ignore_index)?;
            let mut probs = vec![0.0f32; logits.elem_count()];
            let (loss, count) = ce::cpu::forward(logits.cpu_f32(OP)?, t, &mut probs, v, ignore_index);
            (Tensor::from_vec(vec![loss], Vec::new())?, probs, count)
        }
        // On the device: each row's log-sum-exp is kept for the backward, which writes dz
        // from it and the device scalar dy. Only the targets ([M] ids) are read on the host, to
        // check them and count the rows.
        Device::Wgpu(_) => {
            let tv = targets.to_device(&Device::Cpu)?.to_vec::<i32>()?;
            ce::check_targets(&tv, v, ignore_index)?;
            let m = logits.dims()[0];
            let p = ce::wgsl::CeParams { rows: m, vocab: v, ignore_index, count: tv.iter().filter(|&&t| t != ignore_index).count() };
            let (rt, zb) = wgpu_buf(logits);
            let (lse, row_loss) = (rt.alloc(4 * m), rt.alloc(4 * m));
            let loss = wgpu_output(OP, rt, Vec::new(), DType::F32)?;
            ce::wgsl::forward(&rt.device, &rt.queue, &rt.kernels, zb, wgpu_buf(targets).1, lse.buffer(), row_loss.buffer(), wgpu_buf(&loss).1, p)?;
            let (sz, st) = (saved(logits), saved(targets));
            return record(OP, loss, &[logits, targets], move |g, _| {
                let (rt, zb) = wgpu_buf(&sz);
                let dz = wgpu_output("cross_entropy (backward: d logits)", rt, sz.shape().clone(), DType::F32)?;
                ce::wgsl::backward(&rt.device, &rt.queue, &rt.kernels, zb, wgpu_buf(&st).1, lse.buffer(), wgpu_buf(g).1, wgpu_buf(&dz).1, p)?;
                Ok(vec![Some(dz), None])
            });
        }
        // On CUDA: the forward writes the gradient for dy = 1 into a copy of the logits (when
        // they are tracked); the backward scales it by dy on the device.
        Device::Cuda(_) => {
            use crate::ops::cuda::{cuda_buf, view, CudaOut};
            let tv = targets.to_device(&Device::Cpu)?.to_vec::<i32>()?;
            ce::check_targets(&tv, v, ignore_index)?;
            let (m, count) = (logits.dims()[0], tv.iter().filter(|&&t| t != ignore_index).count());
            let inv_count = if count == 0 { 0.0 } else { 1.0 / count as f32 };
            let rt = cuda_buf(logits).0;
            let grad = logits.is_tracked();
            // The kernel overwrites z with the gradient, so it runs on a copy (read alone when
            // nothing is tracked).
            let mut z = CudaOut::copy_of(logits)?;
            // Not zeroed: `ce_rows` writes every row's loss, `ce_sum` the total.
            let mut row_loss = CudaOut::uninit(rt, [m], DType::F32)?;
            let mut loss = CudaOut::uninit(rt, Vec::new(), DType::F32)?;
            ce::cuda::rows::<f32>(&rt.stream, &rt.modules, &mut z.view_mut(), &view(targets), &mut row_loss.view_mut(), (m, v), ignore_index, inv_count, grad)?;
            ce::cuda::sum(&rt.stream, &rt.modules, &view(&row_loss.tensor()), &mut loss.view_mut(), inv_count)?;
            let dz = grad.then(|| z.tensor());
            return record(OP, loss.tensor(), &[logits, targets], move |g, _| Ok(vec![dz.as_ref().map(|d| times(d, g)).transpose()?, None]));
        }
    };
    let (st, shape) = (saved(targets), logits.shape().clone());
    record(OP, out, &[logits, targets], move |g, _| {
        let dy = g.to_scalar()?;
        let mut dz = vec![0.0f32; probs.len()];
        ce::cpu::backward(&probs, st.cpu_i32(OP)?, &mut dz, v, ignore_index, count, dy);
        Ok(vec![Some(Tensor::from_vec(dz, shape)?), None])
    })
}

/// `cross_entropy(matmul(x, w, false, true), targets, ignore_index)` without the `[M, V]`
/// logits: x `[M, H]`, w `[V, H]` (the LM head, or the tied embedding table), targets `[M]`.
/// The logits are made `chunk_rows` rows at a time (`None`: about 128 MiB of them, see
/// `kernels::cross_entropy::default_chunk_rows`), and the gradients of x and of a trained w
/// are finished in the same pass, so the backward only scales them by dy (see
/// `kernels::cross_entropy`). With nothing tracked (evaluation) only the loss is computed.
/// `targets` may be on x's device or on the CPU (better on a GPU: no download to check them).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor, ignore_index: i32, chunk_rows: Option<usize>) -> Result<Tensor> {
    const OP: &str = "linear_cross_entropy";
    same_device(OP, x, w)?;
    // The targets may be on x's device or on the CPU: they are checked and counted on the host
    // either way, so host targets save a download (a wait for the forward) on a GPU.
    if targets.device() != Device::Cpu {
        same_device(OP, x, targets)?;
    }
    let dt = crate::ops::gpu::float_dtype(OP, x)?;
    expect_weight_dtype(OP, w, dt)?;
    expect_dtype(OP, targets, DType::I32)?;
    if x.shape().rank() != 2 || w.shape().rank() != 2 || x.dims()[1] != w.dims()[1] {
        return Err(Error::ShapeMismatch { op: "linear_cross_entropy (x [M, H] vs w [V, H])", lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    if targets.dims() != [x.dims()[0]] {
        return Err(Error::ShapeMismatch { op: "linear_cross_entropy (x [M, H] vs targets [M])", lhs: x.shape().clone(), rhs: targets.shape().clone() });
    }
    let (m, h, v) = (x.dims()[0], x.dims()[1], w.dims()[0]);
    if chunk_rows == Some(0) {
        return Err(Error::InvalidArgument(format!("{OP}: chunk_rows must be at least 1")));
    }
    let p = LinearCeParams { rows: m, hidden: h, vocab: v, ignore_index, chunk_rows: chunk_rows.unwrap_or_else(|| ce::default_chunk_rows(m, v)) };
    let (need_dx, need_dw) = (x.is_tracked(), w.is_tracked());
    let (loss, dx, dw) = match x.device() {
        Device::Cpu => {
            let t = targets.cpu_i32(OP)?;
            ce::check_targets(t, v, ignore_index)?;
            let mut dx = need_dx.then(|| vec![0.0f32; m * h]);
            let mut dw = need_dw.then(|| vec![0.0f32; v * h]);
            // A frozen head is read through its transpose, like `matmul` reads it: made and
            // kept when training (`Tensor::cpu_f32_for_xwt`). A bf16 head is widened a block
            // at a time.
            let (wt, wf);
            let head = match w.cpu_bf16() {
                Some(wb) => ce::cpu::Head::Bf16(wb),
                None => {
                    wt = match need_dw {
                        true => None,
                        false => Some(w.cpu_f32_for_xwt(OP, m, need_dx)?).filter(|t| t.1).map(|t| t.0),
                    };
                    wf = w.cpu_f32_weight(OP)?;
                    ce::cpu::Head::F32 { w: &wf, wt: wt.as_deref() }
                }
            };
            let (loss, _) = ce::cpu::linear_forward(x.cpu_f32(OP)?, head, t, dx.as_deref_mut(), dw.as_deref_mut(), p)?;
            let dx = dx.map(|d| Tensor::from_vec(d, [m, h])).transpose()?;
            let dw = dw.map(|d| Tensor::from_vec(d, [v, h])).transpose()?;
            (Tensor::from_vec(vec![loss], Vec::new())?, dx, dw)
        }
        Device::Wgpu(_) if w.dtype() == dt => {
            // In f16, dx and dW are made in f32 and converted to f16 in the backward.
            let (tv, targets) = host_and_device(targets, x.device())?;
            ce::check_targets(&tv, v, ignore_index)?;
            let count = tv.iter().filter(|&&t| t != ignore_index).count();
            let (rt, xb) = wgpu_buf(x);
            let loss = wgpu_output(OP, rt, Vec::new(), DType::F32)?;
            let dx = need_dx.then(|| wgpu_output("linear_cross_entropy (dx)", rt, [m, h], DType::F32)).transpose()?;
            let dw = need_dw.then(|| wgpu_output("linear_cross_entropy (dW)", rt, [v, h], DType::F32)).transpose()?;
            let (dxb, dwb) = (dx.as_ref().map(|t| wgpu_buf(t).1), dw.as_ref().map(|t| wgpu_buf(t).1));
            let pr = crate::ops::gpu::wgpu_precision(dt).expect("f32 or f16");
            ce::wgsl::linear_forward(rt, xb, wgpu_buf(w).1, wgpu_buf(&targets).1, dxb, dwb, wgpu_buf(&loss).1, count, p, pr)?;
            (loss, dx, dw)
        }
        Device::Cuda(_) => {
            use crate::ops::cuda::{cuda_buf, half, view, CudaOut};
            let hdt = half(OP, dt)?;
            let (tv, targets) = host_and_device(targets, x.device())?;
            ce::check_targets(&tv, v, ignore_index)?;
            let count = tv.iter().filter(|&&t| t != ignore_index).count();
            let rt = cuda_buf(x).0;
            // Not zeroed: the loss is written by `ce_sum`, and dx chunk by chunk by a GEMM
            // that writes its rows whole.
            let mut loss = CudaOut::uninit(rt, Vec::new(), DType::F32)?;
            let mut dx = need_dx.then(|| CudaOut::uninit(rt, [m, h], dt)).transpose()?;
            // dW is summed in f32 over the chunks (from zeros) and rounded to W's dtype once.
            // Each chunk reads and writes all of it ([V, H] f32: 1 GiB for Llama-3's head), so a
            // trained head takes chunks 8x the default (~1 GiB of logits, and on Hopper their
            // transpose) unless the caller chose.
            let mut p = p;
            if need_dw && chunk_rows.is_none() {
                p.chunk_rows = p.chunk_rows.saturating_mul(8);
            }
            let mut dw = need_dw.then(|| CudaOut::new(rt, [v, h], DType::F32)).transpose()?;
            {
                let mut dxv = dx.as_mut().map(|d| d.view_mut());
                let mut dwv = dw.as_mut().map(|d| d.view_mut());
                ce::cuda::linear_forward(&rt.stream, &rt.modules, hdt, &view(x), &view(w), &view(&targets), dxv.as_mut(), dwv.as_mut(), &mut loss.view_mut(), count, p)?;
            }
            (loss.tensor(), dx.map(|d| d.tensor()), dw.map(|d| d.tensor()))
        }
        d => return Err(Error::Unsupported { op: OP, device: d }),
    };
    // dx and dW come in x's and w's dtypes (on wgpu in f16 they were made in f32, so the
    // scaling by dy, which may carry a loss scale, happens before the rounding to f16).
    let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
    record(OP, loss, &[x, w, targets], move |g, _| {
        Ok(vec![dx.map(|d| times(&d, g)?.to_dtype(x_dtype)).transpose()?, dw.map(|d| times(&d, g)?.to_dtype(w_dtype)).transpose()?, None])
    })
}

/// The targets' values on the host and the targets on `dev` (one copy, whichever way).
fn host_and_device(targets: &Tensor, dev: Device) -> Result<(Vec<i32>, Tensor)> {
    let host = targets.to_device(&Device::Cpu)?.to_vec::<i32>()?;
    let on_dev = if targets.device() == dev { targets.clone() } else { Tensor::from_vec_i32(host.clone(), targets.shape().clone())?.to_device(&dev)? };
    Ok((host, on_dev))
}

/// `d · g` for a one-element `g` on d's device (read on the host only on the CPU).
fn times(d: &Tensor, g: &Tensor) -> Result<Tensor> {
    match d.device() {
        Device::Wgpu(_) => {
            let (rt, db) = wgpu_buf(d);
            let y = wgpu_output("cross_entropy (backward)", rt, d.shape().clone(), DType::F32)?;
            ew::scale_by(&rt.device, &rt.queue, &rt.kernels, db, wgpu_buf(g).1, wgpu_buf(&y).1, d.elem_count())?;
            Ok(y)
        }
        Device::Cuda(_) => {
            use crate::ops::cuda::{by_float, cuda_buf, view, CudaOut};
            crate::ops::expect_dtype("loss gradient", g, DType::F32)?;
            let rt = cuda_buf(d).0;
            let mut y = CudaOut::uninit(rt, d.shape().clone(), d.dtype())?;
            by_float!(d.dtype(), T => crate::kernels::elementwise::cuda::scale_by::<T>(&rt.stream, &rt.modules, &view(d), &view(g), &mut y.view_mut())?);
            Ok(y.tensor())
        }
        _ => scale(d, g.to_scalar()?),
    }
}
