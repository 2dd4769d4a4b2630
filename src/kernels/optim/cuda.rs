//! CUDA launchers over cudarc's types. Parameters `T = f32` (kernel suffix `f32`) or bf16 bits
//! (`T = u16`, suffix `bf16`, with an optional f32 master copy); gradients have the parameters'
//! type; moments, momenta and accumulators are f32.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{adamw_factors, check_dense, AdamWParams, Sm3Params};
use crate::device::cuda::ModuleCache;
use crate::kernels::check_len;
use crate::{Error, Result};

/// Rows and columns of a dense SM3 tile (one block of 32×8 threads); see optim.cu.
const SM3_TILE: (usize, usize) = (64, 128);
const BLOCK: u32 = 256;
/// At most this many f64 partials per gradient buffer in `sum_squares`.
const SUMSQ_MAX_BLOCKS: usize = 1024;

/// The clip factor computed in-kernel from a device sum of squares (as `sum_squares`
/// writes it): `max_norm / (norm + 1e-6)` when `norm > max_norm > 0`, else 1.
pub struct DeviceClip<'a> {
    /// One f64: the sum of squares of every gradient.
    pub sum_sq: CudaView<'a, f64>,
    pub max_norm: f32,
}

fn suffix<T>(op: &str) -> Result<&'static str> {
    match std::mem::size_of::<T>() {
        4 => Ok("f32"),
        2 => Ok("bf16"),
        s => Err(Error::InvalidArgument(format!("{op}: no CUDA kernel for {s}-byte parameters"))),
    }
}

fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds i32")))
}

fn launch_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::cuda(format!("launching {op}"), e)
}

/// Checks the master copy: only with bf16 parameters, and as long as them.
fn check_master<T>(op: &'static str, master: Option<usize>, n: usize) -> Result<()> {
    match master {
        Some(_) if std::mem::size_of::<T>() == 4 => {
            Err(Error::InvalidArgument(format!("{op}: a master copy goes with bf16 parameters, these are f32")))
        }
        Some(m) => check_len(op, "master", m, n),
        None => Ok(()),
    }
}

/// Pushes an optional buffer, or a null pointer.
fn push_opt<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a mut CudaViewMut<'_, T>>, null: &'a u64) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(null),
    };
}

/// Dense SM3 step on a row-major `[rows, cols]` matrix (a vector is `[L, 1]`). Reads `r_old`,
/// `c_old`; zeroes `r_new`, `c_new` and writes the new accumulators there (swap them for
/// the next step). With `master` (bf16 only) the f32 master is updated and `w` gets its
/// rounded value.
pub fn sm3<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    w: &mut CudaViewMut<'_, T>,
    g: &CudaView<'_, T>,
    master: Option<&mut CudaViewMut<'_, f32>>,
    r_old: &CudaView<'_, f32>,
    c_old: &CudaView<'_, f32>,
    r_new: &mut CudaViewMut<'_, f32>,
    c_new: &mut CudaViewMut<'_, f32>,
    mom: Option<&mut CudaViewMut<'_, f32>>,
    rows: usize,
    cols: usize,
    p: Sm3Params,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "sm3";
    check_dense(OP, w.len(), g.len(), r_old.len(), c_old.len(), mom.as_ref().map(|m| m.len()), rows, cols)?;
    check_len(OP, "r_new", r_new.len(), rows)?;
    check_len(OP, "c_new", c_new.len(), cols)?;
    check_master::<T>(OP, master.as_ref().map(|m| m.len()), rows * cols)?;
    let (r, c) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    stream.memset_zeros(r_new).map_err(launch_err(OP))?;
    stream.memset_zeros(c_new).map_err(launch_err(OP))?;
    if rows * cols == 0 {
        return Ok(());
    }
    let s = suffix::<T>(OP)?;
    let f = modules.function("optim", &format!("sm3_dense_{s}"))?;
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(SM3_TILE.1) as u32, rows.div_ceil(SM3_TILE.0).min(65535) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let decay = 1.0 - p.lr * p.weight_decay;
    let max_norm = clip.map_or(0.0, |c| c.max_norm);
    let null = 0u64;
    let mut b = stream.launch_builder(&f);
    b.arg(w).arg(g);
    if s == "bf16" {
        push_opt(&mut b, master, &null);
    }
    b.arg(r_old).arg(c_old).arg(r_new).arg(c_new);
    push_opt(&mut b, mom, &null);
    match clip {
        Some(c) => b.arg(&c.sum_sq),
        None => b.arg(&null),
    };
    b.arg(&r).arg(&c).arg(&p.lr).arg(&p.eps).arg(&p.beta1).arg(&decay).arg(&p.grad_scale).arg(&max_norm);
    // SAFETY: argument types and order match the kernel; lengths checked above.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
    Ok(())
}

