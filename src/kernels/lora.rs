//! Fused LoRA linear: `Y = X·Wᵀ (+ bias) + s·(X̃·Aᵀ)·Bᵀ`, with X̃ the LoRA input after dropout
//! (`X̃ = X ⊙ mask / (1 - p)`, or X itself without dropout).
//!
//! Shapes: X `[M, K]`, W `[N, K]` (frozen), bias `[N]` (frozen), A `[R, K]`, B `[N, R]`,
//! Y `[M, N]`; the forward also returns `XA = X̃·Aᵀ` `[M, R]` for the backward.
//!
//! Backward, small (rank-R) products first, W gets no gradient (`G = dY·B`, `[M, R]`):
//! - `dX = dY·W + s·(G·A) ⊙ mask / (1 - p)`
//! - `dA = s·Gᵀ·X̃`
//! - `dB = s·dYᵀ·XA`
//!
//! CPU path: the `gemm` crate; the LoRA term is accumulated into the base product's output
//! (`Y += s·XA·Bᵀ` in one call), so Y is written once. GPU kernels: the LoRA-GEMM family.

use crate::kernels::matmul::MatmulParams;

/// Sizes and scale of one LoRA linear.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl LoraParams {
    fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> MatmulParams {
        MatmulParams { m, n, k, trans_a, trans_b }
    }
}

pub mod reference {
    use super::LoraParams;
    use crate::kernels::matmul::reference::matmul;

    /// Returns (Y, XA). `x_lora` is the dropped-out input (X itself without dropout).
    pub fn forward(x: &[f64], x_lora: &[f64], w: &[f64], bias: Option<&[f64]>, a: &[f64], b: &[f64], p: LoraParams) -> (Vec<f64>, Vec<f64>) {
        let mut y = matmul(x, w, LoraParams::mm(p.m, p.n, p.k, false, true));
        let xa = matmul(x_lora, a, LoraParams::mm(p.m, p.r, p.k, false, true));
        let lora = matmul(&xa, b, LoraParams::mm(p.m, p.n, p.r, false, true));
        for (i, y) in y.iter_mut().enumerate() {
            *y += p.scale as f64 * lora[i] + bias.map_or(0.0, |b| b[i % p.n]);
        }
        (y, xa)
    }

    /// Returns (dX, dA, dB) for upstream gradient `dy`; `drop_scale` is `mask / (1 - p)` per
    /// element of X when dropout was applied (then `x_lora = X ⊙ drop_scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(dy: &[f64], x_lora: &[f64], xa: &[f64], w: &[f64], a: &[f64], b: &[f64], drop_scale: Option<&[f64]>, p: LoraParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let s = p.scale as f64;
        let g = matmul(dy, b, LoraParams::mm(p.m, p.r, p.n, false, false));
        let da: Vec<f64> = matmul(&g, x_lora, LoraParams::mm(p.r, p.k, p.m, true, false)).iter().map(|v| s * v).collect();
        let db: Vec<f64> = matmul(dy, xa, LoraParams::mm(p.n, p.r, p.m, true, false)).iter().map(|v| s * v).collect();
        let mut dx = matmul(dy, w, LoraParams::mm(p.m, p.k, p.n, false, false));
        let ga = matmul(&g, a, LoraParams::mm(p.m, p.k, p.r, false, false));
        for (i, d) in dx.iter_mut().enumerate() {
            *d += s * ga[i] * drop_scale.map_or(1.0, |ds| ds[i]);
        }
        (dx, da, db)
    }
}

pub mod cpu {
    use super::LoraParams;
    use crate::kernels::matmul::cpu::{dyw_bf16, matmul_acc, matmul_new, xwt_bf16};
    use crate::kernels::nf4::{cpu as nf4, Nf4Tensor};
    use crate::Result;

