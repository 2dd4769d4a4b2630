//! WGSL launchers over wgpu's types, f32. Buffers need STORAGE usage (and COPY_DST for the
//! ones the launchers zero: `r_new`, `c_new`); a buffer may be longer than its data.
#![allow(clippy::too_many_arguments)]

use super::{adamw_factors, check_dense, AdamWParams, Sm3Params};
use crate::device::wgpu::{grid, scratch, scratch_zeros, stand_in, uniform, KernelCache, Precision};
use crate::kernels::check_len;
use crate::{Error, Result};

pub const SM3_SOURCE: &str = wgsl_source!("optim_sm3.wgsl");
pub const SM3_SPARSE_SOURCE: &str = wgsl_source!("optim_sm3_sparse.wgsl");
pub const ADAMW_SOURCE: &str = wgsl_source!("optim_adamw.wgsl");
pub const SUMSQ_SOURCE: &str = wgsl_source!("optim_sumsq.wgsl");
const WG: u32 = 256;
const SM3_TILE: usize = 16;
const SUMSQ_MAX_GROUPS: usize = 256;
const FLAG_MOMENTUM: u32 = 1;
const FLAG_CLIP: u32 = 2;

/// The clip factor computed in-kernel from a device sum of squares (one f32, as
/// `sum_squares` writes it): `max_norm / (norm + 1e-6)` when `norm > max_norm > 0`, else 1.
pub struct DeviceClip<'a> {
    pub sum_sq: &'a wgpu::Buffer,
    pub max_norm: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Sm3Uniform {
    /// Dense: rows, cols, tile columns; sparse: active entries, rows, cols.
    dims: [u32; 3],
    flags: u32,
    lr: f32,
    eps: f32,
    beta1: f32,
    decay: f32,
    scale: f32,
    max_norm: f32,
    _pad: [u32; 2],
}

