//! Cross-entropy from logits with an ignore index, averaged over the counted rows:
//!
//!   loss = (1/C) * sum over rows m with target t_m != ignore of (logsumexp(z_m) - z_m[t_m])
//!
//! where C is the number of counted rows (loss 0 when C = 0). logits `[M, V]`, targets `[M]` i32.
//! Backward: `dz[m, v] = dy / C * (softmax(z_m)[v] - [v == t_m])` for counted rows, 0 otherwise.

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

pub mod reference {
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

pub mod wgsl {
    use crate::device::wgpu::{dispatch_bound, grid, uniform, KernelCache};
    use crate::kernels::check_len;
    use crate::{Error, Result};

    pub const SOURCE: &str = include_str!("../../kernels-wgsl/cross_entropy.wgsl");

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
}
