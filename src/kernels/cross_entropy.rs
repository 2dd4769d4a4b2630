//! Cross-entropy from logits with an ignore index, averaged over the counted rows:
//!
//! ```text
//! loss = (1/C) * sum over rows m with target t_m != ignore of (logsumexp(z_m) - z_m[t_m])
//! ```
//!
//! where C is the number of counted rows (loss 0 when C = 0). logits `[M, V]`, targets `[M]` i32.
//! Backward: `dz[m, v] = dy / C * (softmax(z_m)[v] - [v == t_m])` for counted rows, 0 otherwise.
//!
//! Fused with the final projection (`linear_*`): the logits `z = x·Wᵀ` (x `[M, H]`, W `[V, H]`)
//! are made `chunk_rows` rows at a time and turned into their gradient in place, so only one
//! chunk of `[rows, V]` is ever held (the `[M, V]` logits of a 128k vocabulary would be the
//! largest activation of the step). Because the loss is a scalar, the gradients for `dy = 1`
//! are finished in the same pass (`dx = dz·W`, `dW = dzᵀ·x`, summed over chunks) and the
//! backward only scales them by `dy`: two products over W per step instead of three.
//!
//! Also greedy decoding's pick over the same rows of logits, `argmax_rows`: per row the first
//! index of the largest number, NaNs skipped, 0 when the row's first value is NaN or it holds
//! no number ([`reference::argmax`], the CPU sampler's rule), so a GPU hands back one index a
//! row instead of V logits.

use crate::{Error, Result};

/// Checks targets: each is `ignore_index` or in `0..vocab`.
pub fn check_targets(targets: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    match targets.iter().position(|&t| t != ignore_index && (t < 0 || t as usize >= vocab)) {
        Some(pos) => {
            Err(Error::IndexOutOfRange { op: "cross_entropy", index: targets[pos] as i64, position: pos, bound: vocab })
        }
        None => Ok(()),
    }
}

/// Sizes of a fused linear cross-entropy: x `[rows, hidden]` against W `[vocab, hidden]`,
/// `chunk_rows` rows of logits at a time.
#[derive(Clone, Copy, Debug)]
pub struct LinearCeParams {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub ignore_index: i32,
    pub chunk_rows: usize,
}

impl LinearCeParams {
    /// The rows of each chunk, `(first row, rows)`.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let c = self.chunk_rows.max(1);
        (0..self.rows).step_by(c).map(move |r0| (r0, c.min(self.rows - r0)))
    }
}

/// Rows per chunk when the caller has no preference: about 128 MiB of f32 logits, at least
/// 256 rows, at most every row. Small chunks save little more memory and cost time: each chunk
/// streams all of W through two GEMMs (on the CPU the GEMM also repacks it), so with a 128k
/// vocabulary, H 512 and 2048 rows on a 2-core CPU, 65-row chunks took 2.4x as long as 256-row
/// ones (7.2 s vs 3.0 s per forward + backward; the unfused pair: 3.8 s, 2.6 GB).
pub fn default_chunk_rows(rows: usize, vocab: usize) -> usize {
    ((32usize << 20) / vocab.max(1)).max(256).min(rows.max(1))
}

pub mod reference {
    /// The first index of the row's largest number, NaNs skipped; 0 when `row[0]` is NaN or
    /// the row is empty (a plain scan with `>`, as greedy decoding has always picked).
    pub fn argmax(row: &[f32]) -> usize {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best
    }

    pub fn cross_entropy(logits: &[f64], targets: &[i32], v: usize, ignore_index: i32) -> f64 {
        let mut total = 0.0;
        let mut count = 0usize;
        for (row, &t) in logits.chunks(v).zip(targets) {
            if t == ignore_index {
                continue;
            }
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += lse - row[t as usize];
            count += 1;
        }
        if count == 0 {
            0.0
        } else {
            total / count as f64
        }
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use crate::kernels::reduce::cpu::softmax_row;

    /// Returns (mean loss, counted rows) and writes the softmax probabilities of every counted
    /// row into `probs` (uncounted rows are left zero) for the backward.
    pub fn forward(logits: &[f32], targets: &[i32], probs: &mut [f32], v: usize, ignore_index: i32) -> (f32, usize) {
        let (total, count) = probs
            .par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter())
            .filter(|(_, &t)| t != ignore_index)
            .map(|((p, z), &t)| {
                let lse = softmax_row(z, p);
                ((lse - z[t as usize]) as f64, 1usize)
            })
            .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let loss = if count == 0 { 0.0 } else { (total / count as f64) as f32 };
        (loss, count)
    }

