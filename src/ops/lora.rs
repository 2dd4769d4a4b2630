use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::lora::{cpu, LoraParams};
use crate::ops::{expect_dtype, expect_weight_dtype, same_device, saved};
use crate::rng::uniform_at;
use crate::tape::record_many;
use crate::{DType, Device, Error, Result, Tensor};

/// Dropout on the LoRA input: element i is kept when `uniform_at(seed, i) >= p`, and scaled by
/// `1 / (1 - p)`.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// One linear of a group: `x·Wᵀ (+ bias) (+ scale·(dropout(x)·Aᵀ)·Bᵀ)`. W and the bias are
/// frozen; A and B (when present) are trained.
#[derive(Clone, Copy)]
pub struct LinearPart<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// (A `[R, K]`, B `[N, R]`, scale).
    pub lora: Option<(&'a Tensor, &'a Tensor, f32)>,
    pub dropout: Option<Dropout>,
}

/// The fused LoRA linear `x·Wᵀ (+ bias) + scale·(dropout(x)·Aᵀ)·Bᵀ` of `kernels::lora` (see
/// there for the backward). x `[..., K]`, W `[N, K]`, A `[R, K]`, B `[N, R]`. W and the bias
/// are frozen: they are not inputs on the tape and get no gradient; x, A and B get theirs.
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32, dropout: Option<Dropout>) -> Result<Tensor> {
    let part = LinearPart { weight: w, bias, lora: Some((a, b, scale)), dropout };
    Ok(linear_group(x, &[part])?.remove(0))
}

