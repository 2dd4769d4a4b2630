//! RMSNorm: `y[m,n] = w[n] * x[m,n] * r_m`, `r_m = 1/sqrt(mean_n x[m,n]^2 + eps)`.
//!
//! Backward (derived by hand; `c_m = (1/N) * sum_n dy[m,n] * w[n] * x[m,n]`):
//! - `dx[m,n] = r_m * (dy[m,n] * w[n] - x[m,n] * r_m^2 * c_m)`
//! - `dw[n]   = sum_m dy[m,n] * x[m,n] * r_m`
//!
//! Shapes: x, y, dy, dx `[M, N]` row-major; w, dw `[N]`; rstd `[M]` (f32, saved by the forward).
//! Kernels: `kernels-cuda/rmsnorm.cu` (f32, bf16), `kernels-wgsl/rmsnorm.wgsl` (f32).

use crate::kernels::check_len;
use crate::Result;

/// Sizes and epsilon of one RMSNorm call.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormParams {
    /// M: rows (tokens).
    pub rows: usize,
    /// N: row length (hidden size).
    pub cols: usize,
    pub eps: f32,
}

impl RmsNormParams {
    fn check(&self, op: &'static str, x: usize, w: usize, y: usize, rstd: usize) -> Result<()> {
        let mn = self.rows * self.cols;
        check_len(op, "x", x, mn)?;
        check_len(op, "w", w, self.cols)?;
        check_len(op, "y", y, mn)?;
        check_len(op, "rstd", rstd, self.rows)
    }
}

/// Index loops on purpose: the reference reads like the math.
#[allow(clippy::needless_range_loop)]
pub mod reference {
    use super::RmsNormParams;

    /// Returns (y, rstd).
    pub fn forward(x: &[f64], w: &[f64], p: RmsNormParams) -> (Vec<f64>, Vec<f64>) {
        let (m_rows, n_cols) = (p.rows, p.cols);
        let mut y = vec![0.0; m_rows * n_cols];
        let mut rstd = vec![0.0; m_rows];
        for (m, r_m) in rstd.iter_mut().enumerate() {
            let row = &x[m * n_cols..(m + 1) * n_cols];
            let mean_sq = row.iter().map(|v| v * v).sum::<f64>() / n_cols as f64;
            let r = 1.0 / (mean_sq + p.eps as f64).sqrt();
            *r_m = r;
            for n in 0..n_cols {
                y[m * n_cols + n] = w[n] * row[n] * r;
            }
        }
        (y, rstd)
    }