    /// The head W `[V, H]` as [`linear_forward`] reads it.
    #[derive(Clone, Copy)]
    pub enum Head<'a> {
        /// f32, with its transpose `[H, V]` when one is kept (the layout the logits' GEMM reads
        /// fastest).
        F32 { w: &'a [f32], wt: Option<&'a [f32]> },
        /// bf16 (`Llama::matrices_in_bf16`), widened a block of rows at a time
        /// (`matmul::cpu::xwt_bf16`, `dyw_bf16`); frozen: it gets no dW.
        Bf16(&'a [half::bf16]),
    }

    /// Fused linear cross-entropy (see the module docs): returns (mean loss, counted rows) and,
    /// for the gradients asked for, writes `dx = dz·W` (`[M, H]`) and `dw = dzᵀ·x` (`[V, H]`,
    /// overwritten; an f32 head only) for `dy = 1`. Targets must be in range
    /// (`super::check_targets`).
    pub fn linear_forward(
        x: &[f32],
        head: Head<'_>,
        targets: &[i32],
        mut dx: Option<&mut [f32]>,
        mut dw: Option<&mut [f32]>,
        p: super::LinearCeParams,
    ) -> crate::Result<(f32, usize)> {
        use crate::kernels::matmul::{cpu as mm, MatmulParams};
        let (h, v, ignore) = (p.hidden, p.vocab, p.ignore_index);
        let count = targets.iter().filter(|&&t| t != ignore).count();
        let inv_count = if count == 0 { 0.0 } else { 1.0 / count as f32 };
        let grads = dx.is_some() || dw.is_some();
        if matches!(head, Head::Bf16(_)) && dw.is_some() {
            return Err(crate::Error::InvalidArgument("linear_cross_entropy: a bf16 head is frozen (no dW on the CPU)".into()));
        }
        if let Some(dw) = dw.as_deref_mut() {
            dw.fill(0.0);
        }
        let mut total = 0.0f64;
        for (r0, cm) in p.chunks() {
            let xc = &x[r0 * h..(r0 + cm) * h];
            let mut z = match head {
                Head::F32 { wt: Some(wt), .. } => mm::matmul_new(xc, wt, MatmulParams { m: cm, n: v, k: h, trans_a: false, trans_b: false })?,
                Head::F32 { w, wt: None } => mm::matmul_new(xc, w, MatmulParams { m: cm, n: v, k: h, trans_a: false, trans_b: true })?,
                Head::Bf16(w) => mm::xwt_bf16(xc, w, cm, v, h)?,
            };
            // Each row's loss, and its logits turned into dz = (softmax - onehot) / C in place.
            total += z
                .par_chunks_mut(v)
                .zip(targets[r0..r0 + cm].par_iter())
                .map(|(row, &t)| {
                    if t == ignore {
                        row.fill(0.0);
                        return 0.0;
                    }
                    let zt = row[t as usize];
                    let max = crate::kernels::math::max(row);
                    let sum = crate::kernels::math::exp_shifted_sum(row, max);
                    if grads {
                        crate::kernels::math::scale(row, inv_count / sum);
                        row[t as usize] -= inv_count;
                    }
                    (max + sum.ln() - zt) as f64
                })
                .sum::<f64>();
            if let Some(dx) = dx.as_deref_mut() {
                let dx = &mut dx[r0 * h..(r0 + cm) * h];
                match head {
                    Head::F32 { w, .. } => mm::matmul(&z, w, dx, MatmulParams { m: cm, n: h, k: v, trans_a: false, trans_b: false })?,
                    Head::Bf16(w) => dx.copy_from_slice(&mm::dyw_bf16(&z, w, cm, v, h)?),
                }
            }
            if let Some(dw) = dw.as_deref_mut() {
                mm::matmul_acc(&z, xc, dw, MatmulParams { m: v, n: h, k: cm, trans_a: true, trans_b: false }, 1.0)?;
            }
        }
        Ok((if count == 0 { 0.0 } else { (total / count as f64) as f32 }, count))
    }

