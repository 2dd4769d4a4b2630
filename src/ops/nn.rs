use cudarc::driver::CudaSlice;

use crate::device::cuda::CudaRuntime;
use crate::ops::cuda::{by_float, cuda_buf, view, CudaOut};
use crate::kernels::rmsnorm::{self, RmsNormParams};
use crate::kernels::embedding as emb;
use crate::ops::gpu::{WGPU_FLOAT, float_dtype, wgpu_buf, wgpu_output, wgpu_precision};
use crate::ops::{expect_dtype, same_device, same_dtype, saved};
use crate::tape::{record, record_many};
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Rows of `table[V, E]` picked by `ids` (i32, any shape): output `ids.shape + [E]`.
/// Backward: scatter-add of dy into the picked rows of dtable; ids get no gradient.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    same_device(OP, ids, table)?;
    expect_dtype(OP, ids, DType::I32)?;
    // A frozen bf16 table on the CPU (`Llama::matrices_in_bf16`) gives f32 rows.
    let dt = match table.cpu_bf16() {
        Some(_) if !table.is_tracked() => DType::F32,
        _ => float_dtype(OP, table)?,
    };
    let pr = wgpu_precision(dt);
    if table.shape().rank() != 2 {
        return Err(Error::BadShape { op: OP, shape: table.shape().clone(), expected: "a table [V, E]".into() });
    }
    let (v, e) = (table.dims()[0], table.dims()[1]);
    let mut out_shape = ids.dims().to_vec();
    out_shape.push(e);
    let out = match table.device() {
        Device::Cpu => {
            let idv = ids.cpu_i32(OP)?;
            emb::check_ids(idv, v)?;
            let mut y = vec![0.0f32; idv.len() * e];
            match table.cpu_bf16() {
                // A bf16 table (`Llama::matrices_in_bf16`) gives f32 rows, widened.
                Some(t) => emb::cpu::gather_bf16(t, idv, &mut y, e),
                None => emb::cpu::gather(table.cpu_f32(OP)?, idv, &mut y, e),
            }
            Tensor::from_vec(y, out_shape)?
        }
        // The ids were checked on the host before they were uploaded (an id out of range
        // reads as a zero row).
        Device::Wgpu(_) => {
            let (rt, tb) = wgpu_buf(table);
            let y = wgpu_output(OP, rt, out_shape, dt)?;
            let p = emb::EmbeddingParams { tokens: ids.elem_count(), vocab: v, dim: e };
            emb::wgsl::forward(&rt.device, &rt.queue, &rt.kernels, tb, wgpu_buf(ids).1, wgpu_buf(&y).1, p, pr.expect(WGPU_FLOAT))?;
            y
        }
        Device::Cuda(_) => {
            let rt = cuda_buf(table).0;
            // Not zeroed: the kernel writes every row (zeros for an id out of range).
            let mut y = CudaOut::uninit(rt, out_shape, dt)?;
            let p = emb::EmbeddingParams { tokens: ids.elem_count(), vocab: v, dim: e };
            by_float!(dt, T => emb::cuda::forward::<T>(&rt.stream, &rt.modules, &view(table), &view(ids), &mut y.view_mut(), p)?);
            y.tensor()
        }
    };
    let (sids, table_shape) = (saved(ids), table.shape().clone());
    record(OP, out, &[ids, table], move |g, needs| {
        if !needs[1] {
            return Ok(vec![None, None]);
        }
        if let Device::Wgpu(i) = g.device() {
            // The kernel adds into dtable, so it starts from zeros.
            let dtable = Tensor::zeros(table_shape.clone(), dt, &Device::Wgpu(i))?;
            let rt = wgpu_buf(&dtable).0;
            let p = emb::EmbeddingParams { tokens: sids.elem_count(), vocab: v, dim: e };
            emb::wgsl::backward(&rt.device, &rt.queue, &rt.kernels, wgpu_buf(g).1, wgpu_buf(&sids).1, wgpu_buf(&dtable).1, p, pr.expect(WGPU_FLOAT))?;
            return Ok(vec![None, Some(dtable)]);
        }
        if let Device::Cuda(_) = g.device() {
            // As on wgpu: the kernel adds into a zeroed dtable.
            let rt = cuda_buf(g).0;
            let mut dtable = CudaOut::new(rt, table_shape.clone(), dt)?;
            let p = emb::EmbeddingParams { tokens: sids.elem_count(), vocab: v, dim: e };
            by_float!(dt, T => emb::cuda::backward::<T>(&rt.stream, &rt.modules, &view(g), &view(&sids), &mut dtable.view_mut(), p)?);
            return Ok(vec![None, Some(dtable.tensor())]);
        }
        let mut dt = vec![0.0f32; table_shape.elem_count()];
        emb::cpu::scatter_add(g.cpu_f32(OP)?, sids.cpu_i32(OP)?, &mut dt, e);
        Ok(vec![None, Some(Tensor::from_vec(dt, table_shape)?)])
    })
}