    /// Returns (dx, dw).
    pub fn backward(x: &[f64], w: &[f64], dy: &[f64], p: RmsNormParams) -> (Vec<f64>, Vec<f64>) {
        let (m_rows, n_cols) = (p.rows, p.cols);
        let (_, rstd) = forward(x, w, p);
        let mut dx = vec![0.0; m_rows * n_cols];
        let mut dw = vec![0.0; n_cols];
        for m in 0..m_rows {
            let r = rstd[m];
            let i = |n: usize| m * n_cols + n;
            let c = (0..n_cols).map(|n| dy[i(n)] * w[n] * x[i(n)]).sum::<f64>() / n_cols as f64;
            for n in 0..n_cols {
                dx[i(n)] = r * (dy[i(n)] * w[n] - x[i(n)] * r * r * c);
                dw[n] += dy[i(n)] * x[i(n)] * r;
            }
        }
        (dx, dw)
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use super::RmsNormParams;
    use crate::device::cpu::rows_per_task;
    use crate::kernels::math;
    use crate::Result;

    math::wide! {
        /// One row of the forward: its rstd, and y = w·x·rstd (in the CPU's widest vectors).
        fn forward_row(x: &[f32], w: &[f32], y: &mut [f32], eps: f32) -> f32 = forward_row_lanes
    }

    math::wide! {
        /// One row of the backward: dx, and the row's share added to dw.
        fn backward_row(x: &[f32], w: &[f32], dy: &[f32], r: f32, dx: &mut [f32], dw: &mut [f32]) = backward_row_lanes
    }

    #[inline(always)]
    fn forward_row_lanes(x: &[f32], w: &[f32], y: &mut [f32], eps: f32) -> f32 {
        let r = 1.0 / (math::dot_lanes(x, x) / x.len() as f32 + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = w * x * r;
        }
        r
    }

    #[inline(always)]
    fn backward_row_lanes(x: &[f32], w: &[f32], dy: &[f32], r: f32, dx: &mut [f32], dw: &mut [f32]) {
        let n = x.len();
        // c = Σ dy·w·x / n, in sixteen lanes summed in order at the end (as `math::dot`).
        let mut lanes = [0.0f32; 16];
        let (mut cd, mut cw, mut cx) = (dy.chunks_exact(16), w.chunks_exact(16), x.chunks_exact(16));
        for ((d, w), x) in (&mut cd).zip(&mut cw).zip(&mut cx) {
            for (((l, &d), &w), &x) in lanes.iter_mut().zip(d).zip(w).zip(x) {
                *l += d * w * x;
            }
        }
        let tail: f32 = cd.remainder().iter().zip(cw.remainder()).zip(cx.remainder()).map(|((d, w), x)| d * w * x).sum();
        let c = (lanes.iter().sum::<f32>() + tail) / n as f32;
        for ((((dx, dw), &x), &w), &dy) in dx.iter_mut().zip(dw.iter_mut()).zip(x).zip(w).zip(dy) {
            *dx = r * (dy * w - x * r * r * c);
            *dw += dy * x * r;
        }
    }

    pub fn forward(x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32], p: RmsNormParams) -> Result<()> {
        p.check("rmsnorm_fwd", x.len(), w.len(), y.len(), rstd.len())?;
        let n = p.cols;
        let chunk = rows_per_task(n);
        y[..p.rows * n]
            .par_chunks_mut(n * chunk)
            .zip(rstd[..p.rows].par_chunks_mut(chunk))
            .zip(x[..p.rows * n].par_chunks(n * chunk))
            .for_each(|((y, rs), x)| {
                for ((y, r), x) in y.chunks_mut(n).zip(rs.iter_mut()).zip(x.chunks(n)) {
                    *r = forward_row(x, &w[..n], y, p.eps);
                }
            });
        Ok(())
    }