    /// `dz = dy / C * (probs - onehot)` on counted rows, 0 elsewhere.
    pub fn backward(probs: &[f32], targets: &[i32], dz: &mut [f32], v: usize, ignore_index: i32, count: usize, dy: f32) {
        let s = if count == 0 { 0.0 } else { dy / count as f32 };
        dz.par_chunks_mut(v).zip(probs.par_chunks(v)).zip(targets.par_iter()).for_each(|((d, p), &t)| {
            if t == ignore_index {
                d.fill(0.0);
                return;
            }
            for (d, p) in d.iter_mut().zip(p) {
                *d = s * p;
            }
            d[t as usize] -= s;
        });
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

    use super::LinearCeParams;
    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::kernels::lora::cuda::{matmul, GemmOut, Half};
    use crate::{Error, Result};

    /// Fused linear cross-entropy on CUDA (see the module docs), bf16 x and W: `loss[0]` and,
    /// when given, `dx = dz·W` `[M, H]` (bf16) and `dw += dzᵀ·x` `[V, H]` (f32, added to what
    /// it holds: pass zeros) for `dy = 1`. Per chunk of rows: the chunk's bf16 logits by the
    /// plain GEMM (f32 accumulation, as a bf16 model's head computes them), each row's
    /// log-sum-exp, loss and gradient in place (`ce_rows_bf16`, f32 math), then `dx`'s rows by
    /// the GEMM with W read `[V, H]` as `[K, N]`, and the chunk's share of dW by `matmul_tn`
    /// (the gradient's transpose against the chunk of x, over the chunk's rows), summed in f32
    /// over the chunks in order. Only `[chunk_rows, V]` logits are held (and, on an H100 or
    /// H200, their transpose for the Hopper GEMM while dW's share is computed). `count` is the number of rows whose target is not ignored (the caller checked
    /// the targets on the host).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        dt: Half,
        x: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        targets: &CudaView<'_, i32>,
        mut dx: Option<&mut CudaViewMut<'_, u16>>,
        mut dw: Option<&mut CudaViewMut<'_, f32>>,
        loss: &mut CudaViewMut<'_, f32>,
        count: usize,
        p: LinearCeParams,
    ) -> Result<()> {
        const OP: &str = "linear_cross_entropy (cuda)";
        let (m, h, v) = (p.rows, p.hidden, p.vocab);
        if dt != Half::Bf16 {
            return Err(Error::InvalidArgument(format!("{OP}: bf16 only, not {dt:?}")));
        }
        for (what, have, need) in [("x", x.len(), m * h), ("w", w.len(), v * h), ("targets", targets.len(), m), ("loss", loss.len(), 1)] {
            check_len(OP, what, have, need)?;
        }
        if let Some(dx) = &dx {
            check_len(OP, "dx", dx.len(), m * h)?;
        }
        if let Some(dw) = &dw {
            check_len(OP, "dw", dw.len(), v * h)?;
        }
        let ignore = p.ignore_index;
        let c = p.chunk_rows.clamp(1, m.max(1));
        let e = |what: &'static str| move |err| Error::cuda(format!("{OP}: {what}"), err);
        // Not zeroed: each chunk's product writes its [cm, V] logits whole before they are
        // read, and `ce_rows` writes every row's loss (0 for an ignored target).
        // SAFETY: plain u16s and f32s, each written by a kernel before any read (above).
        let mut z = unsafe { stream.alloc::<u16>((c * v).max(1)) }.map_err(e("allocating the logits chunk"))?;
        let mut row_loss = unsafe { stream.alloc::<f32>(m.max(1)) }.map_err(e("allocating the row losses"))?;
        let inv_count = if count == 0 { 0.0f32 } else { 1.0 / count as f32 };
        let grad = (dx.is_some() || dw.is_some()) as i32;
        for (r0, cm) in p.chunks() {
            let xc = x.slice(r0 * h..(r0 + cm) * h);
            matmul(stream, modules, dt, (&xc, h), (w, h), GemmOut::Half(&mut z.slice_mut(..cm * v)), (cm, v, h), false)?;
            let (tc, mut lc) = (targets.slice(r0..r0 + cm), row_loss.slice_mut(r0..r0 + cm));
            rows::<u16>(stream, modules, &mut z.slice_mut(..cm * v), &tc, &mut lc, (cm, v), ignore, inv_count, grad != 0)?;
            if let Some(dx) = dx.as_mut() {
                let zc = z.slice(..cm * v);
                matmul(stream, modules, dt, (&zc, v), (w, h), GemmOut::Half(&mut dx.slice_mut(r0 * h..(r0 + cm) * h)), (cm, h, v), true)?;
            }
            if let Some(dw) = dw.as_mut() {
                // dW += zᵀ·x over the chunk's rows.
                let zc = z.slice(..cm * v);
                crate::kernels::lora::cuda::matmul_tn(stream, modules, dt, &zc, &xc, GemmOut::AddF32(&mut dw.slice_mut(..)), (v, h, cm))?;
            }
        }
        sum(stream, modules, &row_loss.slice(..m), loss, inv_count)
    }