/// RMSNorm over the last axis: `y = w * x / sqrt(mean(x^2) + eps)`, w `[N]`, x `[..., N]`.
/// The backward is `kernels::rmsnorm`'s (see its docs for dx and dw).
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let RmsNormOutput { y, rstd } = rmsnorm_forward(x, w, eps)?;
    let (sx, sw) = (saved(x), saved(w));
    record("rmsnorm", y, &[x, w], move |g, needs| {
        let (dx, dw) = backward(&sx, &sw, g, &rstd, needs[1])?;
        Ok(vec![Some(dx), dw])
    })
}

/// The residual add before a pre-norm, fused: `h = x + d` and `y = rmsnorm(h, w)`, returned as
/// `(h, y)`. On CUDA one kernel each way (`rmsnorm_fwd_add_*`, `rmsnorm_bwd_dx_add_*`): the
/// forward writes h beside y, and the backward adds h's gradient from its other consumers (the
/// next residual add) into the norm's dx, where `add` then `rmsnorm` take two launches and
/// more passes over `[rows, N]` each way. The results are those of `add` and `rmsnorm`, bit for
/// bit (each sum rounded to the storage type as the add would), on CUDA as elsewhere, where the
/// two steps run as they are.
pub fn add_rmsnorm(x: &Tensor, d: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rmsnorm";
    same_device(OP, x, d)?;
    same_dtype(OP, x, d)?;
    if x.shape() != d.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().clone(), rhs: d.shape().clone() });
    }
    let (h, RmsNormOutput { y, rstd }) = forward_any(x, Some(d), w, eps)?;
    let (sh, sw) = (saved(&h), saved(w));
    let mut outs = record_many(OP, vec![h, y], &[x, d, w], move |gs, needs| {
        // h's gradient: the norm's dx (from y's) plus what h gets directly; x and d share it.
        let (dh, dw) = match (&gs[0], &gs[1]) {
            (direct, Some(dy)) => backward_add(&sh, &sw, dy, &rstd, direct.as_ref(), needs[2])?,
            (Some(direct), None) => (direct.clone(), None),
            (None, None) => unreachable!("the tape runs an entry only with a gradient"),
        };
        Ok(vec![needs[0].then(|| dh.clone()), needs[1].then_some(dh), dw])
    })?;
    let y = outs.pop().expect("two outputs");
    Ok((outs.pop().expect("two outputs"), y))
}

/// What the RMSNorm forward kernel writes: y and the per-row `1/rms` the backward needs.
pub struct RmsNormOutput {
    pub y: Tensor,
    /// `[rows]`, f32.
    pub rstd: Tensor,
}

fn rmsnorm_params(x: &Tensor, w: &Tensor, eps: f32) -> Result<RmsNormParams> {
    const OP: &str = "rmsnorm";
    same_device(OP, x, w)?;
    same_dtype(OP, x, w)?;
    let n = x.shape().last();
    if w.dims() != [n] || x.shape().rank() == 0 {
        return Err(Error::ShapeMismatch { op: "rmsnorm (weight vs last dim of x)", lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::InvalidArgument(format!("rmsnorm: eps must be >= 0, got {eps}")));
    }
    Ok(RmsNormParams { rows: x.shape().rows(), cols: n, eps })
}

fn cuda_tensor(rt: &std::sync::Arc<CudaRuntime>, buf: CudaSlice<u8>, shape: crate::Shape, dtype: DType, dev: Device) -> Tensor {
    Tensor::from_storage(Storage::Cuda { rt: rt.clone(), buf }, shape, dtype, dev)
}

/// RMSNorm forward on any device: f32 everywhere, bf16 on CUDA and f16 on wgpu too. Not
/// recorded on a tape.
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f32) -> Result<RmsNormOutput> {
    Ok(forward_any(x, None, w, eps)?.1)
}