/// Several linears of the same input (q, k, v; gate, up) as one op: the products run side by
/// side (two GEMMs at once use the CPU's cores better than one GEMM split in two), and the
/// backward sums the parts' contributions to dx in a fixed order, so results do not depend
/// on thread timing.
pub fn linear_group(x: &Tensor, parts: &[LinearPart<'_>]) -> Result<Vec<Tensor>> {
    linear_group_remade(x, parts, None)
}

/// Makes a linear group's input again in the backward (see [`linear_group_remade`]).
pub type Remake = Arc<dyn Fn() -> Result<Tensor> + Send + Sync>;

/// What a linear group's backward keeps of its input x. Only an adapter without dropout reads
/// it (dA = s·(dY·B)ᵀ·x; with dropout dA reads the dropped input, kept beside it, and dX =
/// dY·W never reads x), so x is kept only then, or made again by a [`Remake`].
pub(super) enum SavedInput {
    Kept(Tensor),
    Remade { remake: Remake, dtype: DType, device: Device },
    Unneeded,
}

impl SavedInput {
    pub(super) fn new(x: &Tensor, parts: &[LinearPart<'_>], remake: Option<Remake>) -> Self {
        let reads_x = parts.iter().any(|p| p.lora.is_some() && p.dropout.is_none_or(|d| d.p <= 0.0));
        match (reads_x, remake) {
            (false, _) => SavedInput::Unneeded,
            (true, Some(remake)) => SavedInput::Remade { remake, dtype: x.dtype(), device: x.device() },
            (true, None) => SavedInput::Kept(saved(x)),
        }
    }

    /// x where a part reads it (made again if so chosen), else None.
    pub(super) fn get(&self, shape: &crate::Shape) -> Result<Option<Tensor>> {
        match self {
            SavedInput::Kept(t) => Ok(Some(t.clone())),
            SavedInput::Remade { remake, dtype, device } => {
                let t = remake()?;
                if t.shape() != shape {
                    return Err(Error::ShapeMismatch { op: "linear (input made again for the backward vs the forward's)", lhs: t.shape().clone(), rhs: shape.clone() });
                }
                if (t.dtype(), t.device()) != (*dtype, *device) {
                    return Err(Error::InvalidArgument(format!("linear: the input made again for the backward is {} on {}, the forward's was {dtype} on {device}", t.dtype(), t.device())));
                }
                Ok(Some(t))
            }
            SavedInput::Unneeded => Ok(None),
        }
    }
}

/// [`linear_group`] whose backward makes x again with `remake` (where it needs x at all)
/// instead of keeping it from the forward: for an input that a cheap op makes from tensors the
/// tape keeps anyway (the model's down projection reads SwiGLU's product of the gate and up
/// projections, which SwiGLU's backward keeps), so the `[tokens, K]` input is not held
/// between the forward and the backward. `remake` must give the same values as x.
pub fn linear_group_remade(x: &Tensor, parts: &[LinearPart<'_>], remake: Option<Remake>) -> Result<Vec<Tensor>> {
    const OP: &str = "linear";
    let dt = crate::ops::gpu::float_dtype(OP, x)?;
    let k = x.shape().last();
    let m = x.shape().rows();
    let mut params = Vec::with_capacity(parts.len());
    for part in parts {
        let w = part.weight;
        for t in [Some(w), part.bias, part.lora.map(|l| l.0), part.lora.map(|l| l.1)].into_iter().flatten() {
            same_device(OP, x, t)?;
            // The frozen weight follows `expect_weight_dtype` (NF4 read dequantized, a CPU bf16
            // W widened), and on a GPU an NF4 W serves any precision. On a GPU the adapters may
            // be f32 masters of a bf16/f16 model (converted inside the op).
            if std::ptr::eq(t, w) {
                if t.dtype() != DType::NF4 || x.device() == Device::Cpu {
                    expect_weight_dtype(OP, t, dt)?;
                }
                continue;
            }
            let master = part.bias.is_none_or(|b| !std::ptr::eq(t, b)) && x.device() != Device::Cpu && t.dtype() == DType::F32;
            if !master {
                expect_dtype(OP, t, dt)?;
            }
        }
        let wd = w.dims();
        if x.shape().rank() < 2 || wd.len() != 2 || wd[1] != k {
            return Err(Error::ShapeMismatch { op: "linear (x [.., K] vs W [N, K])", lhs: x.shape().clone(), rhs: w.shape().clone() });
        }
        let n = wd[0];
        if let Some(b) = part.bias {
            if b.dims() != [n] {
                return Err(Error::ShapeMismatch { op: "linear (bias [N] vs W [N, K])", lhs: w.shape().clone(), rhs: b.shape().clone() });
            }
        }
        let r = match part.lora {
            Some((a, b, _)) => {
                let (ad, bd) = (a.dims(), b.dims());
                if ad.len() != 2 || ad[1] != k || bd != [n, ad[0]] {
                    return Err(Error::ShapeMismatch { op: "lora_linear (A [R, K] vs B [N, R])", lhs: a.shape().clone(), rhs: b.shape().clone() });
                }
                ad[0]
            }
            None => 0,
        };
        if let Some(d) = part.dropout {
            if !(0.0..1.0).contains(&d.p) {
                return Err(Error::InvalidArgument(format!("lora dropout must be in [0, 1), got {}", d.p)));
            }
        }
        params.push(LoraParams { m, n, k, r, scale: part.lora.map_or(0.0, |l| l.2) });
    }
    match x.device() {
        Device::Cpu => {}
        Device::Wgpu(_) => return super::lora_gpu::linear_group_wgpu(x, parts, &params, SavedInput::new(x, parts, remake)),
        Device::Cuda(_) => return super::lora_gpu::linear_group_cuda(x, parts, &params, SavedInput::new(x, parts, remake)),
    }
    let xv = x.cpu_f32(OP)?;
    let inputs = tape_inputs(x, parts);
    // Inference (nothing recorded) makes no transposes of frozen weights.
    let records = inputs.iter().any(|t| t.is_tracked());
    struct Fwd {
        y: Vec<f32>,
        xa: Vec<f32>,
        /// Dropout's scaled keep-mask and the dropped input, kept for the backward.
        drop: Option<(Vec<f32>, Vec<f32>)>,
    }
    let fwd: Vec<Fwd> = parts
        .par_iter()
        .zip(&params)
        .map(|(part, &p)| -> Result<Fwd> {
            let bias = part.bias.map(|b| b.cpu_f32(OP)).transpose()?;
            // A frozen f32 W is read through its transpose (the GEMM's fastest layout), made
            // and kept when training (`Tensor::cpu_f32_for_xwt`); an NF4 W is decoded inside
            // the product (`lora::cpu::Base`).
            let (dense, transposed);
            let w = match (part.weight.as_nf4(), part.weight.cpu_bf16()) {
                (Some(q), _) => cpu::Base::Nf4(q),
                (None, Some(w)) => cpu::Base::Bf16(w),
                (None, None) => {
                    (dense, transposed) = match part.weight.is_tracked() {
                        true => (part.weight.cpu_f32_weight(OP)?, false),
                        false => part.weight.cpu_f32_for_xwt(OP, p.m, records)?,
                    };
                    cpu::Base::F32 { w: &dense, transposed }
                }
            };
            let Some((a, b, _)) = part.lora else {
                let mut y = w.xwt(xv, p)?;
                if let Some(bias) = bias {
                    y.par_chunks_mut(p.n).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
                }
                return Ok(Fwd { y, xa: Vec::new(), drop: None });
            };
            let drop = part.dropout.filter(|d| d.p > 0.0).map(|d| {
                let keep = 1.0 / (1.0 - d.p);
                let scale: Vec<f32> = (0..xv.len()).map(|i| if uniform_at(d.seed, i as u64) >= d.p { keep } else { 0.0 }).collect();
                let dropped: Vec<f32> = xv.iter().zip(&scale).map(|(v, s)| v * s).collect();
                (scale, dropped)
            });
            let x_lora = drop.as_ref().map_or(xv, |d| d.1.as_slice());
            let (y, xa) = cpu::forward(xv, x_lora, w, bias, a.cpu_f32(OP)?, b.cpu_f32(OP)?, p)?;
            Ok(Fwd { y, xa, drop })
        })
        .collect::<Result<_>>()?;

    let mut outs = Vec::with_capacity(parts.len());
    let mut saved_parts = Vec::with_capacity(parts.len());
    for ((part, f), &p) in parts.iter().zip(fwd).zip(&params) {
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        outs.push(Tensor::from_vec(f.y, shape)?);
        saved_parts.push((saved(part.weight), part.lora.map(|(a, b, _)| (saved(a), saved(b))), f.xa, f.drop, p));
    }
    let sx = SavedInput::new(x, parts, remake);
    let x_shape = x.shape().clone();
    record_many(OP, outs, &inputs, move |gs, needs| {
        let want_dx = needs[0];
        let x_now = sx.get(&x_shape)?;
        let xv: &[f32] = match &x_now {
            Some(t) => t.cpu_f32(OP)?,
            None => &[],
        };
        // Per part: (dx contribution, dA, dB), computed side by side.
        type PartGrads = (Option<Vec<f32>>, Option<(Tensor, Tensor)>);
        let per_part: Vec<PartGrads> = saved_parts
            .par_iter()
            .zip(gs.par_iter())
            .map(|((w, lora, xa, drop, p), g)| -> Result<PartGrads> {
                let Some(g) = g else { return Ok((None, None)) };
                let gv = g.cpu_f32(OP)?;
                let wv = match (w.as_nf4(), w.cpu_bf16()) {
                    (Some(q), _) => cpu::Base::Nf4(q),
                    (None, Some(w)) => cpu::Base::Bf16(w),
                    (None, None) => cpu::Base::F32 { w: w.cpu_f32(OP)?, transposed: false },
                };
                let Some((a, b)) = lora else {
                    let dx = if want_dx { Some(wv.dyw(gv, *p)?) } else { None };
                    return Ok((dx, None));
                };
                let (mut da, mut db) = (vec![0.0f32; p.r * p.k], vec![0.0f32; p.n * p.r]);
                let x_lora = drop.as_ref().map_or(xv, |d| d.1.as_slice());
                let dx = cpu::backward(gv, x_lora, xa, wv, a.cpu_f32(OP)?, b.cpu_f32(OP)?, drop.as_ref().map(|d| d.0.as_slice()), want_dx, &mut da, &mut db, *p)?;
                Ok((dx, Some((Tensor::from_vec(da, a.shape().clone())?, Tensor::from_vec(db, b.shape().clone())?))))
            })
            .collect::<Result<_>>()?;
        // dx: the parts' contributions summed in part order.
        let mut dx: Option<Vec<f32>> = None;
        let mut ab = Vec::new();
        for ((dxi, grads), part) in per_part.into_iter().zip(&saved_parts) {
            if let Some(dxi) = dxi {
                match &mut dx {
                    None => dx = Some(dxi),
                    Some(acc) => acc.par_iter_mut().zip(dxi.par_iter()).for_each(|(a, b)| *a += b),
                }
            }
            if part.1.is_some() {
                let (da, db) = grads.map_or((None, None), |(a, b)| (Some(a), Some(b)));
                ab.push(da);
                ab.push(db);
            }
        }
        let mut out = vec![dx.map(|d| Tensor::from_vec(d, x_shape.clone())).transpose()?];
        out.extend(ab);
        Ok(out)
    })
}

/// The op's tape inputs: x, then A and B of each part with an adapter (the order of the
/// backward's gradients).
pub(super) fn tape_inputs<'a>(x: &'a Tensor, parts: &[LinearPart<'a>]) -> Vec<&'a Tensor> {
    let mut inputs = vec![x];
    for part in parts {
        if let Some((a, b, _)) = part.lora {
            inputs.push(a);
            inputs.push(b);
        }
    }
    inputs
}