    /// `ce_rows` on `z [M, V]` (f32, or bf16 as u16): each row's loss into `row_loss [M]` and,
    /// with `grad`, z overwritten by `(softmax(z) - onehot(t)) · inv_count` (see
    /// kernels-cuda/cross_entropy.cu). The caller checked the targets.
    #[allow(clippy::too_many_arguments)]
    pub fn rows<T: CeElem>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        z: &mut CudaViewMut<'_, T>,
        targets: &CudaView<'_, i32>,
        row_loss: &mut CudaViewMut<'_, f32>,
        (m, v): (usize, usize),
        ignore: i32,
        inv_count: f32,
        grad: bool,
    ) -> Result<()> {
        const OP: &str = "cross_entropy rows (cuda)";
        for (what, have, need) in [("z", z.len(), m * v), ("targets", targets.len(), m), ("row losses", row_loss.len(), m)] {
            check_len(OP, what, have, need)?;
        }
        if m == 0 {
            return Ok(());
        }
        let v_i = i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{OP}: V = {v} exceeds i32")))?;
        let m_u = u32::try_from(m).map_err(|_| Error::InvalidArgument(format!("{OP}: M = {m} exceeds a grid")))?;
        let f = modules.function("cross_entropy", T::ROWS)?;
        let cfg = LaunchConfig { grid_dim: (m_u, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let grad = grad as i32;
        // SAFETY: matches ce_rows_* (z, targets, loss, V, ignore, inv_count, grad); z holds M·V
        // elements, targets and row_loss M each (checked above).
        unsafe { stream.launch_builder(&f).arg(z).arg(targets).arg(row_loss).arg(&v_i).arg(&ignore).arg(&inv_count).arg(&grad).launch(cfg) }
            .map_err(|err| Error::cuda(format!("{OP}: launching {}", T::ROWS), err))?;
        Ok(())
    }

    /// `out[0] = inv_count · Σ row_loss`, summed in a fixed order (`ce_sum_f32`).
    pub fn sum(stream: &Arc<CudaStream>, modules: &ModuleCache, row_loss: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, f32>, inv_count: f32) -> Result<()> {
        const OP: &str = "cross_entropy sum (cuda)";
        check_len(OP, "out", out.len(), 1)?;
        let m = i32::try_from(row_loss.len()).map_err(|_| Error::InvalidArgument(format!("{OP}: M = {} exceeds i32", row_loss.len())))?;
        let f = modules.function("cross_entropy", "ce_sum_f32")?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: matches ce_sum_f32 (loss rows, M, inv_count, out); row_loss holds M values, out one.
        unsafe { stream.launch_builder(&f).arg(row_loss).arg(&m).arg(&inv_count).arg(out).launch(cfg) }.map_err(|err| Error::cuda(format!("{OP}: launching ce_sum_f32"), err))?;
        Ok(())
    }

    /// `out[m]` = the greedy pick of row m of `z` `[M, V]` (see the module docs), f32 or bf16.
    pub fn argmax_rows<T: CeElem>(stream: &Arc<CudaStream>, modules: &ModuleCache, z: &CudaView<'_, T>, out: &mut CudaViewMut<'_, i32>, (m, v): (usize, usize)) -> Result<()> {
        const OP: &str = "argmax_rows (cuda)";
        for (what, have, need) in [("z", z.len(), m * v), ("out", out.len(), m)] {
            check_len(OP, what, have, need)?;
        }
        if m == 0 {
            return Ok(());
        }
        let v_i = i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{OP}: V = {v} exceeds i32")))?;
        let m_u = u32::try_from(m).map_err(|_| Error::InvalidArgument(format!("{OP}: M = {m} exceeds a grid")))?;
        let f = modules.function("cross_entropy", T::ARGMAX)?;
        let cfg = LaunchConfig { grid_dim: (m_u, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: matches argmax_rows_* (z, out, V); z holds M·V elements and out M (checked).
        unsafe { stream.launch_builder(&f).arg(z).arg(out).arg(&v_i).launch(cfg) }.map_err(|err| Error::cuda(format!("{OP}: launching {}", T::ARGMAX), err))?;
        Ok(())
    }

    /// The storage types `ce_rows` and `argmax_rows` have kernels for.
    pub trait CeElem: cudarc::driver::DeviceRepr {
        const ROWS: &'static str;
        const ARGMAX: &'static str;
    }
    impl CeElem for f32 {
        const ROWS: &'static str = "ce_rows_f32";
        const ARGMAX: &'static str = "argmax_rows_f32";
    }
    impl CeElem for u16 {
        const ROWS: &'static str = "ce_rows_bf16";
        const ARGMAX: &'static str = "argmax_rows_bf16";
    }
}

pub mod wgsl {
    use crate::device::wgpu::{dispatch_bound, encode, grid, uniform, KernelCache, WgpuRuntime};
    use crate::kernels::check_len;
    use crate::{Error, Result};

    pub const SOURCE: &str = wgsl_source!("cross_entropy.wgsl");

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Params {
        rows: u32,
        vocab: u32,
        ignore: i32,
        count: u32,
    }

    /// Sizes of one call: M rows of V logits, C counted rows (targets not equal to the ignore
    /// index; the caller counts them when it checks the targets).
    #[derive(Clone, Copy, Debug)]
    pub struct CeParams {
        pub rows: usize,
        pub vocab: usize,
        pub ignore_index: i32,
        pub count: usize,
    }

    fn setup(device: &wgpu::Device, op: &'static str, p: CeParams, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<(wgpu::Buffer, (u32, u32, u32))> {
        for (name, b, n) in bufs {
            check_len(op, name, b.size() as usize / 4, *n)?;
        }
        let u32_of = |v: usize, what: &str| u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds u32")));
        let params = Params { rows: u32_of(p.rows, "M")?, vocab: u32_of(p.vocab, "V")?, ignore: p.ignore_index, count: u32_of(p.count, "C")? };
        u32_of(p.rows * p.vocab, "M·V")?;
        let (gx, gy) = grid(params.rows);
        Ok((uniform(device, &params), (gx, gy, 1)))
    }

    /// Forward: `loss[0]` (mean over counted rows) and each row's log-sum-exp `lse` `[M]`,
    /// which the backward reuses. `row_loss` `[M]` is scratch. Targets must be in range
    /// (`super::check_targets`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        lse: &wgpu::Buffer,
        row_loss: &wgpu::Buffer,
        loss: &wgpu::Buffer,
        p: CeParams,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_fwd (wgsl)";
        let (m, v) = (p.rows, p.vocab);
        let (u, groups) = setup(device, OP, p, &[("logits", logits, m * v), ("targets", targets, m), ("lse", lse, m), ("row_loss", row_loss, m), ("loss", loss, 1)])?;
        if m > 0 && v > 0 {
            let rows = kernels.pipeline(device, "ce_rows", SOURCE, "ce_rows")?;
            dispatch_bound(device, queue, &rows, &[(0, &u), (1, logits), (2, targets), (3, lse), (4, row_loss)], groups);
        }
        let mean = kernels.pipeline(device, "ce_mean", SOURCE, "ce_mean")?;
        dispatch_bound(device, queue, &mean, &[(0, &u), (4, row_loss), (5, loss)], (1, 1, 1));
        Ok(())
    }

    /// `best[m]` (u32) = the greedy pick of row m of the f32 logits `[M, V]` (see the module
    /// docs).
    pub fn argmax_rows(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, logits: &wgpu::Buffer, best: &wgpu::Buffer, (m, v): (usize, usize)) -> Result<()> {
        const OP: &str = "argmax_rows (wgsl)";
        let p = CeParams { rows: m, vocab: v, ignore_index: 0, count: 0 };
        let (u, groups) = setup(device, OP, p, &[("logits", logits, m * v), ("best", best, m)])?;
        if m > 0 {
            let pick = kernels.pipeline(device, "argmax_rows", SOURCE, "argmax_rows")?;
            dispatch_bound(device, queue, &pick, &[(0, &u), (1, logits), (7, best)], groups);
        }
        Ok(())
    }

    /// Backward: `dz = dy[0] / C * (softmax(z) - onehot(t))` on counted rows, 0 elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        lse: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dz: &wgpu::Buffer,
        p: CeParams,
    ) -> Result<()> {
        const OP: &str = "cross_entropy_bwd (wgsl)";
        let (m, v) = (p.rows, p.vocab);
        let (u, groups) = setup(device, OP, p, &[("logits", logits, m * v), ("targets", targets, m), ("lse", lse, m), ("dy", dy, 1), ("dz", dz, m * v)])?;
        if m == 0 || v == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline(device, "ce_bwd", SOURCE, "ce_bwd")?;
        dispatch_bound(device, queue, &pipe, &[(0, &u), (1, logits), (2, targets), (3, lse), (5, dz), (6, dy)], groups);
        Ok(())
    }

    /// Fused linear cross-entropy on the device (see the module docs): `loss[0]` and, where
    /// given, `dx = dz·W` `[M, H]` and `dw = dzᵀ·x` `[V, H]` for `dy = 1`, all f32 (with
    /// `precision` f16, x and W are f16, and dx and dw still f32). x `[M, H]`, W
    /// `[V, H]`, targets `[M]` (in range; the caller counted the `count` rows that are not
    /// ignored when it checked them on the host). One submission per chunk of rows: the
    /// chunk's logits by the GEMM, its rows' log-sum-exp, their gradient, then the two
    /// products; only `[chunk_rows, V]` logits (and their gradient) are held.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        rt: &WgpuRuntime,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        dw: Option<&wgpu::Buffer>,
        loss: &wgpu::Buffer,
        count: usize,
        p: super::LinearCeParams,
        precision: crate::device::wgpu::Precision,
    ) -> Result<()> {
        use crate::device::wgpu::Precision;
        use crate::kernels::lora::wgsl::{check_buffers, plain, product_flags, transposed, Types, FLAG_ACCUMULATE};
        const OP: &str = "linear_cross_entropy (wgsl)";
        let (m, h, v) = (p.rows, p.hidden, p.vocab);
        let c = p.chunk_rows.clamp(1, m.max(1));
        let es = precision.bytes();
        if precision == Precision::F16 {
            // The f32 logits of f16 x and W; dx (f32) from the f32 dz against the f16 W, and
            // dW (f32) from the f32 dzᵀ against the f16 x.
            if h % 2 == 1 {
                return Err(Error::InvalidArgument(format!("{OP}: f16 rows of odd width {h} cannot be copied in whole words")));
            }
            precision.check(&rt.device, OP)?;
        }
        check_buffers(OP, &[("targets", targets, m), ("loss", loss, 1)])?;
        let sized = |b: &wgpu::Buffer, n: usize, what: &str| crate::kernels::check_len(OP, what, b.size() as usize / es, n);
        sized(x, m * h, "x")?;
        sized(w, v * h, "w")?;
        if let Some(dx) = dx {
            check_buffers(OP, &[("dx", dx, m * h)])?;
        }
        if let Some(dw) = dw {
            check_buffers(OP, &[("dw", dw, v * h)])?;
        }
        let u32_of = |n: usize, what: &str| u32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{OP}: {what} = {n} exceeds u32")));
        u32_of(c * v, "chunk rows · V")?;
        let (dev, kernels) = (&rt.device, &rt.kernels);
        let single = m <= c; // one chunk: x and the targets are read in place
        let chunk_in = |bytes: usize| (!single).then(|| rt.alloc(bytes));
        let (xc, tc) = (chunk_in(es * c * h), chunk_in(4 * c));
        let dxc = dx.and(chunk_in(4 * c * h));
        let grads = dx.is_some() || dw.is_some();
        let z = rt.alloc(4 * c * v);
        let dz = grads.then(|| rt.alloc(4 * c * v));
        let (lse, chunk_loss, row_loss) = (rt.alloc(4 * c), rt.alloc(4 * c), rt.alloc(4 * m.max(1)));
        let one = rt.upload(bytemuck::bytes_of(&1.0f32));
        let rows_pipe = kernels.pipeline(dev, "ce_rows", SOURCE, "ce_rows")?;
        let bwd_pipe = kernels.pipeline(dev, "ce_bwd", SOURCE, "ce_bwd")?;
        let params = |rows: usize| Params { rows: rows as u32, vocab: v as u32, ignore: p.ignore_index, count: count as u32 };
        u32_of(m, "M")?;
        u32_of(count, "C")?;
        let bytes = |elems: usize| (4 * elems) as u64;
        for (i, (r0, cm)) in p.chunks().enumerate() {
            let mut enc = dev.create_command_encoder(&Default::default());
            let (xb, tb) = match (&xc, &tc) {
                (Some(xc), Some(tc)) => {
                    enc.copy_buffer_to_buffer(x, (es * r0 * h) as u64, xc.buffer(), 0, (es * cm * h) as u64);
                    enc.copy_buffer_to_buffer(targets, bytes(r0), tc.buffer(), 0, bytes(cm));
                    (xc.buffer(), tc.buffer())
                }
                _ => (x, targets),
            };
            let types = if precision == Precision::F16 { Types::F16ToF32 } else { Types::F32 };
            product_flags(dev, kernels, &mut enc, (xb, plain(h)), (w, transposed(h)), z.buffer(), (cm, v, h), 1.0, types, 0)?;
            let u = uniform(dev, &params(cm));
            let (gx, gy) = grid(cm as u32);
            encode(dev, &mut enc, &rows_pipe, &[(0, &u), (1, z.buffer()), (2, tb), (3, lse.buffer()), (4, chunk_loss.buffer())], (gx, gy, 1));
            enc.copy_buffer_to_buffer(chunk_loss.buffer(), 0, row_loss.buffer(), bytes(r0), bytes(cm));
            if let Some(dz) = &dz {
                let dz = dz.buffer();
                encode(dev, &mut enc, &bwd_pipe, &[(0, &u), (1, z.buffer()), (2, tb), (3, lse.buffer()), (5, dz), (6, one.buffer())], (gx, gy, 1));
                if let Some(dx) = dx {
                    let out = dxc.as_ref().map_or(dx, |b| b.buffer());
                    let types = if precision == Precision::F16 { Types::F32F16ToF32 } else { Types::F32 };
                    product_flags(dev, kernels, &mut enc, (dz, plain(v)), (w, plain(h)), out, (cm, h, v), 1.0, types, 0)?;
                    if let Some(dxc) = &dxc {
                        enc.copy_buffer_to_buffer(dxc.buffer(), 0, dx, bytes(r0 * h), bytes(cm * h));
                    }
                }
                if let Some(dw) = dw {
                    // The first chunk writes dW, the others add to it.
                    let flags = if i == 0 { 0 } else { FLAG_ACCUMULATE };
                    let types = if precision == Precision::F16 { Types::F32F16ToF32 } else { Types::F32 };
                    product_flags(dev, kernels, &mut enc, (dz, transposed(v)), (xb, plain(h)), dw, (v, h, cm), 1.0, types, flags)?;
                }
            }
            crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
        }
        if m == 0 {
            if let Some(dw) = dw {
                let mut enc = dev.create_command_encoder(&Default::default());
                enc.clear_buffer(dw, 0, Some(bytes(v * h)));
                crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
            }
        }
        let mean = kernels.pipeline(dev, "ce_mean", SOURCE, "ce_mean")?;
        let u = uniform(dev, &params(m));
        dispatch_bound(dev, &rt.queue, &mean, &[(0, &u), (4, row_loss.buffer()), (5, loss)], (1, 1, 1));
        Ok(())
    }
}
