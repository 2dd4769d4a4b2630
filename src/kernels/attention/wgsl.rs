//! Flash attention in WGSL (`kernels-wgsl/flash_attention.wgsl`; for a few query rows the
//! split-KV forward of `flash_decode.wgsl`), head dim at most 256 (the tiled kernels built
//! twice: for head dims up to 128, and with twice the room for Gemma's 256; the split-KV
//! forward up to 128): O(T) memory (queries and
//! keys stream through workgroup memory; the forward keeps a per-row log-sum-exp, from which
//! the backward recomputes the probabilities). Tensors are stored in a [`Precision`] (f32, or
//! f16 where the adapter has it) in the layouts of [`kernels::attention`](super); `starts`
//! (u32, one per query) for packed rows; `stats` holds `[B·T·H, 2]` floats: the forward writes
//! the log-sum-exp, the backward adds `D = rowsum(dO ∘ O)`.

use super::AttentionParams;
pub use crate::device::wgpu::Precision;
use crate::device::wgpu::{dispatch, dispatch_bound, grid, uniform, KernelCache};
use crate::kernels::check_len;
use crate::{Error, Result};

pub const SOURCE: &str = wgsl_source!("flash_attention.wgsl");
/// The split-KV forward for a few query rows (`FwdKernel::SplitKv`).
pub const DECODE_SOURCE: &str = wgsl_source!("flash_decode.wgsl");

/// The forward kernel. `Tiled` (`attn_fwd`): a workgroup per 64 queries of a query head,
/// one query per invocation, keys streamed through workgroup memory. `SplitKv`
/// (`flash_decode.wgsl`): a workgroup per 256 keys of a key/value head takes every query
/// row of that head's group (at most [`super::SPLIT_KV_MAX_ROWS`], no packed rows), then a
/// pass merges the chunks; for decoding, where the tiled kernel would keep one invocation
/// of 64 busy and read the cache once per query head. `Auto`: split-KV where it applies,
/// else tiled (the model's choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdKernel {
    Tiled,
    SplitKv,
    Auto,
}

/// Keys per split-KV workgroup (`CHUNK` in flash_decode.wgsl).
const SPLIT_KV_CHUNK: usize = 256;

/// Lavapipe (Mesa's llvmpipe) ends the loops of a shader invocation after 65,535 iterations
/// in all, without an error (its loop limiter): what follows is computed from cut sums.
const LLVMPIPE_LOOP_LIMIT: usize = 65_535;

/// The tiled kernels give one query (forward, dQ) or one key (dK and dV) to an invocation,
/// which loops over `items` keys (queries of the group) in tiles of 8: about `2·D4 + D4/8 + 5`
/// loop iterations a tile, D4 the head dim in vec4s (the 8 dot products in one pass over D4,
/// the accumulator update in another, the tile loads, the loops' entries). Measured on
/// lavapipe, the forward with one query is right up to S 13,000 and wrong from 14,000 at
/// D 64, right up to 7,000 and wrong from 8,000 at D 128; dK with 8 query heads a key/value
/// head, right at T 1,400 and wrong at 1,800 (11,200 and 14,400 items). The bound below,
/// `2·D4 + D4/4 + 8` a tile, puts the limit ~10% under those. On llvmpipe a shape past it is
/// an error, not a wrong answer; the split-KV forward's loops stay under ~18k per invocation
/// at any S.
fn tiled_loops_fit(op: &'static str, device: &wgpu::Device, p: &AttentionParams, items: usize) -> Result<()> {
    let d4 = p.head_dim.div_ceil(4);
    let loops = items.div_ceil(8) * (2 * d4 + d4 / 4 + 8);
    if loops <= LLVMPIPE_LOOP_LIMIT {
        return Ok(());
    }
    let adapter = device.adapter_info().name;
    if !adapter.to_lowercase().contains("llvmpipe") {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{op}: on {adapter} the tiled attention kernel would loop about {loops} times in one invocation ({items} keys or queries at head dim {}), past llvmpipe's limit of {LLVMPIPE_LOOP_LIMIT}, after which it silently stops looping; use the CPU device, a hardware adapter or shorter sequences",
        p.head_dim
    )))
}

