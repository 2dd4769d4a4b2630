//! Rotary position embedding in the Hugging Face `rotate_half` convention: element i of a head
//! pairs with element i + D/2. For a token at position p and `f_i = p * inv_freq[i]`
//! (i < D/2):
//!
//! ```text
//! y[i]       = x[i] * cos f_i - x[i + D/2] * sin f_i
//! y[i + D/2] = x[i + D/2] * cos f_i + x[i] * sin f_i
//! ```
//!
//! Backward is the transposed rotation:
//!
//! ```text
//! dx[i]       =  dy[i] * cos f_i + dy[i + D/2] * sin f_i
//! dx[i + D/2] = -dy[i] * sin f_i + dy[i + D/2] * cos f_i
//! ```
//!
//! Layout: x `[tokens, heads, D]` row-major; positions `[tokens]` (i32); inv_freq `[D/2]` f32.
//! Angles are computed as f32 `p * inv_freq[i]` and f32 cos/sin, as transformers does. The
//! reference rounds the angle to f32 the same way and takes its cos/sin in f64, so it states
//! the function every path computes; the paths then differ from it only by their cos/sin
//! error and the rotation's rounding.
//!
//! Kernels: `kernels-cuda/rope.cu` (f32, bf16), `kernels-wgsl/rope.wgsl` (f32); one launch per
//! direction. `rope.cu` also fuses a per-head RMSNorm before the rotation (Qwen3's q/k norms:
//! `norm_rope_*`, one launch each way for head dims that are multiples of 64 up to 256; see
//! [`norm_rope_fits`]). They compute cos/sin with their own range reduction and polynomials (within
//! 1.3e-7 absolute for angles up to 2^20 radians), not the vendor's sin/cos: WGSL only bounds
//! those to 2^-11 on [-pi, pi], and RoPE angles reach the sequence length in radians.

use crate::kernels::check_len;
use crate::{Error, Result};

/// Whether a pass rotates forward (the forward op) or backward (its gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

impl Direction {
    fn op(self) -> &'static str {
        match self {
            Direction::Forward => "rope_fwd",
            Direction::Backward => "rope_bwd",
        }
    }

    /// The sign the kernels give sin: +1 forward, -1 backward.
    fn sign(self) -> f32 {
        match self {
            Direction::Forward => 1.0,
            Direction::Backward => -1.0,
        }
    }
}

/// Sizes of one RoPE call on a GPU: x and y `[tokens, heads, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    /// T: tokens (all sequences of a packed batch together).
    pub tokens: usize,
    /// Heads per token (H for queries, G for keys).
    pub heads: usize,
    /// D: head dim, even.
    pub head_dim: usize,
}

/// Whether the fused per-head RMSNorm + RoPE kernels take this head dim: one warp per head,
/// each lane holding D/64 rotation pairs (at most 4).
pub fn norm_rope_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(64) && (64..=256).contains(&head_dim)
}

impl RopeParams {
    /// Lengths of x, positions, inv_freq and y; errors name `op` (the launcher's kernel).
    fn check(&self, op: &'static str, dir: Direction, x: usize, positions: usize, inv_freq: usize, y: usize) -> Result<()> {
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::InvalidArgument(format!("{op}: head_dim = {} must be even", self.head_dim)));
        }
        let n = self.tokens * self.heads * self.head_dim;
        let (xn, yn) = if dir == Direction::Forward { ("x", "y") } else { ("dy", "dx") };
        check_len(op, xn, x, n)?;
        check_len(op, "positions", positions, self.tokens)?;
        check_len(op, "inv_freq", inv_freq, self.head_dim / 2)?;
        check_len(op, yn, y, n)
    }

    /// (tokens, heads, D/2) as the kernels' 32-bit integers.
    fn dims(&self, op: &str) -> Result<(u32, u32, u32)> {
        let to_u32 = |v: usize, what: &str| {
            i32::try_from(v)
                .map(|v| v as u32)
                .map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds i32")))
        };
        let n = self.tokens.saturating_mul(self.heads).saturating_mul(self.head_dim);
        to_u32(n, "tokens * heads * head_dim")?;
        Ok((to_u32(self.tokens, "tokens")?, to_u32(self.heads, "heads")?, to_u32(self.head_dim / 2, "head_dim / 2")?))
    }
}

pub mod reference {
    use super::Direction;

    pub fn rope(x: &[f64], positions: &[i32], inv_freq: &[f32], heads: usize, dir: Direction) -> Vec<f64> {
        let half = inv_freq.len();
        let d = 2 * half;
        let sign = if dir == Direction::Forward { 1.0 } else { -1.0 };
        let mut y = vec![0.0; x.len()];
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..heads {
                let base = (t * heads + h) * d;
                for i in 0..half {
                    // The angle rounded to f32 as every path computes it; its cos/sin in f64.
                    let f = (p as f32 * inv_freq[i]) as f64;
                    let (s, c) = (sign * f.sin(), f.cos());
                    let (a, b) = (x[base + i], x[base + i + half]);
                    y[base + i] = a * c - b * s;
                    y[base + i + half] = b * c + a * s;
                }
            }
        }
        y
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use super::Direction;

