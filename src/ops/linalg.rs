use crate::kernels::matmul::{cpu, MatmulParams};
use crate::kernels::lora::wgsl as gemm_wgsl;
use crate::ops::gpu::{float_dtype, wgpu_buf, wgpu_output, wgpu_precision};
use crate::ops::{expect_weight_dtype, same_device, saved};
use crate::tape::record;
use crate::{Device, Error, Result, Tensor};

/// `op(a) · op(b)` for 2-D f32 tensors; `op(x)` is `xᵀ` when its flag is set.
///
/// Backward of `C = op(A)·op(B)` (so `d op(A) = dC·op(B)ᵀ`, `d op(B) = op(A)ᵀ·dC`):
/// - `dA = dC · op(B)ᵀ`, or `(dC · op(B)ᵀ)ᵀ = op(B) · dCᵀ` when `trans_a`
/// - `dB = op(A)ᵀ · dC`, or `dCᵀ · op(A)` when `trans_b`
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    const OP: &str = "matmul";
    same_device(OP, a, b)?;
    let dt = float_dtype(OP, a)?;
    expect_weight_dtype(OP, b, dt)?;
    for t in [a, b] {
        if t.shape().rank() != 2 {
            return Err(Error::BadShape { op: OP, shape: t.shape().clone(), expected: "a matrix (rank 2)".into() });
        }
    }
    let (ad, bd) = (a.dims(), b.dims());
    let (m, k) = if trans_a { (ad[1], ad[0]) } else { (ad[0], ad[1]) };
    let (kb, n) = if trans_b { (bd[1], bd[0]) } else { (bd[0], bd[1]) };
    if k != kb {
        return Err(Error::ShapeMismatch { op: "matmul (inner dimensions)", lhs: a.shape().clone(), rhs: b.shape().clone() });
    }
    let p = MatmulParams { m, n, k, trans_a, trans_b };
    let out = match a.device() {
        // A frozen B used transposed (a weight: `x·Wᵀ`) is read through its transpose, the
        // layout the GEMM reads fastest, made and kept when a backward is recorded (see
        // `Tensor::cpu_f32_for_xwt`); a trained B changes every step and is read as it is.
        // A bf16 weight (`Llama::matrices_in_bf16`) is read as stored, one row by the bf16
        // gemv, more widened for the product.
        Device::Cpu if trans_b && !trans_a && b.cpu_bf16().is_some() => {
            let c = cpu::xwt_bf16(a.cpu_f32(OP)?, b.cpu_bf16().expect("bf16"), m, n, k)?;
            Tensor::from_vec(c, [m, n])?
        }
        Device::Cpu if trans_b && !b.is_tracked() => {
            let (bv, transposed) = b.cpu_f32_for_xwt(OP, m, a.is_tracked())?;
            let c = cpu::matmul_new(a.cpu_f32(OP)?, &bv, MatmulParams { trans_b: !transposed, ..p })?;
            Tensor::from_vec(c, [m, n])?
        }
        Device::Cpu => {
            let c = cpu::matmul_new(a.cpu_f32(OP)?, &b.cpu_f32_weight(OP)?, p)?;
            Tensor::from_vec(c, [m, n])?
        }
        // The backward is this op again (dA and dB are products), so it runs here too.
        Device::Wgpu(_) if b.dtype() == dt => {
            let (rt, abuf) = wgpu_buf(a);
            let c = wgpu_output(OP, rt, [m, n], dt)?;
            let (sa, sb) = (stride(trans_a, ad[1]), stride(trans_b, bd[1]));
            let pr = wgpu_precision(dt).expect("f32 or f16");
            gemm_wgsl::matmul(&rt.device, &rt.queue, &rt.kernels, (abuf, sa), (wgpu_buf(b).1, sb), wgpu_buf(&c).1, (m, n, k), pr)?;
            c
        }
        // The tensor-core GEMM reads a along its rows and b as `[n, k]` or `[k, n]`: `a·bᵀ` (a
        // linear, the head's logits) and `a·b` directly; `aᵀ·b` (dW = dYᵀ·X, the backward of
        // a trained weight) by `matmul_tn`; `aᵀ·bᵀ` with a transposed on the device first.
        Device::Cuda(_) if b.dtype() == dt => {
            use crate::kernels::lora::cuda::{matmul, matmul_tn, GemmOut};
            use crate::ops::cuda::{cuda_buf, half, transposed, view, CudaOut};
            let hdt = half(OP, dt)?;
            let rt = cuda_buf(a).0;
            let mut c = CudaOut::uninit(rt, [m, n], dt)?;
            if trans_a && !trans_b {
                matmul_tn(&rt.stream, &rt.modules, hdt, &view(a), &view(b), GemmOut::Half(&mut c.view_mut()), (m, n, k))?;
            } else {
                let at = if trans_a { Some(transposed(a)?) } else { None };
                let a_rows = at.as_ref().unwrap_or(a);
                matmul(&rt.stream, &rt.modules, hdt, (&view(a_rows), k), (&view(b), bd[1]), GemmOut::Half(&mut c.view_mut()), (m, n, k), !trans_b)?;
            }
            c.tensor()
        }
        d => return Err(Error::Unsupported { op: OP, device: d }),
    };
    let (sa, sb) = (saved(a), saved(b));
    record(OP, out, &[a, b], move |g, needs| {
        let da = if !needs[0] {
            None
        } else if trans_a {
            Some(matmul(&sb, g, trans_b, true)?)
        } else {
            Some(matmul(g, &sb, false, !trans_b)?)
        };
        let db = if !needs[1] {
            None
        } else if trans_b {
            Some(matmul(g, &sa, true, trans_a)?)
        } else {
            Some(matmul(&sa, g, !trans_a, false)?)
        };
        Ok(vec![da, db])
    })
}

/// (row, column) strides of a row-major `[rows, cols]` operand read as is or transposed.
fn stride(transposed: bool, cols: usize) -> [u32; 2] {
    if transposed {
        gemm_wgsl::transposed(cols)
    } else {
        gemm_wgsl::plain(cols)
    }
}