/// Queries (forward, dq) or keys (dk, dv) per workgroup.
const BLOCK: usize = 64;
pub const MAX_HEAD_DIM: usize = 256;
/// The largest head dim of the tiled kernels as written (`DMAX4` vec4s) and of the split-KV
/// forward; wider heads take the wide build of the tiled kernels.
const NARROW_HEAD_DIM: usize = 128;

/// The tiled kernels for head dim `d`: the source as written (private arrays and key/value
/// tiles for head dims up to 128), or its wide build, every such array twice as long (up to
/// 256: 16 KiB and 64 bytes of workgroup memory, past WebGPU's default 16 KiB, which tuna
/// asks the adapter to raise to its own limit). Returns the pipeline name's suffix and the
/// source.
fn tiled_source(device: &wgpu::Device, op: &'static str, d: usize) -> Result<(&'static str, &'static str)> {
    if d <= NARROW_HEAD_DIM {
        return Ok(("", SOURCE));
    }
    let need = 2 * 8 * (MAX_HEAD_DIM / 4) * 16 + 16 * 4;
    let have = device.limits().max_compute_workgroup_storage_size as usize;
    if have < need {
        return Err(Error::InvalidArgument(format!("{op}: head dim {d} needs {need} bytes of workgroup memory; this adapter offers {have}")));
    }
    // Made once per process: the pipeline cache is keyed by name, and each launch asks.
    static WIDE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let wide = WIDE.get_or_init(|| {
        let edits = [
            ("const DMAX4: u32 = 32u; // the largest head dim, 128, in vec4s", "const DMAX4: u32 = 64u; // the largest head dim, 256, in vec4s"),
            ("array<vec4<f32>, 256>", "array<vec4<f32>, 512>"),
            ("array<vec4<f32>, 32>", "array<vec4<f32>, 64>"),
        ];
        edits.iter().fold(SOURCE.to_string(), |src, (from, to)| {
            // A shader edit that renamed one of these would leave the wide build narrow.
            assert!(src.contains(from), "flash_attention.wgsl no longer holds `{from}`: update its wide build in attention/wgsl.rs");
            src.replace(from, to)
        })
    });
    Ok(("_wide", wide.as_str()))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    flags: u32,
    window: u32,
    scale: f32,
    _pad: [u32; 3],
}

fn params(op: &'static str, p: &AttentionParams, packed: bool) -> Result<Params> {
    if p.head_dim == 0 || p.head_dim > MAX_HEAD_DIM {
        return Err(Error::InvalidArgument(format!("{op}: head dim {} (the WGSL kernel takes 1..={MAX_HEAD_DIM})", p.head_dim)));
    }
    if p.kv_heads == 0 || !p.heads.is_multiple_of(p.kv_heads) || (p.kv_len < p.q_len && p.causal) {
        return Err(Error::InvalidArgument(format!("{op}: {} query heads over {} key/value heads, T {} S {}", p.heads, p.kv_heads, p.q_len, p.kv_len)));
    }
    let u = |v: usize, what: &str| u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds u32")));
    let flags = p.causal as u32 | (p.window.is_some() as u32) << 1 | (packed as u32) << 2;
    Ok(Params {
        batch: u(p.batch, "batch")?,
        q_len: u(p.q_len, "T")?,
        kv_len: u(p.kv_len, "S")?,
        heads: u(p.heads, "H")?,
        kv_heads: u(p.kv_heads, "G")?,
        head_dim: u(p.head_dim, "D")?,
        flags,
        window: u(p.window.unwrap_or(0), "window")?,
        scale: p.scale,
        _pad: [0; 3],
    })
}

/// Checks each `(name, buffer, elements)` for elements of `bytes` bytes.
fn check(op: &'static str, bytes: usize, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<()> {
    for (name, b, elems) in bufs {
        check_len(op, name, b.size() as usize / bytes, *elems)?;
    }
    Ok(())
}