    pub fn rope(x: &[f32], y: &mut [f32], positions: &[i32], inv_freq: &[f32], heads: usize, dir: Direction) {
        let half = inv_freq.len();
        let d = 2 * half;
        let row = heads * d;
        y.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions.par_iter()).for_each(|((y, x), &p)| {
            // cos/sin once per token, shared by its heads.
            let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
            for i in 0..half {
                let f = p as f32 * inv_freq[i];
                cos[i] = f.cos();
                sin[i] = if dir == Direction::Forward { f.sin() } else { -f.sin() };
            }
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    y[i] = a * cos[i] - b * sin[i];
                    y[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::{Direction, RopeParams};
    use crate::device::cuda::ModuleCache;
    use crate::{Error, Result};

    const BLOCK: u32 = 128;

    /// Rotates `x` into `y` (forward), or `dy` into `dx` (backward), both `[T, H, D]`, for f32
    /// (`T = f32`, kernel `rope_f32`) or bf16 bits (`T = u16`, `rope_bf16`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        x: &CudaView<'_, T>,
        positions: &CudaView<'_, i32>,
        inv_freq: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, T>,
        p: RopeParams,
        dir: Direction,
    ) -> Result<()> {
        let op = dir.op();
        p.check(op, dir, x.len(), positions.len(), inv_freq.len(), y.len())?;
        let (tokens, heads, half) = p.dims(op)?;
        if tokens == 0 || heads == 0 || half == 0 {
            return Ok(());
        }
        let f = modules.function("rope", &format!("rope_{}", suffix::<T>(op)?))?;
        let cfg = LaunchConfig { grid_dim: (tokens, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let (t, h, hf, sign) = (tokens as i32, heads as i32, half as i32, dir.sign());
        // SAFETY: argument types match the kernel signature; lengths checked above.
        unsafe {
            stream.launch_builder(&f).arg(x).arg(positions).arg(inv_freq).arg(y).arg(&t).arg(&h).arg(&hf).arg(&sign).launch(cfg)
        }
        .map_err(|e| Error::cuda(format!("launching {op}"), e))?;
        Ok(())
    }

    /// Warps per block of the fused kernels (`NR_WARPS` in rope.cu).
    const NORM_ROPE_WARPS: usize = 8;

    /// Checks the lengths `[x, positions, inv_freq, y]` (as `RopeParams::check`), w's and rstd's.
    fn norm_rope_check(op: &'static str, dir: Direction, p: RopeParams, [x, positions, inv_freq, y]: [usize; 4], w: usize, rstd: usize) -> Result<(u32, u32, u32)> {
        if !super::norm_rope_fits(p.head_dim) {
            return Err(Error::InvalidArgument(format!("{op}: head_dim = {} is not a multiple of 64 in 64..=256 (use rmsnorm then rope)", p.head_dim)));
        }
        p.check(op, dir, x, positions, inv_freq, y)?;
        crate::kernels::check_len(op, "w", w, p.head_dim)?;
        crate::kernels::check_len(op, "rstd", rstd, p.tokens * p.heads)?;
        p.dims(op)
    }

    /// The kernel suffix of the element type: `f32`, or `bf16` for u16 bits.
    fn suffix<T>(op: &str) -> Result<&'static str> {
        match std::mem::size_of::<T>() {
            4 => Ok("f32"),
            2 => Ok("bf16"),
            s => Err(Error::InvalidArgument(format!("{op}: no CUDA kernel for {s}-byte elements"))),
        }
    }

    /// Per-head RMSNorm (weight `w [D]`, `eps`) then the forward rotation, in one pass:
    /// `y = rope(rmsnorm(x))` with the normed value rounded to `T` between them, as the two
    /// kernels store it; `rstd [T·H]` (f32) is kept for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_rope_forward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        positions: &CudaView<'_, i32>,
        inv_freq: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, T>,
        rstd: &mut CudaViewMut<'_, f32>,
        p: RopeParams,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "norm_rope_fwd";
        let (tokens, heads, half) = norm_rope_check(OP, Direction::Forward, p, [x.len(), positions.len(), inv_freq.len(), y.len()], w.len(), rstd.len())?;
        let rows = p.tokens * p.heads;
        if rows == 0 {
            return Ok(());
        }
        let f = modules.function("rope", &format!("norm_rope_fwd_{}", suffix::<T>(OP)?))?;
        let blocks = rows.div_ceil(NORM_ROPE_WARPS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32 * NORM_ROPE_WARPS as u32, 1, 1), shared_mem_bytes: 0 };
        let (t, h, hf) = (tokens as i32, heads as i32, half as i32);
        // SAFETY: argument types match norm_rope_fwd_*; lengths checked above.
        unsafe { stream.launch_builder(&f).arg(x).arg(w).arg(positions).arg(inv_freq).arg(y).arg(rstd).arg(&t).arg(&h).arg(&hf).arg(&eps).launch(cfg) }
            .map_err(|e| Error::cuda(format!("launching {OP}"), e))?;
        Ok(())
    }

    /// The backward of [`norm_rope_forward`]: dx from x, w, dy and rstd in one pass, and dw
    /// when asked (each block's sums in the same pass, then `rmsnorm_bwd_dw_sum` adds them in
    /// order).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_rope_backward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        positions: &CudaView<'_, i32>,
        inv_freq: &CudaView<'_, f32>,
        rstd: &CudaView<'_, f32>,
        dx: &mut CudaViewMut<'_, T>,
        dw: Option<&mut CudaViewMut<'_, T>>,
        p: RopeParams,
    ) -> Result<()> {
        const OP: &str = "norm_rope_bwd";
        let (tokens, heads, half) = norm_rope_check(OP, Direction::Backward, p, [dy.len(), positions.len(), inv_freq.len(), dx.len()], w.len(), rstd.len())?;
        crate::kernels::check_len(OP, "x", x.len(), dx.len())?;
        if let Some(dw) = &dw {
            crate::kernels::check_len(OP, "dw", dw.len(), p.head_dim)?;
        }
        let s = suffix::<T>(OP)?;
        let rows = p.tokens * p.heads;
        // Consecutive rows per block: about four blocks per multiprocessor, whole warps.
        let chunk = rows.div_ceil(4 * modules.multiprocessors().max(1)).next_multiple_of(NORM_ROPE_WARPS).max(NORM_ROPE_WARPS);
        let blocks = rows.div_ceil(chunk);
        let launch_err = |e| Error::cuda(format!("launching {OP}"), e);
        // Not zeroed: each block writes all D of its sums (read only when rows > 0).
        let mut part = match &dw {
            // SAFETY: plain f32s, written by norm_rope_bwd before rmsnorm_bwd_dw_sum reads them.
            Some(_) => Some(unsafe { stream.alloc::<f32>((blocks * p.head_dim).max(1)) }.map_err(|e| Error::cuda(format!("{OP}: allocating dW partial sums"), e))?),
            None => None,
        };
        if rows > 0 {
            let f = modules.function("rope", &format!("norm_rope_bwd_{s}"))?;
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32 * NORM_ROPE_WARPS as u32, 1, 1), shared_mem_bytes: 0 };
            let (t, h, hf, ch) = (tokens as i32, heads as i32, half as i32, chunk as i32);
            let null: u64 = 0;
            let mut b = stream.launch_builder(&f);
            b.arg(x).arg(w).arg(dy).arg(positions).arg(inv_freq).arg(rstd).arg(dx);
            match part.as_mut() {
                Some(pt) => b.arg(pt),
                None => b.arg(&null),
            };
            // SAFETY: argument types match norm_rope_bwd_* (a null device pointer for part when
            // no dw is asked); lengths checked above; part holds blocks·D floats.
            unsafe { b.arg(&t).arg(&h).arg(&hf).arg(&ch).launch(cfg) }.map_err(launch_err)?;
        }
        if let (Some(dw), Some(part)) = (dw, part) {
            let f = modules.function("rmsnorm", &format!("rmsnorm_bwd_dw_sum_{s}"))?;
            let cfg = LaunchConfig { grid_dim: ((p.head_dim as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (n, chunks) = (p.head_dim as i32, if rows == 0 { 0 } else { blocks as i32 });
            // SAFETY: matches rmsnorm_bwd_dw_sum_* (part, dw, N, chunks); dw holds D values.
            unsafe { stream.launch_builder(&f).arg(&part).arg(dw).arg(&n).arg(&chunks).launch(cfg) }.map_err(launch_err)?;
        }
        Ok(())
    }
}

pub mod wgsl {
    use super::{Direction, RopeParams};
    pub use crate::device::wgpu::Precision;
    use crate::device::wgpu::{dispatch, grid, uniform, KernelCache};
    use crate::Result;

    pub const SOURCE: &str = wgsl_source!("rope.wgsl");

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Params {
        tokens: u32,
        heads: u32,
        half: u32,
        sign: f32,
    }

    /// Rotates `x` into `y` (forward), or `dy` into `dx` (backward), both `[T, H, D]` stored
    /// in `precision` (f32 math); positions `[T]` i32, inv_freq `[D/2]` f32.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        x: &wgpu::Buffer,
        positions: &wgpu::Buffer,
        inv_freq: &wgpu::Buffer,
        y: &wgpu::Buffer,
        p: RopeParams,
        dir: Direction,
        precision: Precision,
    ) -> Result<()> {
        let op = dir.op();
        let elems = |b: &wgpu::Buffer| b.size() as usize / 4;
        let tensor = |b: &wgpu::Buffer| b.size() as usize / precision.bytes();
        p.check(dir.op(), dir, tensor(x), elems(positions), elems(inv_freq), tensor(y))?;
        let (tokens, heads, half) = p.dims(op)?;
        if tokens == 0 || heads == 0 || half == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, "rope", SOURCE, "rope", precision)?;
        let u = uniform(device, &Params { tokens, heads, half, sign: dir.sign() });
        let (gx, gy) = grid(tokens);
        dispatch(device, queue, &pipe, &[&u, x, positions, inv_freq, y], (gx, gy, 1));
        Ok(())
    }
}