/// Sparse SM3 step (f32) over the active entries `indices` (flat `i·cols + j`, each at most
/// once) of a `[rows, cols]` matrix; `r` and `c` are updated in place (rows and columns
/// with no active entry keep theirs). Indices outside the matrix are skipped by the kernel;
/// unlike `cpu::sm3_sparse` the order of the indices does not matter here.
pub fn sm3_sparse(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    indices: &CudaView<'_, u32>,
    delta: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    r: &mut CudaViewMut<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
    mom: Option<&mut CudaViewMut<'_, f32>>,
    rows: usize,
    cols: usize,
    p: Sm3Params,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "sm3_sparse";
    let n = indices.len();
    check_len(OP, "delta", delta.len(), n)?;
    check_len(OP, "gradient", g.len(), n)?;
    if let Some(m) = &mom {
        check_len(OP, "momentum", m.len(), n)?;
    }
    check_len(OP, "r", r.len(), rows)?;
    check_len(OP, "c", c.len(), cols)?;
    let (n_i, r_i, c_i) = (to_i32(OP, "active entries", n)?, to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    if n == 0 || rows * cols == 0 {
        return Ok(());
    }
    let mut tmp = stream.alloc_zeros::<u32>(rows + cols).map_err(|e| Error::cuda(format!("{OP}: scratch of {} u32", rows + cols), e))?;
    let (mut r_tmp, mut c_tmp) = tmp.split_at_mut(rows);
    let decay = 1.0 - p.lr * p.weight_decay;
    let max_norm = clip.map_or(0.0, |c| c.max_norm);
    let null = 0u64;
    let f = modules.function("optim", "sm3_sparse_f32")?;
    let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    {
        let (r_old, c_old) = (r.as_view(), c.as_view());
        let mut b = stream.launch_builder(&f);
        b.arg(indices).arg(delta).arg(g).arg(&r_old).arg(&c_old).arg(&mut r_tmp).arg(&mut c_tmp);
        push_opt(&mut b, mom, &null);
        match clip {
            Some(c) => b.arg(&c.sum_sq),
            None => b.arg(&null),
        };
        b.arg(&n_i).arg(&r_i).arg(&c_i).arg(&p.lr).arg(&p.eps).arg(&p.beta1).arg(&decay).arg(&p.grad_scale).arg(&max_norm);
        // SAFETY: argument types and order match the kernel; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
    }
    let f = modules.function("optim", "sm3_sparse_finish")?;
    let cfg = LaunchConfig {
        grid_dim: ((rows.max(cols) as u32).div_ceil(BLOCK), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above.
    unsafe { stream.launch_builder(&f).arg(r).arg(c).arg(&mut r_tmp).arg(&mut c_tmp).arg(&r_i).arg(&c_i).launch(cfg) }
        .map_err(launch_err(OP))?;
    Ok(())
}

/// Fused AdamW step over `n` parameters (the length of `w`).
pub fn adamw<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    w: &mut CudaViewMut<'_, T>,
    g: &CudaView<'_, T>,
    master: Option<&mut CudaViewMut<'_, f32>>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    p: AdamWParams,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "adamw";
    let n = w.len();
    check_len(OP, "gradient", g.len(), n)?;
    check_len(OP, "m", m.len(), n)?;
    check_len(OP, "v", v.len(), n)?;
    check_master::<T>(OP, master.as_ref().map(|m| m.len()), n)?;
    if p.step == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: step counts from 1")));
    }
    if n == 0 {
        return Ok(());
    }
    let s = suffix::<T>(OP)?;
    let f = modules.function("optim", &format!("adamw_{s}"))?;
    let blocks = u32::try_from(n.div_ceil(BLOCK as usize))
        .map_err(|_| Error::InvalidArgument(format!("{OP}: {n} parameters is too many for one launch")))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let (decay, step_size, bc2_sqrt) = adamw_factors(&p);
    let max_norm = clip.map_or(0.0, |c| c.max_norm);
    let (null, n_i) = (0u64, n as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(w).arg(g);
    if s == "bf16" {
        push_opt(&mut b, master, &null);
    }
    b.arg(m).arg(v);
    match clip {
        Some(c) => b.arg(&c.sum_sq),
        None => b.arg(&null),
    };
    b.arg(&n_i).arg(&p.beta1).arg(&p.beta2).arg(&p.eps).arg(&decay).arg(&step_size).arg(&bc2_sqrt).arg(&p.grad_scale).arg(&max_norm);
    // SAFETY: argument types and order match the kernel; lengths checked above.
    unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
    Ok(())
}

/// Blocks of 256 threads for a gradient of `n` elements: a function of `n` only, so the
/// summation order (and the result) is the same run to run.
fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(4 * BLOCK as usize).min(SUMSQ_MAX_BLOCKS)
}

/// Tensors per `_multi` launch (`MULTI_TENSORS` in optim.cu): their pointers travel as one
/// kernel parameter, which the driver caps at 4 KiB.
pub const MULTI_TENSORS: usize = 40;

/// `AdamWList<T>` of optim.cu: up to `MULTI_TENSORS` tensors' pointers and lengths, and the
/// first block of each (`first[count]` = the grid).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWList {
    count: i32,
    pad: i32,
    first: [i32; MULTI_TENSORS + 1],
    n: [i64; MULTI_TENSORS],
    w: [u64; MULTI_TENSORS],
    g: [u64; MULTI_TENSORS],
    master: [u64; MULTI_TENSORS],
    m: [u64; MULTI_TENSORS],
    v: [u64; MULTI_TENSORS],
    half: [u64; MULTI_TENSORS],
}
// SAFETY: plain integers laid out as the kernel's struct (repr(C), the same field order).
unsafe impl DeviceRepr for AdamWList {}