/// Elements of q (and o, dO, dq), of k (and v, dk, dv), and query rows.
fn sizes(p: &AttentionParams) -> (usize, usize, usize) {
    (p.batch * p.q_len * p.heads * p.head_dim, p.batch * p.kv_len * p.kv_heads * p.head_dim, p.batch * p.q_len * p.heads)
}

fn check_starts(op: &'static str, starts: Option<&wgpu::Buffer>, p: &AttentionParams) -> Result<()> {
    match starts {
        Some(s) => check(op, 4, &[("starts", s, p.batch * p.q_len)]),
        None => Ok(()),
    }
}

/// The starts buffer, or a stand-in when rows are not packed.
fn starts_or<'a>(device: &wgpu::Device, starts: Option<&'a wgpu::Buffer>, keep: &'a mut Option<wgpu::Buffer>) -> &'a wgpu::Buffer {
    match starts {
        Some(s) => s,
        None => keep.insert(crate::device::wgpu::stand_in(device, 0)),
    }
}

fn groups(op: &'static str, n: usize) -> Result<(u32, u32, u32)> {
    let n = u32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{op}: {n} workgroups exceed u32")))?;
    let (x, y) = grid(n);
    Ok((x, y, 1))
}

/// Forward: o and the log-sum-exp (`stats[2·row]`, f32) by `kernel`. q, k, v, o are
/// stored in `precision`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    kernel: FwdKernel,
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    starts: Option<&wgpu::Buffer>,
    o: &wgpu::Buffer,
    stats: &wgpu::Buffer,
    p: &AttentionParams,
    precision: Precision,
) -> Result<()> {
    const OP: &str = "flash_attention_fwd";
    precision.check(device, OP)?;
    let (qn, kn, rows) = sizes(p);
    check(OP, precision.bytes(), &[("q", q, qn), ("k", k, kn), ("v", v, kn), ("o", o, qn)])?;
    check(OP, 4, &[("stats", stats, 2 * rows)])?;
    check_starts(OP, starts, p)?;
    if rows == 0 {
        return Ok(());
    }
    let u = uniform(device, &params(OP, p, starts.is_some())?);
    let split = match kernel {
        FwdKernel::SplitKv if p.head_dim > NARROW_HEAD_DIM => {
            return Err(Error::InvalidArgument(format!("{OP}: the split-KV kernel takes head dims up to {NARROW_HEAD_DIM}, got {}", p.head_dim)))
        }
        FwdKernel::SplitKv if starts.is_some() || !super::split_kv_fits(p) => return Err(super::split_kv_refusal(OP, p, starts.is_some())),
        FwdKernel::SplitKv => true,
        FwdKernel::Auto => starts.is_none() && super::split_kv_fits(p) && p.head_dim <= NARROW_HEAD_DIM,
        FwdKernel::Tiled => false,
    };
    if split {
        return split_kv(device, queue, kernels, &u, q, k, v, o, stats, p, precision);
    }
    tiled_loops_fit(OP, device, p, p.kv_len)?;
    let mut keep = None;
    let st = starts_or(device, starts, &mut keep);
    let (wide, source) = tiled_source(device, OP, p.head_dim)?;
    let pipe = kernels.pipeline_as(device, &format!("attn_fwd{wide}"), source, "attn_fwd", precision)?;
    dispatch(device, queue, &pipe, &[&u, q, k, v, st, o, stats], groups(OP, p.batch * p.heads * p.q_len.div_ceil(BLOCK))?);
    Ok(())
}