    /// The frozen weight W `[N, K]` as the CPU products read it.
    #[derive(Clone, Copy)]
    pub enum Base<'a> {
        /// f32, stored `[N, K]`, or its transpose `[K, N]` when `transposed` (the layout the
        /// GEMM reads fastest; see `Tensor::cpu_f32_transposed`).
        F32 { w: &'a [f32], transposed: bool },
        /// NF4 (QLoRA), decoded inside the products (`nf4::cpu::matmul_xwt`, `matmul_dyw`).
        Nf4(&'a Nf4Tensor),
        /// bf16, stored `[N, K]`: read as stored by one row, widened a block of rows at a time
        /// otherwise (`matmul::cpu::xwt_bf16`, `dyw_bf16`).
        Bf16(&'a [half::bf16]),
    }

    impl Base<'_> {
        /// `x·Wᵀ` `[M, N]`.
        pub fn xwt(self, x: &[f32], p: LoraParams) -> Result<Vec<f32>> {
            match self {
                Base::F32 { w, transposed } => matmul_new(x, w, LoraParams::mm(p.m, p.n, p.k, false, !transposed)),
                Base::Nf4(q) => nf4::matmul_xwt(q, x, p.m, p.n, p.k),
                Base::Bf16(w) => xwt_bf16(x, w, p.m, p.n, p.k),
            }
        }

        /// `dY·W` `[M, K]`.
        pub fn dyw(self, dy: &[f32], p: LoraParams) -> Result<Vec<f32>> {
            match self {
                Base::F32 { w, transposed } => matmul_new(dy, w, LoraParams::mm(p.m, p.k, p.n, false, transposed)),
                Base::Nf4(q) => nf4::matmul_dyw(q, dy, p.m, p.n, p.k),
                Base::Bf16(w) => dyw_bf16(dy, w, p.m, p.n, p.k),
            }
        }
    }

    /// Returns `y` (`[M, N]`) and `xa` (`[M, R]`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(x: &[f32], x_lora: &[f32], w: Base<'_>, bias: Option<&[f32]>, a: &[f32], b: &[f32], p: LoraParams) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut y = w.xwt(x, p)?;
        let xa = matmul_new(x_lora, a, LoraParams::mm(p.m, p.r, p.k, false, true))?;
        matmul_acc(&xa, b, &mut y, LoraParams::mm(p.m, p.n, p.r, false, true), p.scale)?;
        if let Some(bias) = bias {
            for row in y.chunks_mut(p.n) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        Ok((y, xa))
    }

    /// Gradients of the LoRA linear: writes dA and dB, returns dX when `want_dx`.
    /// `drop_scale` holds `mask / (1 - p)` per element of X when dropout was applied.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        dy: &[f32],
        x_lora: &[f32],
        xa: &[f32],
        w: Base<'_>,
        a: &[f32],
        b: &[f32],
        drop_scale: Option<&[f32]>,
        want_dx: bool,
        da: &mut [f32],
        db: &mut [f32],
        p: LoraParams,
    ) -> Result<Option<Vec<f32>>> {
        // G = dY·B  [M, R]
        let g = matmul_new(dy, b, LoraParams::mm(p.m, p.r, p.n, false, false))?;
        // dA = s·Gᵀ·X̃  [R, K];  dB = s·dYᵀ·XA  [N, R]
        da.fill(0.0);
        matmul_acc(&g, x_lora, da, LoraParams::mm(p.r, p.k, p.m, true, false), p.scale)?;
        db.fill(0.0);
        matmul_acc(dy, xa, db, LoraParams::mm(p.n, p.r, p.m, true, false), p.scale)?;
        if !want_dx {
            return Ok(None);
        }
        // dX = dY·W + s·(G·A) ⊙ drop_scale
        let mut dx = w.dyw(dy, p)?;
        match drop_scale {
            None => matmul_acc(&g, a, &mut dx, LoraParams::mm(p.m, p.k, p.r, false, false), p.scale)?,
            Some(ds) => {
                let ga = matmul_new(&g, a, LoraParams::mm(p.m, p.k, p.r, false, false))?;
                for ((d, v), s) in dx.iter_mut().zip(&ga).zip(ds) {
                    *d += p.scale * v * s;
                }
            }
        }
        Ok(Some(dx))
    }
}

/// WGSL launchers over wgpu's types: `kernels-wgsl/lora_gemm.wgsl`, in f32, or with
/// `Precision::F16` in half precision where the adapter has SHADER_F16 (f16 operands and
/// outputs, dA and dB in f32, f32 accumulation). Buffers need STORAGE usage and may be longer
/// than their data. Dropout: `dropout` draws the CPU's mask; the forward takes `x_lora` (the
/// dropped-out input) beside `x`, and the backward, given the same `(p, seed)`, masks the LoRA
/// share of dX.
#[allow(clippy::too_many_arguments)]
pub mod wgsl;

/// CUDA launchers (`kernels-cuda/lora_gemm.cu`) over cudarc's types. Storage is bf16 or f16 as
/// u16 bit patterns (`Half` picks the kernels), accumulation f32; dA and dB are f32 (they feed
/// the f32 master weights). Dropout as in `wgsl` (`dropout`, `x_lora`, the backward's `(p, seed)`).
/// Scratch (`s·XA`, `s·G`, `[M, R]` each) is allocated on the stream per call.
#[allow(clippy::too_many_arguments)]
pub mod cuda;

pub mod sm90;