/// The forward of `rmsnorm` (`d` None: h is x) and of `add_rmsnorm` (h = x + d): (h, output).
fn forward_any(x: &Tensor, d: Option<&Tensor>, w: &Tensor, eps: f32) -> Result<(Tensor, RmsNormOutput)> {
    const OP: &str = "rmsnorm";
    let p = rmsnorm_params(x, w, eps)?;
    let dev = x.device();
    if let (Some(d), false) = (d, matches!(dev, Device::Cuda(_))) {
        // One pass each on the CPU and wgpu: the add as `ops::add` computes it.
        let h = crate::ops::add(&saved(x), &saved(d))?;
        let out = forward_any(&h, None, w, eps)?.1;
        return Ok((h, out));
    }
    let (mn, m, n) = (p.rows * p.cols, p.rows, p.cols);
    match (dev, x.dtype()) {
        (Device::Cpu, DType::F32) => {
            let (mut y, mut rstd) = (vec![0.0f32; mn], vec![0.0f32; m]);
            rmsnorm::cpu::forward(x.cpu_f32(OP)?, w.cpu_f32(OP)?, &mut y, &mut rstd, p)?;
            Ok((x.clone(), RmsNormOutput { y: Tensor::from_vec(y, x.shape().clone())?, rstd: Tensor::from_vec(rstd, [m])? }))
        }
        (Device::Cuda(_), DType::F32 | DType::BF16) => {
            let (rt, xb) = cuda_buf(x);
            let wb = cuda_buf(w).1;
            let bytes = mn * x.dtype().size_in_bytes();
            // Not zeroed: the kernel writes every element of y, h and rstd.
            let mut yb = rt.alloc_uninit(bytes)?;
            let mut hb = d.map(|_| rt.alloc_uninit(bytes)).transpose()?;
            let mut rb = rt.alloc_uninit(m * 4)?;
            // SAFETY (all transmutes below): every buffer was allocated for its tensor's dtype and
            // element count, from which the params were derived (d has x's, checked by the op).
            unsafe {
                let mut rv = rb.transmute_mut::<f32>(m).expect("rstd sized");
                macro_rules! launch {
                    ($t:ty) => {{
                        let mut yv = yb.transmute_mut::<$t>(mn).expect("y sized");
                        let db = d.map(|d| cuda_buf(d).1.transmute::<$t>(mn).expect("d"));
                        let mut hv = hb.as_mut().map(|b| b.transmute_mut::<$t>(mn).expect("h sized"));
                        let add = db.as_ref().zip(hv.as_mut());
                        rmsnorm::cuda::forward::<$t>(&rt.stream, &rt.modules, &xb.transmute(mn).expect("x"), add, &wb.transmute(n).expect("w"), &mut yv, &mut rv, p)?
                    }};
                }
                if x.dtype() == DType::F32 { launch!(f32) } else { launch!(u16) }
            }
            let h = hb.map_or_else(|| x.clone(), |b| cuda_tensor(rt, b, x.shape().clone(), x.dtype(), dev));
            Ok((h, RmsNormOutput { y: cuda_tensor(rt, yb, x.shape().clone(), x.dtype(), dev), rstd: cuda_tensor(rt, rb, [m].into(), DType::F32, dev) }))
        }
        (Device::Wgpu(_), dt @ (DType::F32 | DType::F16)) => {
            let y = Tensor::zeros(x.shape().clone(), dt, &dev)?;
            let rstd = Tensor::zeros([m], DType::F32, &dev)?;
            let (rt, xb) = wgpu_buf(x);
            let pr = wgpu_precision(dt).expect("a WGSL float type");
            rmsnorm::wgsl::forward(&rt.device, &rt.queue, &rt.kernels, xb, wgpu_buf(w).1, wgpu_buf(&y).1, wgpu_buf(&rstd).1, p, pr)?;
            Ok((x.clone(), RmsNormOutput { y, rstd }))
        }
        (_, dtype) => Err(Error::UnsupportedDType { op: "rmsnorm on this device", dtype }),
    }
}

/// RMSNorm backward on any device: (dx, dw) from x, w, dy and the forward's rstd.
pub fn rmsnorm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dx, dw) = backward(x, w, dy, rstd, true)?;
    Ok((dx, dw.expect("asked for")))
}

/// `rmsnorm_backward`, dw only when `want_dw` (CUDA skips its kernel; the CPU and wgpu compute
/// it in the same pass and drop it).
fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, rstd: &Tensor, want_dw: bool) -> Result<(Tensor, Option<Tensor>)> {
    backward_add(x, w, dy, rstd, None, want_dw)
}