/// The split-KV forward (shape checked by the caller): `decode_part` over (b, g, chunk of
/// keys) into f32 scratch, then `decode_merge` over (b, g, row) into o and stats.
#[allow(clippy::too_many_arguments)]
fn split_kv(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    u: &wgpu::Buffer,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    o: &wgpu::Buffer,
    stats: &wgpu::Buffer,
    p: &AttentionParams,
    precision: Precision,
) -> Result<()> {
    const OP: &str = "flash_attention_fwd (split-KV)";
    let rows = p.heads / p.kv_heads * p.q_len;
    let parts = p.batch * p.kv_heads * p.kv_len.div_ceil(SPLIT_KV_CHUNK).max(1);
    // f32 chunk outputs and statistics: every element is written by decode_part before
    // decode_merge reads it.
    let part_o = crate::device::wgpu::scratch(device, 4 * parts * rows * p.head_dim);
    let part_ml = crate::device::wgpu::scratch(device, 4 * parts * rows * 2);
    let (part_o, part_ml) = (part_o.buffer(), part_ml.buffer());
    let part = kernels.pipeline_as(device, "attn_decode_part", DECODE_SOURCE, "decode_part", precision)?;
    dispatch_bound(device, queue, &part, &[(0, u), (1, q), (2, k), (3, v), (4, part_o), (5, part_ml)], groups(OP, parts)?);
    let merge = kernels.pipeline_as(device, "attn_decode_merge", DECODE_SOURCE, "decode_merge", precision)?;
    dispatch_bound(device, queue, &merge, &[(0, u), (4, part_o), (5, part_ml), (6, o), (7, stats)], groups(OP, p.batch * p.kv_heads * rows)?);
    Ok(())
}

/// Backward: dq, dk, dv (overwritten) from q, k, v, o, dO and the forward's `stats`
/// (whose second column it fills with `D`); every tensor but `stats` in `precision`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    starts: Option<&wgpu::Buffer>,
    o: &wgpu::Buffer,
    dout: &wgpu::Buffer,
    stats: &wgpu::Buffer,
    dq: &wgpu::Buffer,
    dk: &wgpu::Buffer,
    dv: &wgpu::Buffer,
    p: &AttentionParams,
    precision: Precision,
) -> Result<()> {
    const OP: &str = "flash_attention_bwd";
    precision.check(device, OP)?;
    let (qn, kn, rows) = sizes(p);
    check(OP, precision.bytes(), &[("q", q, qn), ("k", k, kn), ("v", v, kn), ("o", o, qn), ("dout", dout, qn), ("dq", dq, qn), ("dk", dk, kn), ("dv", dv, kn)])?;
    check(OP, 4, &[("stats", stats, 2 * rows)])?;
    check_starts(OP, starts, p)?;
    if rows == 0 || kn == 0 {
        return Ok(());
    }
    let u = uniform(device, &params(OP, p, starts.is_some())?);
    tiled_loops_fit(OP, device, p, p.kv_len.max(p.heads / p.kv_heads * p.q_len))?;
    let mut keep = None;
    let st = starts_or(device, starts, &mut keep);
    // attn_bwd_dot binds only the uniform, o (5), stats (6) and dO (7).
    let (wide, source) = tiled_source(device, OP, p.head_dim)?;
    let dot = kernels.pipeline_as(device, &format!("attn_bwd_dot{wide}"), source, "attn_bwd_dot", precision)?;
    dispatch_bound(device, queue, &dot, &[(0, &u), (5, o), (6, stats), (7, dout)], groups(OP, rows.div_ceil(BLOCK))?);
    let dkdv = kernels.pipeline_as(device, &format!("attn_bwd_dkdv{wide}"), source, "attn_bwd_dkdv", precision)?;
    dispatch(device, queue, &dkdv, &[&u, q, k, v, st, dout, stats, dk, dv], groups(OP, p.batch * p.kv_heads * p.kv_len.div_ceil(BLOCK))?);
    let dqp = kernels.pipeline_as(device, &format!("attn_bwd_dq{wide}"), source, "attn_bwd_dq", precision)?;
    dispatch(device, queue, &dqp, &[&u, q, k, v, st, dout, stats, dq], groups(OP, p.batch * p.heads * p.q_len.div_ceil(BLOCK))?);
    Ok(())
}