/// `SumsqList<T>` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SumsqList {
    count: i32,
    pad: i32,
    first: [i32; MULTI_TENSORS + 1],
    n: [i64; MULTI_TENSORS],
    g: [u64; MULTI_TENSORS],
}
// SAFETY: as above.
unsafe impl DeviceRepr for SumsqList {}
// The kernel's structs have these sizes (optim.cu asserts them too).
const _: () = assert!(std::mem::size_of::<AdamWList>() == 2416 && std::mem::size_of::<SumsqList>() == 816);

/// One tensor of an `adamw_multi` step.
pub struct AdamWTensor<'a, T> {
    /// The parameter written: updated in place, or, with `master`, a buffer that gets the new
    /// value (rounded for bf16) while the master is read and updated.
    pub w: CudaViewMut<'a, T>,
    pub g: CudaView<'a, T>,
    /// The f32 master (f32 or bf16 parameters), or None: `w` is read and updated in place.
    pub master: Option<CudaViewMut<'a, f32>>,
    pub m: CudaViewMut<'a, f32>,
    pub v: CudaViewMut<'a, f32>,
    /// f32 parameters only: a buffer that also gets the new value rounded to bf16 (bf16 bits),
    /// the copy a bf16 model reads (bit-identical to `cast` of `w`).
    pub half: Option<CudaViewMut<'a, u16>>,
}

