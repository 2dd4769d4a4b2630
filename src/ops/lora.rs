use crate::kernels::lora::{cpu, LoraParams};
use crate::ops::{expect_dtype, same_device, saved};
use crate::rng::uniform_at;
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Dropout on the LoRA input: element i is kept when `uniform_at(seed, i) >= p`, and scaled by
/// `1 / (1 - p)`.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// The fused LoRA linear `x·Wᵀ (+ bias) + scale·(dropout(x)·Aᵀ)·Bᵀ` of
/// `kernels::lora` (see there for the backward). x `[..., K]`, W `[N, K]`, A `[R, K]`,
/// B `[N, R]`. W and the bias are frozen: they are not inputs on the tape and get no gradient;
/// x, A and B get theirs.
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32, dropout: Option<Dropout>) -> Result<Tensor> {
    const OP: &str = "lora_linear";
    for t in [w, a, b].into_iter().chain(bias) {
        same_device(OP, x, t)?;
        expect_dtype(OP, t, DType::F32)?;
    }
    expect_dtype(OP, x, DType::F32)?;
    let k = x.shape().last();
    let (wd, ad, bd) = (w.dims(), a.dims(), b.dims());
    if x.shape().rank() < 2 || wd.len() != 2 || wd[1] != k {
        return Err(Error::ShapeMismatch { op: "lora_linear (x [.., K] vs W [N, K])", lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    let n = wd[0];
    if ad.len() != 2 || ad[1] != k || bd != [n, ad[0]] {
        return Err(Error::ShapeMismatch { op: "lora_linear (A [R, K] vs B [N, R])", lhs: a.shape().clone(), rhs: b.shape().clone() });
    }
    if bias.is_some_and(|b| b.dims() != [n]) {
        return Err(Error::ShapeMismatch { op: "lora_linear (bias [N])", lhs: w.shape().clone(), rhs: bias.unwrap().shape().clone() });
    }
    if let Some(d) = dropout {
        if !(0.0..1.0).contains(&d.p) {
            return Err(Error::InvalidArgument(format!("lora dropout must be in [0, 1), got {}", d.p)));
        }
    }
    let p = LoraParams { m: x.shape().rows(), n, k, r: ad[0], scale };
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 2") = n;
    if x.device() != Device::Cpu {
        return Err(Error::Unsupported { op: OP, device: x.device() });
    }
    let xv = x.cpu_f32(OP)?;
    // Dropout: the scaled keep-mask and the dropped input, both kept for the backward.
    let drop_scale: Option<Vec<f32>> = dropout.filter(|d| d.p > 0.0).map(|d| {
        let keep = 1.0 / (1.0 - d.p);
        (0..xv.len()).map(|i| if uniform_at(d.seed, i as u64) >= d.p { keep } else { 0.0 }).collect()
    });
    let x_lora: Option<Vec<f32>> = drop_scale.as_ref().map(|s| xv.iter().zip(s).map(|(v, s)| v * s).collect());
    let (y, xa) = cpu::forward(xv, x_lora.as_deref().unwrap_or(xv), w.cpu_f32(OP)?, bias.map(|b| b.cpu_f32(OP)).transpose()?, a.cpu_f32(OP)?, b.cpu_f32(OP)?, p)?;
    let out = Tensor::from_vec(y, out_shape)?;
    let (sx, sw, sa, sb) = (saved(x), saved(w), saved(a), saved(b));
    record(OP, out, &[x, a, b], move |g, needs| {
        let (mut da, mut db) = (vec![0.0f32; p.r * p.k], vec![0.0f32; p.n * p.r]);
        let xv = sx.cpu_f32(OP)?;
        let dx = cpu::backward(
            g.cpu_f32(OP)?, x_lora.as_deref().unwrap_or(xv), &xa, sw.cpu_f32(OP)?, sa.cpu_f32(OP)?, sb.cpu_f32(OP)?,
            drop_scale.as_deref(), needs[0], &mut da, &mut db, p,
        )?;
        Ok(vec![
            dx.map(|d| Tensor::from_vec(d, sx.shape().clone())).transpose()?,
            Some(Tensor::from_vec(da, sa.shape().clone())?),
            Some(Tensor::from_vec(db, sb.shape().clone())?),
        ])
    })
}