impl Sm3Uniform {
    fn new(dims: [u32; 3], flags: u32, p: &Sm3Params, max_norm: f32) -> Self {
        Sm3Uniform { dims, flags, lr: p.lr, eps: p.eps, beta1: p.beta1, decay: 1.0 - p.lr * p.weight_decay, scale: p.grad_scale, max_norm, _pad: [0; 2] }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamWUniform {
    n: u32,
    flags: u32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    scale: f32,
    max_norm: f32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SumSqUniform {
    n: u32,
    offset: u32,
    count: u32,
    _pad: u32,
}

fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds u32")))
}

fn check_buf(op: &'static str, what: &str, b: &wgpu::Buffer, elems: usize) -> Result<()> {
    check_len(op, what, b.size() as usize / 4, elems)
}

/// Records one dispatch over a 2-D grid of workgroups.
fn encode(device: &wgpu::Device, enc: &mut wgpu::CommandEncoder, pipeline: &wgpu::ComputePipeline, buffers: &[(u32, &wgpu::Buffer)], (x, y): (u32, u32)) {
    crate::device::wgpu::encode(device, enc, pipeline, buffers, (x, y, 1));
}

fn clip_parts<'a>(clip: Option<&DeviceClip<'a>>, none: &'a wgpu::Buffer) -> (u32, f32, &'a wgpu::Buffer) {
    match clip {
        Some(c) => (FLAG_CLIP, c.max_norm, c.sum_sq),
        None => (0, 0.0, none),
    }
}

/// Dense SM3 step on a row-major `[rows, cols]` matrix (a vector is `[L, 1]`). Reads
/// `r_old`, `c_old`; zeroes `r_new`, `c_new` (COPY_DST) and writes the new accumulators
/// there, as f32 bit patterns (swap them for the next step).
pub fn sm3(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    w: &wgpu::Buffer,
    g: &wgpu::Buffer,
    r_old: &wgpu::Buffer,
    c_old: &wgpu::Buffer,
    r_new: &wgpu::Buffer,
    c_new: &wgpu::Buffer,
    mom: Option<&wgpu::Buffer>,
    rows: usize,
    cols: usize,
    p: Sm3Params,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "sm3";
    let len = |b: &wgpu::Buffer| b.size() as usize / 4;
    check_dense(OP, rows * cols, rows * cols, len(r_old), len(c_old), mom.map(len), rows, cols)?;
    check_buf(OP, "w", w, rows * cols)?;
    check_buf(OP, "gradient", g, rows * cols)?;
    check_buf(OP, "r_new", r_new, rows)?;
    check_buf(OP, "c_new", c_new, cols)?;
    let tiles_c = cols.div_ceil(SM3_TILE);
    let tiles = to_u32(OP, "tiles", rows.div_ceil(SM3_TILE) * tiles_c)?;
    let (rows_u, cols_u) = (to_u32(OP, "rows", rows)?, to_u32(OP, "cols", cols)?);
    let mut enc = device.create_command_encoder(&Default::default());
    enc.clear_buffer(r_new, 0, None);
    enc.clear_buffer(c_new, 0, None);
    if tiles > 0 {
        // Two stand-ins: one buffer bound both read-write and read-only is a usage conflict.
        let (none, none_rw) = (stand_in(device, 0), stand_in(device, 1));
        let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
        let u = uniform(
            device,
            &Sm3Uniform::new([rows_u, cols_u, tiles_c as u32], clip_flag | if mom.is_some() { FLAG_MOMENTUM } else { 0 }, &p, max_norm),
        );
        let pipe = kernels.pipeline(device, "optim_sm3_dense", SM3_SOURCE, "sm3_dense")?;
        let m = mom.unwrap_or(&none_rw);
        let binds = [(0, &u), (1, w), (2, g), (3, r_old), (4, c_old), (5, r_new), (6, c_new), (7, m), (8, sum_sq)];
        encode(device, &mut enc, &pipe, &binds, grid(tiles));
    }
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}

/// Sparse SM3 step over the active entries `indices` (u32 flat `i·cols + j`, each at most
/// once; the order does not matter here) of a `[rows, cols]` matrix; `r` and `c` are
/// updated in place, rows and columns with no active entry keep theirs. `n` is the number
/// of active entries (the buffers may be longer). Indices past the matrix are skipped.
pub fn sm3_sparse(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    indices: &wgpu::Buffer,
    n: usize,
    delta: &wgpu::Buffer,
    g: &wgpu::Buffer,
    r: &wgpu::Buffer,
    c: &wgpu::Buffer,
    mom: Option<&wgpu::Buffer>,
    rows: usize,
    cols: usize,
    p: Sm3Params,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "sm3_sparse";
    check_buf(OP, "indices", indices, n)?;
    check_buf(OP, "delta", delta, n)?;
    check_buf(OP, "gradient", g, n)?;
    if let Some(m) = mom {
        check_buf(OP, "momentum", m, n)?;
    }
    check_buf(OP, "r", r, rows)?;
    check_buf(OP, "c", c, cols)?;
    if n == 0 || rows * cols == 0 {
        return Ok(());
    }
    // 0 is "untouched" in the kernel's encoding.
    let tmp = scratch_zeros(device, queue, (rows + cols) * 4);
    let (none, none_rw) = (stand_in(device, 0), stand_in(device, 1));
    let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
    let u = uniform(
        device,
        &Sm3Uniform::new([to_u32(OP, "active entries", n)?, to_u32(OP, "rows", rows)?, to_u32(OP, "cols", cols)?], clip_flag | if mom.is_some() { FLAG_MOMENTUM } else { 0 }, &p, max_norm),
    );
    let step = kernels.pipeline(device, "optim_sm3_sparse", SM3_SPARSE_SOURCE, "sm3_sparse")?;
    let finish = kernels.pipeline(device, "optim_sm3_sparse_finish", SM3_SPARSE_SOURCE, "sm3_sparse_finish")?;
    let m = mom.unwrap_or(&none_rw);
    let mut enc = device.create_command_encoder(&Default::default());
    let binds = [(0, &u), (1, indices), (2, delta), (3, g), (4, r), (5, c), (6, m), (7, sum_sq), (8, tmp.buffer())];
    encode(device, &mut enc, &step, &binds, grid((n as u32).div_ceil(WG)));
    let groups = to_u32(OP, "rows", rows.max(cols))?.div_ceil(WG);
    encode(device, &mut enc, &finish, &[(0, &u), (4, r), (5, c), (8, tmp.buffer())], grid(groups));
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}

/// Fused AdamW step over the first `n` elements of the buffers.
pub fn adamw(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    w: &wgpu::Buffer,
    g: &wgpu::Buffer,
    m: &wgpu::Buffer,
    v: &wgpu::Buffer,
    n: usize,
    p: AdamWParams,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "adamw";
    for (what, b) in [("w", w), ("gradient", g), ("m", m), ("v", v)] {
        check_buf(OP, what, b, n)?;
    }
    if p.step == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: step counts from 1")));
    }
    if n == 0 {
        return Ok(());
    }
    let none = stand_in(device, 0);
    let (clip_flag, max_norm, sum_sq) = clip_parts(clip, &none);
    let (decay, step_size, bc2_sqrt) = adamw_factors(&p);
    let u = uniform(
        device,
        &AdamWUniform {
            n: to_u32(OP, "n", n)?,
            flags: clip_flag,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            decay,
            step_size,
            bc2_sqrt,
            scale: p.grad_scale,
            max_norm,
            _pad: [0; 2],
        },
    );
    let pipe = kernels.pipeline(device, "optim_adamw", ADAMW_SOURCE, "adamw")?;
    let mut enc = device.create_command_encoder(&Default::default());
    encode(device, &mut enc, &pipe, &[(0, &u), (1, w), (2, g), (3, m), (4, v), (5, sum_sq)], grid((n as u32).div_ceil(WG)));
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}