/// AdamW steps of many tensors, `MULTI_TENSORS` per launch: the same bits as `adamw` on each
/// (one launch per tensor), for a step of many small tensors (LoRA's factors) at a fraction
/// of the launches. With a master, an f32 parameter is written to `w` beside the master, so
/// the caller gets the new parameter without a copy.
pub fn adamw_multi<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    tensors: &mut [AdamWTensor<'_, T>],
    p: AdamWParams,
    clip: Option<&DeviceClip<'_>>,
) -> Result<()> {
    const OP: &str = "adamw_multi";
    if p.step == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: step counts from 1")));
    }
    for (i, t) in tensors.iter().enumerate() {
        let n = t.w.len();
        let what = |x: &str| format!("tensor {i}'s {x}");
        check_len(OP, &what("gradient"), t.g.len(), n)?;
        check_len(OP, &what("m"), t.m.len(), n)?;
        check_len(OP, &what("v"), t.v.len(), n)?;
        if let Some(master) = &t.master {
            check_len(OP, &what("master"), master.len(), n)?;
        }
        if let Some(half) = &t.half {
            if std::mem::size_of::<T>() != 4 {
                return Err(Error::InvalidArgument(format!("{OP}: tensor {i} asks for a bf16 copy of 16-bit parameters")));
            }
            check_len(OP, &what("bf16 copy"), half.len(), n)?;
        }
    }
    let s = suffix::<T>(OP)?;
    let f = modules.function("optim", &format!("adamw_multi_{s}"))?;
    let (decay, step_size, bc2_sqrt) = adamw_factors(&p);
    let max_norm = clip.map_or(0.0, |c| c.max_norm);
    let null = 0u64;
    for chunk in tensors.chunks_mut(MULTI_TENSORS) {
        let count = chunk.len();
        let mut l = AdamWList { count: count as i32, pad: 0, first: [0; MULTI_TENSORS + 1], n: [0; MULTI_TENSORS], w: [0; MULTI_TENSORS], g: [0; MULTI_TENSORS], master: [0; MULTI_TENSORS], m: [0; MULTI_TENSORS], v: [0; MULTI_TENSORS], half: [0; MULTI_TENSORS] };
        let mut guards = Vec::with_capacity(6 * count);
        let mut blocks = 0usize;
        for (k, t) in chunk.iter_mut().enumerate() {
            l.first[k] = to_i32(OP, "blocks", blocks)?;
            l.n[k] = t.w.len() as i64;
            blocks += t.w.len().div_ceil(BLOCK as usize);
            let (w, gw) = t.w.device_ptr_mut(stream);
            let (g, gg) = t.g.device_ptr(stream);
            let (m, gm) = t.m.device_ptr_mut(stream);
            let (v, gv) = t.v.device_ptr_mut(stream);
            (l.w[k], l.g[k], l.m[k], l.v[k]) = (w, g, m, v);
            guards.extend([gw, gg, gm, gv]);
            if let Some(master) = t.master.as_mut() {
                let (mp, gmp) = master.device_ptr_mut(stream);
                l.master[k] = mp;
                guards.push(gmp);
            }
            if let Some(half) = t.half.as_mut() {
                let (hp, ghp) = half.device_ptr_mut(stream);
                l.half[k] = hp;
                guards.push(ghp);
            }
        }
        l.first[count] = to_i32(OP, "blocks", blocks)?;
        if blocks == 0 {
            continue;
        }
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = stream.launch_builder(&f);
        b.arg(&l);
        match clip {
            Some(c) => b.arg(&c.sum_sq),
            None => b.arg(&null),
        };
        b.arg(&p.beta1).arg(&p.beta2).arg(&p.eps).arg(&decay).arg(&step_size).arg(&bc2_sqrt).arg(&p.grad_scale).arg(&max_norm);
        // SAFETY: the list's pointers are live views of the lengths it states (checked above),
        // kept borrowed by `guards` until the launch is queued; the rest match the kernel.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        drop(guards);
    }
    Ok(())
}

/// Writes the sum of squares of every element of every buffer in `grads` to `sum_sq[0]`
/// (f64), deterministically: f64 partials per block (`MULTI_TENSORS` buffers per launch),
/// then one block sums them in order.
pub fn sum_squares<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    grads: &[CudaView<'_, T>],
    sum_sq: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    const OP: &str = "sum_squares";
    check_len(OP, "sum_sq", sum_sq.len(), 1)?;
    let s = suffix::<T>(OP)?;
    let total: usize = grads.iter().map(|g| sumsq_blocks(g.len())).sum();
    // SAFETY: plain f64s; the launches below write all `total` of them (each block its own
    // slot, the chunks' blocks back to back), and sumsq_finish reads no more than `total`.
    let mut partials = unsafe { stream.alloc::<f64>(total.max(1)) }.map_err(|e| Error::cuda(format!("{OP}: {total} partials"), e))?;
    let f = modules.function("optim", &format!("sumsq_partial_multi_{s}"))?;
    let mut offset = 0;
    for chunk in grads.chunks(MULTI_TENSORS) {
        let mut l = SumsqList { count: chunk.len() as i32, pad: 0, first: [0; MULTI_TENSORS + 1], n: [0; MULTI_TENSORS], g: [0; MULTI_TENSORS] };
        let mut guards = Vec::with_capacity(chunk.len());
        let mut blocks = 0usize;
        for (k, g) in chunk.iter().enumerate() {
            l.first[k] = blocks as i32;
            l.n[k] = g.len() as i64;
            blocks += sumsq_blocks(g.len());
            let (ptr, guard) = g.device_ptr(stream);
            l.g[k] = ptr;
            guards.push(guard);
        }
        l.first[chunk.len()] = blocks as i32;
        if blocks == 0 {
            continue;
        }
        let mut part = partials.slice_mut(offset..offset + blocks);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the list's pointers are live views of the lengths it states, kept borrowed by
        // `guards`; the partials slice holds one value per block (at most 1024 per buffer and
        // 40 buffers per launch, so the counts fit an i32).
        unsafe { stream.launch_builder(&f).arg(&l).arg(&mut part).launch(cfg) }.map_err(launch_err(OP))?;
        drop(guards);
        offset += blocks;
    }
    let f = modules.function("optim", "sumsq_finish")?;
    let count = to_i32(OP, "partials", total)?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as above; `sum_sq` holds at least one f64.
    unsafe { stream.launch_builder(&f).arg(&partials).arg(&count).arg(sum_sq).launch(cfg) }.map_err(launch_err(OP))?;
    Ok(())
}