    /// Writes dx and dw from x, w, dy and the forward's rstd.
    pub fn backward(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        p: RmsNormParams,
    ) -> Result<()> {
        p.check("rmsnorm_bwd", x.len(), w.len(), dx.len(), rstd.len())?;
        crate::kernels::check_len("rmsnorm_bwd", "dy", dy.len(), p.rows * p.cols)?;
        crate::kernels::check_len("rmsnorm_bwd", "dw", dw.len(), p.cols)?;
        let n = p.cols;
        let chunk = rows_per_task(n);
        // Each task returns its partial dw; the partials are summed after.
        let partials: Vec<Vec<f32>> = dx[..p.rows * n]
            .par_chunks_mut(n * chunk)
            .zip(x[..p.rows * n].par_chunks(n * chunk))
            .zip(dy[..p.rows * n].par_chunks(n * chunk))
            .zip(rstd[..p.rows].par_chunks(chunk))
            .map(|(((dx, x), dy), rs)| {
                let mut dw_part = vec![0.0f32; n];
                for (((dx, x), dy), &r) in dx.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)).zip(rs) {
                    backward_row(x, &w[..n], dy, r, dx, &mut dw_part);
                }
                dw_part
            })
            .collect();
        dw[..n].fill(0.0);
        for part in partials {
            for (d, v) in dw.iter_mut().zip(part) {
                *d += v;
            }
        }
        Ok(())
    }

    #[test]
    fn the_wide_rows_are_the_baseline_ones() {
        // On AVX-512 or AVX2 (where this CPU has them) against the baseline loops, bit for bit,
        // over a row with a remainder past every lane width.
        let n = 1037;
        let v = |a: f32, b: f32, m: usize| (0..n).map(|i| a + b * ((i * m) % n) as f32 / n as f32).collect::<Vec<f32>>();
        let (x, w, dy) = (v(-2.0, 4.0, 7919), v(0.5, 1.0, 104_729), v(0.25, -1.0, 31));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut o: [Vec<f32>; 6] = std::array::from_fn(|_| vec![0.0; n]);
        let [y, yb, dx, dxb, dw, dwb] = &mut o;
        let (r, rb) = (forward_row(&x, &w, y, 1e-5), forward_row_lanes(&x, &w, yb, 1e-5));
        backward_row(&x, &w, &dy, r, dx, dw);
        backward_row_lanes(&x, &w, &dy, rb, dxb, dwb);
        assert_eq!((r.to_bits(), bits(y), bits(dx), bits(dw)), (rb.to_bits(), bits(yb), bits(dxb), bits(dwb)));
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

    use super::RmsNormParams;
    use crate::device::cuda::ModuleCache;
    use crate::{Error, Result};

    const BLOCK: u32 = 256;

    fn dims(p: RmsNormParams) -> Result<(i32, i32)> {
        let to_i32 = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("rmsnorm: {what} = {v} exceeds i32")))
        };
        Ok((to_i32(p.rows, "rows")?, to_i32(p.cols, "cols")?))
    }

    fn launch_err(e: cudarc::driver::DriverError) -> Error {
        Error::cuda("launching rmsnorm", e)
    }

    /// Forward for f32 (`T = f32`, kernel suffix `f32`) or bf16 bits (`T = u16`, suffix `bf16`).
    /// With `add = (d, h)`, the row normalized is `h = x + d` (stored in the element type), which
    /// is written to h as well (`rmsnorm_fwd_add_*`: the residual add and the norm in one pass).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: cudarc::driver::DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        x: &CudaView<'_, T>,
        add: Option<(&CudaView<'_, T>, &mut CudaViewMut<'_, T>)>,
        w: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        rstd: &mut CudaViewMut<'_, f32>,
        p: RmsNormParams,
    ) -> Result<()> {
        p.check("rmsnorm_fwd", x.len(), w.len(), y.len(), rstd.len())?;
        if let Some((d, h)) = &add {
            crate::kernels::check_len("rmsnorm_fwd", "d", d.len(), p.rows * p.cols)?;
            crate::kernels::check_len("rmsnorm_fwd", "h", h.len(), p.rows * p.cols)?;
        }
        let (m, n) = dims(p)?;
        if m == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let s = suffix::<T>()?;
        // SAFETY: argument types match the kernel signatures; lengths checked above.
        match add {
            None => {
                let f = modules.function("rmsnorm", &format!("rmsnorm_fwd_{s}"))?;
                unsafe { stream.launch_builder(&f).arg(x).arg(w).arg(y).arg(rstd).arg(&m).arg(&n).arg(&p.eps).launch(cfg) }
            }
            Some((d, h)) => {
                let f = modules.function("rmsnorm", &format!("rmsnorm_fwd_add_{s}"))?;
                unsafe { stream.launch_builder(&f).arg(x).arg(d).arg(w).arg(h).arg(y).arg(rstd).arg(&m).arg(&n).arg(&p.eps).launch(cfg) }
            }
        }
        .map_err(launch_err)?;
        Ok(())
    }

    /// Backward: dx and (when given) dw from x, w, dy and rstd; with `dres`, dx also gets dres
    /// added (`rmsnorm_bwd_dx_add_*`: the gradient x has from its other consumers, summed in the
    /// same pass). (The dw kernel is one thread per column over every row: skip it where w is
    /// frozen.)
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: cudarc::driver::DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        rstd: &CudaView<'_, f32>,
        dres: Option<&CudaView<'_, T>>,
        dx: &mut CudaViewMut<'_, T>,
        dw: Option<&mut CudaViewMut<'_, T>>,
        p: RmsNormParams,
    ) -> Result<()> {
        p.check("rmsnorm_bwd", x.len(), w.len(), dx.len(), rstd.len())?;
        crate::kernels::check_len("rmsnorm_bwd", "dy", dy.len(), p.rows * p.cols)?;
        if let Some(dres) = dres {
            crate::kernels::check_len("rmsnorm_bwd", "dres", dres.len(), p.rows * p.cols)?;
        }
        if let Some(dw) = &dw {
            crate::kernels::check_len("rmsnorm_bwd", "dw", dw.len(), p.cols)?;
        }
        let (m, n) = dims(p)?;
        let s = suffix::<T>()?;
        if m > 0 {
            let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as in `forward`.
            match dres {
                None => {
                    let f = modules.function("rmsnorm", &format!("rmsnorm_bwd_dx_{s}"))?;
                    unsafe { stream.launch_builder(&f).arg(x).arg(w).arg(dy).arg(rstd).arg(dx).arg(&m).arg(&n).launch(cfg) }
                }
                Some(dres) => {
                    let f = modules.function("rmsnorm", &format!("rmsnorm_bwd_dx_add_{s}"))?;
                    unsafe { stream.launch_builder(&f).arg(x).arg(w).arg(dy).arg(rstd).arg(dres).arg(dx).arg(&m).arg(&n).launch(cfg) }
                }
            }
            .map_err(launch_err)?;
        }
        if let (true, Some(dw)) = (p.cols > 0, dw) {
            // dW in two passes: chunks of rows side by side (enough blocks for two per
            // multiprocessor), then the chunks' sums in order.
            let col_blocks = (p.cols as u32).div_ceil(BLOCK) as usize;
            let (chunks, chunk) = dw_chunks(p.rows, col_blocks, modules.multiprocessors());
            // SAFETY: plain f32s; rmsnorm_bwd_dw_part writes every chunk's N sums (an empty
            // chunk its zeros) before rmsnorm_bwd_dw_sum reads them.
            let mut part = unsafe { stream.alloc::<f32>((chunks * p.cols).max(1)) }.map_err(|e| Error::cuda("rmsnorm_bwd: allocating dW partial sums", e))?;
            let (chunk_i, chunks_i) = (chunk as i32, chunks as i32);
            let f = modules.function("rmsnorm", &format!("rmsnorm_bwd_dw_part_{s}"))?;
            let cfg = LaunchConfig { grid_dim: (col_blocks as u32, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: matches rmsnorm_bwd_dw_part_* (x, dy, rstd, part, M, N, chunk); part holds
            // chunks·N floats, chunks·chunk >= M.
            unsafe { stream.launch_builder(&f).arg(x).arg(dy).arg(rstd).arg(&mut part).arg(&m).arg(&n).arg(&chunk_i).launch(cfg) }
                .map_err(launch_err)?;
            let f = modules.function("rmsnorm", &format!("rmsnorm_bwd_dw_sum_{s}"))?;
            let cfg = LaunchConfig { grid_dim: (col_blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: matches rmsnorm_bwd_dw_sum_* (part, dw, N, chunks); dw holds N values.
            unsafe { stream.launch_builder(&f).arg(&part).arg(dw).arg(&n).arg(&chunks_i).launch(cfg) }.map_err(launch_err)?;
        }
        Ok(())
    }

    /// (chunks, rows per chunk) of the dW pass over `rows` rows with `col_blocks` column blocks:
    /// about two blocks per multiprocessor, chunks of at least 64 rows, at most 65535 chunks.
    pub(crate) fn dw_chunks(rows: usize, col_blocks: usize, sms: usize) -> (usize, usize) {
        let want = (2 * sms).div_ceil(col_blocks.max(1)).min(rows.div_ceil(64)).clamp(1, 65535);
        let chunk = rows.div_ceil(want).max(1);
        (rows.div_ceil(chunk).max(1), chunk)
    }

    fn suffix<T>() -> Result<&'static str> {
        match std::mem::size_of::<T>() {
            4 => Ok("f32"),
            2 => Ok("bf16"),
            s => Err(Error::InvalidArgument(format!("rmsnorm: no CUDA kernel for {s}-byte elements"))),
        }
    }
}

pub mod wgsl {
    use super::RmsNormParams;
    pub use crate::device::wgpu::Precision;
    use crate::device::wgpu::{dispatch, grid, uniform, KernelCache};
    use crate::{Error, Result};

    pub const SOURCE: &str = wgsl_source!("rmsnorm.wgsl");
    const WG: u32 = 256;

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Params {
        rows: u32,
        cols: u32,
        eps: f32,
        _pad: u32,
    }

    fn params(p: RmsNormParams) -> Result<Params> {
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("rmsnorm: {what} = {v} exceeds u32")))
        };
        Ok(Params { rows: to_u32(p.rows, "rows")?, cols: to_u32(p.cols, "cols")?, eps: p.eps, _pad: 0 })
    }

    /// Checks each `(name, buffer, elements)` for elements of `bytes` bytes.
    fn check_sized(op: &'static str, bytes: usize, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<()> {
        for (name, b, elems) in bufs {
            crate::kernels::check_len(op, name, b.size() as usize / bytes, *elems)?;
        }
        Ok(())
    }

    fn check_buffers(op: &'static str, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<()> {
        check_sized(op, 4, bufs)
    }

    /// Forward: x `[M,N]`, w `[N]` in; y `[M,N]` out, all stored in `precision`; rstd `[M]`
    /// out in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rstd: &wgpu::Buffer,
        p: RmsNormParams,
        precision: Precision,
    ) -> Result<()> {
        let mn = p.rows * p.cols;
        check_sized("rmsnorm_fwd", precision.bytes(), &[("x", x, mn), ("w", w, p.cols), ("y", y, mn)])?;
        check_buffers("rmsnorm_fwd", &[("rstd", rstd, p.rows)])?;
        if p.rows == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, "rmsnorm_fwd", SOURCE, "rmsnorm_fwd", precision)?;
        let u = uniform(device, &params(p)?);
        let (gx, gy) = grid(p.rows as u32);
        dispatch(device, queue, &pipe, &[&u, x, w, y, rstd], (gx, gy, 1));
        Ok(())
    }

    /// Backward: dx `[M,N]` and dw `[N]` from x, w, dy (stored in `precision`) and rstd (f32).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        rstd: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        dw: &wgpu::Buffer,
        p: RmsNormParams,
        precision: Precision,
    ) -> Result<()> {
        let mn = p.rows * p.cols;
        check_sized("rmsnorm_bwd", precision.bytes(), &[("x", x, mn), ("w", w, p.cols), ("dy", dy, mn), ("dx", dx, mn), ("dw", dw, p.cols)])?;
        check_buffers("rmsnorm_bwd", &[("rstd", rstd, p.rows)])?;
        let u = uniform(device, &params(p)?);
        if p.rows > 0 {
            let pipe = kernels.pipeline_as(device, "rmsnorm_bwd_dx", SOURCE, "rmsnorm_bwd_dx", precision)?;
            let (gx, gy) = grid(p.rows as u32);
            dispatch(device, queue, &pipe, &[&u, x, w, dy, rstd, dx], (gx, gy, 1));
        }
        if p.cols > 0 {
            let pipe = kernels.pipeline_as(device, "rmsnorm_bwd_dw", SOURCE, "rmsnorm_bwd_dw", precision)?;
            // Bindings: x (1), dy (2), dw (3), rstd (4): the statistics keep their f32 binding.
            dispatch(device, queue, &pipe, &[&u, x, dy, dw, rstd], ((p.cols as u32).div_ceil(WG), 1, 1));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::cuda::dw_chunks;

    #[test]
    fn dw_chunks_cover_every_row_with_no_empty_chunk() {
        // Llama-1B's norm at 4 × 2048 tokens on an H100: 8 column blocks, 33 chunks of 249 rows.
        assert_eq!(dw_chunks(8192, 8, 132), (33, 249));
        for rows in [0, 1, 63, 64, 65, 1000, 8192, 100_000] {
            for col_blocks in [1, 8, 300] {
                let (c, chunk) = dw_chunks(rows, col_blocks, 132);
                assert!(c >= 1 && chunk >= 1 && c <= 65535, "{rows} rows: ({c}, {chunk})");
                assert!(c * chunk >= rows && (c - 1) * chunk < rows.max(1), "{rows} rows, {col_blocks} column blocks: ({c}, {chunk}) leaves a row out or a chunk empty");
            }
        }
    }
}