/// Writes the sum of squares of the first `n` elements of every `(buffer, n, precision)` in
/// `grads` (f32, or f16 read two to a word) to `sum_sq[0]` (f32): per-workgroup partials,
/// then one workgroup sums them in order.
pub fn sum_squares(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    grads: &[(&wgpu::Buffer, usize, Precision)],
    sum_sq: &wgpu::Buffer,
) -> Result<()> {
    const OP: &str = "sum_squares";
    check_buf(OP, "sum_sq", sum_sq, 1)?;
    let groups = |n: usize| n.div_ceil(4 * WG as usize).min(SUMSQ_MAX_GROUPS);
    for (k, (b, n, pr)) in grads.iter().enumerate() {
        let words = if *pr == Precision::F16 { n.div_ceil(2) } else { *n };
        check_buf(OP, &format!("gradient {k}"), b, words)?;
        to_u32(OP, "n", *n)?;
    }
    let total: usize = grads.iter().map(|(_, n, _)| groups(*n)).sum();
    // Each workgroup writes its partial before the finish reads them.
    let partials = scratch(device, total * 4);
    let part = kernels.pipeline(device, "optim_sumsq_partial", SUMSQ_SOURCE, "sumsq_partial")?;
    let part16 = kernels.pipeline(device, "optim_sumsq_partial_f16", SUMSQ_SOURCE, "sumsq_partial_f16")?;
    let finish = kernels.pipeline(device, "optim_sumsq_finish", SUMSQ_SOURCE, "sumsq_finish")?;
    let mut enc = device.create_command_encoder(&Default::default());
    let mut offset = 0;
    for (b, n, pr) in grads {
        let gr = groups(*n);
        if gr == 0 {
            continue;
        }
        let u = uniform(device, &SumSqUniform { n: *n as u32, offset: offset as u32, count: 0, _pad: 0 });
        match pr {
            Precision::F32 => encode(device, &mut enc, &part, &[(0, &u), (1, partials.buffer()), (2, b)], (gr as u32, 1)),
            Precision::F16 => encode(device, &mut enc, &part16, &[(0, &u), (1, partials.buffer()), (4, b)], (gr as u32, 1)),
        }
        offset += gr;
    }
    let u = uniform(device, &SumSqUniform { n: 0, offset: 0, count: to_u32(OP, "partials", total)?, _pad: 0 });
    encode(device, &mut enc, &finish, &[(0, &u), (1, partials.buffer()), (3, sum_sq)], (1, 1));
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}