/// `backward` with `dres` added to dx: in the dx kernel on CUDA, as `ops::add` elsewhere.
fn backward_add(x: &Tensor, w: &Tensor, dy: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, want_dw: bool) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "rmsnorm backward";
    if let Some(dres) = dres {
        same_device(OP, x, dres)?;
        same_dtype(OP, x, dres)?;
        if dres.shape() != x.shape() {
            return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().clone(), rhs: dres.shape().clone() });
        }
        if !matches!(x.device(), Device::Cuda(_)) {
            let (dx, dw) = backward_add(x, w, dy, rstd, None, want_dw)?;
            return Ok((crate::ops::add(&dx, &saved(dres))?, dw));
        }
    }
    let p = rmsnorm_params(x, w, 0.0)?;
    same_device(OP, x, dy)?;
    same_dtype(OP, x, dy)?;
    same_device(OP, x, rstd)?;
    expect_dtype(OP, rstd, DType::F32)?;
    if dy.shape() != x.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().clone(), rhs: dy.shape().clone() });
    }
    if rstd.elem_count() != p.rows {
        return Err(Error::BadShape { op: OP, shape: rstd.shape().clone(), expected: format!("[{}] (one per row)", p.rows) });
    }
    let (mn, m, n) = (p.rows * p.cols, p.rows, p.cols);
    let dev = x.device();
    match (dev, x.dtype()) {
        (Device::Cpu, DType::F32) => {
            let (mut dx, mut dw) = (vec![0.0f32; mn], vec![0.0f32; n]);
            rmsnorm::cpu::backward(x.cpu_f32(OP)?, w.cpu_f32(OP)?, dy.cpu_f32(OP)?, rstd.cpu_f32(OP)?, &mut dx, &mut dw, p)?;
            Ok((Tensor::from_vec(dx, x.shape().clone())?, want_dw.then(|| Tensor::from_vec(dw, [n])).transpose()?))
        }
        (Device::Cuda(_), DType::F32 | DType::BF16) => {
            let (rt, xb) = cuda_buf(x);
            let (wb, gb, rb) = (cuda_buf(w).1, cuda_buf(dy).1, cuda_buf(rstd).1);
            // Not zeroed: the kernels write every element of dx and dw.
            let mut dxb = rt.alloc_uninit(mn * x.dtype().size_in_bytes())?;
            let mut dwb = want_dw.then(|| rt.alloc_uninit(n * x.dtype().size_in_bytes())).transpose()?;
            // SAFETY: as in `rmsnorm_forward`.
            unsafe {
                let rv = rb.transmute::<f32>(m).expect("rstd sized");
                macro_rules! launch {
                    ($t:ty) => {{
                        let mut dxv = dxb.transmute_mut::<$t>(mn).expect("dx sized");
                        let mut dwv = dwb.as_mut().map(|b| b.transmute_mut::<$t>(n).expect("dw sized"));
                        let resv = dres.map(|r| cuda_buf(r).1.transmute::<$t>(mn).expect("dres"));
                        rmsnorm::cuda::backward::<$t>(
                            &rt.stream, &rt.modules,
                            &xb.transmute(mn).expect("x"), &wb.transmute(n).expect("w"), &gb.transmute(mn).expect("dy"),
                            &rv, resv.as_ref(), &mut dxv, dwv.as_mut(), p,
                        )?
                    }};
                }
                if x.dtype() == DType::F32 { launch!(f32) } else { launch!(u16) }
            }
            Ok((cuda_tensor(rt, dxb, x.shape().clone(), x.dtype(), dev), dwb.map(|b| cuda_tensor(rt, b, [n].into(), x.dtype(), dev))))
        }
        (Device::Wgpu(_), dt @ (DType::F32 | DType::F16)) => {
            let dx = Tensor::zeros(x.shape().clone(), dt, &dev)?;
            let dw = Tensor::zeros([n], dt, &dev)?;
            let (rt, xb) = wgpu_buf(x);
            let pr = wgpu_precision(dt).expect("a WGSL float type");
            rmsnorm::wgsl::backward(
                &rt.device, &rt.queue, &rt.kernels,
                xb, wgpu_buf(w).1, wgpu_buf(dy).1, wgpu_buf(rstd).1, wgpu_buf(&dx).1, wgpu_buf(&dw).1, p, pr,
            )?;
            Ok((dx, want_dw.then_some(dw)))
        }
        (_, dtype) => Err(Error::UnsupportedDType { op: "rmsnorm backward on this device", dtype }),
    }
}
