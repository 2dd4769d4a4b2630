//! The CUDA flash attention, forward and backward (`kernels-cuda/flash_attention.cu`, head dims
//! 32, 64, 96, 128 and 256 (Gemma's, the first forward kernel only: two blocks share each block
//! of queries or keys, each taking half the output's columns); on an H100/H200 the forward of
//! `flash_attention_sm90.cu` at 64 and 128;
//! for a few query rows the split-KV forward of `flash_decode.cu`): bf16 or f16 q, k, v and o,
//! f32 softmax statistics.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::AttentionParams;
use crate::device::cuda::hopper::{self, Part};
use crate::device::cuda::ModuleCache;
use crate::kernels::check_len;
use crate::kernels::lora::cuda::Half;
use crate::{Error, Result};

/// Head dims with a kernel instance.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Blocks that share one block's queries (forward) or keys (backward) at head dim `d`, each
/// taking part of the output's columns: two at 256 (the kernels' registers are 128's then).
fn column_split(d: usize) -> usize {
    if d > 128 {
        2
    } else {
        1
    }
}
const BLOCK_Q: usize = 64;

/// The kernel's `FaParams`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    batch: i32,
    q_len: i32,
    kv_len: i32,
    heads: i32,
    kv_heads: i32,
    causal: i32,
    window: i32,
    scale_log2: f32,
}
// SAFETY: plain old data laid out as the kernel's struct.
unsafe impl DeviceRepr for Params {}

/// The forward kernel: the first version (tiles loaded with plain loads between barriers),
/// the pipelined one (cp.async overlapping loads with the math, ldmatrix fragments), both on
/// mma.sync; Hopper's (`flash_attention_sm90.cu`: wgmma, head dims 64 and 128, compute
/// capability 9.0 only); or `Auto`: Hopper's where it applies and the Hopper path is not off
/// (`device::cuda::hopper::mode_for(Part::Attention)`: `TUNA_SM90=0`, `TUNA_SM90_OFF=attention`),
/// else the first.
///
/// `SplitKv` is the kernel for a few query rows over a long cache (decoding,
/// `flash_decode.cu`): a block per chunk of keys of one key/value head, taking every query
/// row of that head's group, and a pass merging the chunks. It takes shapes whose group holds
/// at most `SPLIT_KV_MAX_ROWS` rows (`split_kv_fits`) without packed rows; `Auto` picks it for
/// them on every device, ahead of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdKernel {
    Sync,
    Pipelined,
    Hopper,
    SplitKv,
    Auto,
}

pub use super::{split_kv_fits, SPLIT_KV_MAX_ROWS};
/// Keys per `SplitKv` block (`FD_CHUNK` in flash_decode.cu).
const SPLIT_KV_CHUNK: usize = 256;

impl FwdKernel {
    /// The model's choice: `TUNA_FA_FORWARD=sync|pipelined|hopper` picks that kernel,
    /// anything else (or unset) `Auto`, so a GPU run can time the model with each without a
    /// rebuild. Read once per process.
    pub fn for_model() -> FwdKernel {
        static CHOICE: std::sync::OnceLock<FwdKernel> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("TUNA_FA_FORWARD").as_deref() {
            Ok("pipelined") => FwdKernel::Pipelined,
            Ok("sync") => FwdKernel::Sync,
            Ok("hopper") => FwdKernel::Hopper,
            _ => FwdKernel::Auto,
        })
    }

    /// The kernel `self` means for head dim `d` on a device of compute capability `cc`
    /// (`Auto` resolved); an error for Hopper's where it cannot run.
    pub fn resolve(self, cc: u32, d: usize) -> Result<FwdKernel> {
        Ok(match (self, takes_hopper(self == FwdKernel::Auto, self == FwdKernel::Hopper, Part::Attention, "flash_attn_fwd", cc, d)?) {
            (_, true) => FwdKernel::Hopper,
            (FwdKernel::Auto, false) => FwdKernel::Sync,
            (k, false) => k,
        })
    }
}

/// The backward kernel: the mma.sync one (`flash_attention.cu`), Hopper's
/// (`flash_attention_sm90.cu`: wgmma, head dims 64 and 128, compute capability 9.0 only), or
/// `Auto`: Hopper's where it applies and is not off (`hopper::mode_for(Part::AttentionBackward)`:
/// `TUNA_SM90=0`, `TUNA_SM90_OFF=attention-bwd`), else the mma.sync one. Both share the Dvec
/// pass before and the dQ rounding after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BwdKernel {
    Sync,
    Hopper,
    Auto,
}

impl BwdKernel {
    /// The model's choice: `TUNA_FA_BACKWARD=sync|hopper` picks that kernel, anything else (or
    /// unset) `Auto`. Read once per process.
    pub fn for_model() -> BwdKernel {
        static CHOICE: std::sync::OnceLock<BwdKernel> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("TUNA_FA_BACKWARD").as_deref() {
            Ok("sync") => BwdKernel::Sync,
            Ok("hopper") => BwdKernel::Hopper,
            _ => BwdKernel::Auto,
        })
    }

    /// The kernel `self` means for head dim `d` on a device of compute capability `cc`
    /// (`Auto` resolved); an error for Hopper's where it cannot run.
    pub fn resolve(self, cc: u32, d: usize) -> Result<BwdKernel> {
        Ok(match (self, takes_hopper(self == BwdKernel::Auto, self == BwdKernel::Hopper, Part::AttentionBackward, "flash_attn_bwd", cc, d)?) {
            (_, true) => BwdKernel::Hopper,
            (BwdKernel::Auto, false) => BwdKernel::Sync,
            (k, false) => k,
        })
    }
}

/// Whether a choice of kernel lands on Hopper's kernel of `part` at head dim `d` on compute
/// capability `cc`: `auto` where that kernel applies and its part is on, `asked` (Hopper's by
/// name) where it can run, else an error naming `op`; any other choice not.
fn takes_hopper(auto: bool, asked: bool, part: Part, op: &str, cc: u32, d: usize) -> Result<bool> {
    let applies = cc == 90 && HOPPER_HEAD_DIMS.contains(&d);
    if asked && !applies {
        return Err(Error::InvalidArgument(format!(
            "{op} (cuda): the Hopper kernel needs a compute capability 9.0 device and head dim {HOPPER_HEAD_DIMS:?} (this is {}.{}, head dim {d})",
            cc / 10,
            cc % 10
        )));
    }
    Ok(asked || (auto && applies && hopper::mode_for(part) != hopper::Mode::Off))
}

/// Head dims of the Hopper kernels (`flash_attn_{fwd,bwd}_sm90_*`).
pub const HOPPER_HEAD_DIMS: [usize; 2] = [64, 128];

/// `o = softmax(scale·q·kᵀ + mask)·v` and `lse` (`[B, H, T]`, natural log) for q `[B, T, H, D]`,
/// k and v `[B, S, G, D]`; `starts` (`[B·T]`) are the packed rows' segment starts.
/// `kernel` picks the forward kernel (`FwdKernel`).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    kernel: FwdKernel,
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    q: &CudaView<'_, u16>,
    k: &CudaView<'_, u16>,
    v: &CudaView<'_, u16>,
    starts: Option<&CudaView<'_, u32>>,
    o: &mut CudaViewMut<'_, u16>,
    lse: &mut CudaViewMut<'_, f32>,
    p: &AttentionParams,
) -> Result<()> {
    const OP: &str = "flash_attn_fwd (cuda)";
    let params = launch_params(OP, p, starts.map(|s| s.len()))?;
    let d = p.head_dim;
    let (qn, kn) = (p.batch * p.q_len * p.heads * d, p.batch * p.kv_len * p.kv_heads * d);
    for (what, have, need) in [("q", q.len(), qn), ("k", k.len(), kn), ("v", v.len(), kn), ("o", o.len(), qn), ("lse", lse.len(), p.batch * p.heads * p.q_len)] {
        check_len(OP, what, have, need)?;
    }
    if p.batch == 0 || p.q_len == 0 || p.heads == 0 {
        return Ok(());
    }
    check_aligned(OP, &[("q", ptr(q, stream)), ("k", ptr(k, stream)), ("v", ptr(v, stream)), ("o", ptr(o, stream))])?;
    let split = match kernel {
        FwdKernel::SplitKv if starts.is_some() || !split_kv_fits(p) => return Err(super::split_kv_refusal(OP, p, starts.is_some())),
        FwdKernel::SplitKv => true,
        FwdKernel::Auto => starts.is_none() && split_kv_fits(p),
        _ => false,
    };
    if split {
        return split_kv(stream, modules, dt, q, k, v, o, lse, p, &params);
    }
    let resolved = kernel.resolve(modules.compute_capability(), d)?;
    let (module, variant, smem) = match resolved {
        FwdKernel::Pipelined if d > 128 => return Err(Error::InvalidArgument(format!("{OP}: the pipelined kernel takes head dims up to 128, got {d}"))),
        FwdKernel::Pipelined => ("flash_attention", "pipe_", 0),
        // Q, K[2], V[2] tiles of 64 rows x D 16-bit values, and 1 KiB to align them.
        FwdKernel::Hopper => ("flash_attention_sm90", "sm90_", 5 * BLOCK_Q * d * 2 + 1024),
        _ => ("flash_attention", "", 0),
    };
    let name = format!("flash_attn_fwd_{variant}{}_d{d}", dt.suffix());
    let f = if smem > 0 { modules.function_with_smem(module, &name, smem) } else { modules.function(module, &name) };
    let f = match f {
        Ok(f) => f,
        // Auto on a driver that cannot load the sm_90a module: Hopper's attention goes off for
        // the process (as the GEMM path does) and the first mma.sync kernel runs.
        Err(_) if kernel == FwdKernel::Auto && resolved == FwdKernel::Hopper => {
            hopper::turn_off_after_failure(Part::Attention);
            return forward(FwdKernel::Sync, stream, modules, dt, q, k, v, starts, o, lse, p);
        }
        Err(e) => return Err(e),
    };
    let cfg = LaunchConfig { grid_dim: (p.q_len.div_ceil(BLOCK_Q) as u32, (p.heads * column_split(d)) as u32, p.batch as u32), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
    let null = 0u64;
    let mut b = stream.launch_builder(&f);
    b.arg(q).arg(k).arg(v);
    match starts {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(o).arg(lse).arg(&params);
    // SAFETY: arguments match the kernel's signature; every buffer's length was checked
    // against the sizes the kernel indexes.
    unsafe { b.launch(cfg) }.map_err(|e| Error::cuda(format!("launching {name}"), e))?;
    Ok(())
}

/// The `SplitKv` forward: `flash_decode_part` writes each chunk's f32 O, max and sum to
/// scratch, `flash_decode_merge` combines them into o and lse.
#[allow(clippy::too_many_arguments)]
fn split_kv(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    q: &CudaView<'_, u16>,
    k: &CudaView<'_, u16>,
    v: &CudaView<'_, u16>,
    o: &mut CudaViewMut<'_, u16>,
    lse: &mut CudaViewMut<'_, f32>,
    p: &AttentionParams,
    params: &Params,
) -> Result<()> {
    let e = |what: &'static str| move |err| Error::cuda(format!("flash_decode (cuda): {what}"), err);
    let d = p.head_dim;
    let chunks = p.kv_len.div_ceil(SPLIT_KV_CHUNK).max(1);
    let parts = p.batch * p.kv_heads * chunks * SPLIT_KV_MAX_ROWS;
    // SAFETY: plain f32s; the part kernel writes the rows each chunk has before the merge reads them.
    let mut part_o = unsafe { stream.alloc::<f32>(parts * d) }.map_err(e("allocating the chunks' O"))?;
    let mut part_ml = unsafe { stream.alloc::<f32>(parts * 2) }.map_err(e("allocating the chunks' max and sum"))?;
    let (part, merge) = (format!("flash_decode_part_{}_d{d}", dt.suffix()), format!("flash_decode_merge_{}_d{d}", dt.suffix()));
    let grid = |x: usize| (x as u32, p.kv_heads as u32, p.batch as u32);
    let f = modules.function("flash_decode", &part)?;
    let cfg = LaunchConfig { grid_dim: grid(chunks), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match the kernel's signature; q, k and v were checked against the
    // shape, and the scratch holds every chunk's SPLIT_KV_MAX_ROWS rows.
    unsafe { stream.launch_builder(&f).arg(q).arg(k).arg(v).arg(&mut part_o).arg(&mut part_ml).arg(params).launch(cfg) }.map_err(e("launching the chunks"))?;
    let f = modules.function("flash_decode", &merge)?;
    let rows = (p.heads / p.kv_heads) * p.q_len;
    let cfg = LaunchConfig { grid_dim: grid(rows), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let chunks = chunks as i32;
    // SAFETY: as above; o and lse were checked against the shape.
    unsafe { stream.launch_builder(&f).arg(&part_o).arg(&part_ml).arg(o).arg(lse).arg(&chunks).arg(params).launch(cfg) }.map_err(e("launching the merge"))?;
    Ok(())
}

/// A buffer's device address.
fn ptr(b: &impl DevicePtr<u16>, stream: &Arc<CudaStream>) -> u64 {
    b.device_ptr(stream).0
}

/// The kernels load q, k, v and dO 16 bytes at a time (`cp.async`, `uint4`) and write o, dq,
/// dk and dv in pairs: each must start 16-byte aligned. Whole allocations do; a view that
/// starts at an element offset not a multiple of 8 does not, and would fault on the device.
fn check_aligned(op: &str, bufs: &[(&str, u64)]) -> Result<()> {
    match bufs.iter().find(|(_, p)| p % 16 != 0) {
        Some((what, p)) => Err(Error::InvalidArgument(format!("{op}: `{what}` starts at {p:#x}, not 16-byte aligned (a view at an element offset not a multiple of 8?)"))),
        None => Ok(()),
    }
}

/// Checks the shape (head dim with an instance, GQA grouping, causal S >= T, packed rows'
/// starts `[B·T]` with T == S, sizes in i32) and builds the kernels' parameters.
fn launch_params(op: &'static str, p: &AttentionParams, starts_len: Option<usize>) -> Result<Params> {
    let d = p.head_dim;
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::InvalidArgument(format!("{op}: head dim {d} (instances: {HEAD_DIMS:?})")));
    }
    if p.kv_heads == 0 || !p.heads.is_multiple_of(p.kv_heads) || (p.causal && p.kv_len < p.q_len) {
        return Err(Error::InvalidArgument(format!("{op}: {} query heads over {} key/value heads, T {} S {}", p.heads, p.kv_heads, p.q_len, p.kv_len)));
    }
    if let Some(n) = starts_len {
        check_len(op, "starts", n, p.batch * p.q_len)?;
        if p.q_len != p.kv_len {
            return Err(Error::InvalidArgument(format!("{op}: packed rows need T == S, got T {} S {}", p.q_len, p.kv_len)));
        }
    }
    let i = |what: &str, v: usize| i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds i32")));
    i("q elements", p.batch * p.q_len * p.heads * p.head_dim)?;
    i("k elements", p.batch * p.kv_len * p.kv_heads * p.head_dim)?;
    if p.heads * column_split(d) > 65535 || p.batch > 65535 {
        return Err(Error::InvalidArgument(format!("{op}: H {} or B {} exceeds the 65535 grid limit", p.heads, p.batch)));
    }
    Ok(Params {
        batch: i("B", p.batch)?,
        q_len: i("T", p.q_len)?,
        kv_len: i("S", p.kv_len)?,
        heads: i("H", p.heads)?,
        kv_heads: i("G", p.kv_heads)?,
        causal: p.causal as i32,
        window: i("window", p.window.unwrap_or(0))?,
        scale_log2: p.scale * std::f32::consts::LOG2_E,
    })
}

/// Backward: dq `[B, T, H, D]`, dk and dv `[B, S, G, D]` (summed over each key head's query
/// heads) from q, k, v, o, dO and the forward's `lse`. Scratch: `Dvec = rowsum(dO ∘ O)` and
/// an f32 dQ accumulator (dQ is summed over key blocks with atomics, then rounded), which the
/// Dvec pass clears on its way.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    kernel: BwdKernel,
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    q: &CudaView<'_, u16>,
    k: &CudaView<'_, u16>,
    v: &CudaView<'_, u16>,
    starts: Option<&CudaView<'_, u32>>,
    o: &CudaView<'_, u16>,
    dout: &CudaView<'_, u16>,
    lse: &CudaView<'_, f32>,
    dq: &mut CudaViewMut<'_, u16>,
    dk: &mut CudaViewMut<'_, u16>,
    dv: &mut CudaViewMut<'_, u16>,
    p: &AttentionParams,
) -> Result<()> {
    const OP: &str = "flash_attn_bwd (cuda)";
    let params = launch_params(OP, p, starts.map(|s| s.len()))?;
    let d = p.head_dim;
    let (qn, kn, rows) = (p.batch * p.q_len * p.heads * d, p.batch * p.kv_len * p.kv_heads * d, p.batch * p.q_len * p.heads);
    for (what, have, need) in [("q", q.len(), qn), ("k", k.len(), kn), ("v", v.len(), kn), ("o", o.len(), qn), ("dout", dout.len(), qn), ("lse", lse.len(), rows), ("dq", dq.len(), qn), ("dk", dk.len(), kn), ("dv", dv.len(), kn)] {
        check_len(OP, what, have, need)?;
    }
    if kn == 0 {
        return Ok(());
    }
    let bufs = [("q", ptr(q, stream)), ("k", ptr(k, stream)), ("v", ptr(v, stream)), ("o", ptr(o, stream)), ("dout", ptr(dout, stream)), ("dq", ptr(dq, stream)), ("dk", ptr(dk, stream)), ("dv", ptr(dv, stream))];
    check_aligned(OP, &bufs)?;
    let resolved = kernel.resolve(modules.compute_capability(), d)?;
    let suf = dt.suffix();
    let (module, name, smem) = match resolved {
        // K, V, Q[2], dO[2] tiles of 64 rows x D, dS^T (64 x 64), 2 x 3 x 64 row values, 1 KiB
        // to align them.
        BwdKernel::Hopper => ("flash_attention_sm90", format!("flash_attn_bwd_sm90_{suf}_d{d}"), 6 * 64 * d * 2 + 64 * 64 * 2 + 2 * 3 * 64 * 4 + 1024),
        _ => ("flash_attention", format!("flash_attn_bwd_{suf}_d{d}"), (2 * 64 + 2 * 32) * (d + 8) * 2 + 64 * 40 * 2 + 2 * 32 * 4),
    };
    let f = match modules.function_with_smem(module, &name, smem) {
        Ok(f) => f,
        // Auto on a driver that cannot load the sm_90a module: Hopper's backward goes off for
        // the process and the mma.sync kernel runs.
        Err(_) if kernel == BwdKernel::Auto && resolved == BwdKernel::Hopper => {
            hopper::turn_off_after_failure(Part::AttentionBackward);
            return backward(BwdKernel::Sync, stream, modules, dt, q, k, v, starts, o, dout, lse, dq, dk, dv, p);
        }
        Err(e) => return Err(e),
    };
    let e = |what: &'static str| move |err| Error::cuda(format!("{OP}: {what}"), err);
    // SAFETY: plain f32s; flash_attn_bwd_dot writes all `rows` of Dvec and zeroes all `qn`
    // (rows·D) of the dQ accumulator before the backward reads or adds to either.
    let mut dvec = unsafe { stream.alloc::<f32>(rows.max(1)) }.map_err(e("allocating Dvec"))?;
    let mut dq_acc = unsafe { stream.alloc::<f32>(qn.max(1)) }.map_err(e("allocating the dQ accumulator"))?;
    if rows > 0 {
        let f = modules.function("flash_attention", &format!("flash_attn_bwd_dot_{suf}"))?;
        let cfg = LaunchConfig { grid_dim: ((rows * 32).div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (r, t, h, di) = (rows as i32, p.q_len as i32, p.heads as i32, d as i32);
        // SAFETY: matches flash_attn_bwd_dot's signature; o, dout and dq_acc hold rows·D elements.
        unsafe { stream.launch_builder(&f).arg(o).arg(dout).arg(&mut dvec).arg(&mut dq_acc).arg(&r).arg(&t).arg(&h).arg(&di).launch(cfg) }.map_err(e("launching the Dvec pass"))?;
    }
    let cfg = LaunchConfig { grid_dim: (p.kv_len.div_ceil(64) as u32, (p.kv_heads * column_split(d)) as u32, p.batch as u32), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
    let null = 0u64;
    let mut b = stream.launch_builder(&f);
    b.arg(q).arg(k).arg(v);
    match starts {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(dout).arg(lse).arg(&dvec).arg(&mut dq_acc).arg(dk).arg(dv).arg(&params);
    // SAFETY: arguments match the kernel's signature; lengths checked above.
    unsafe { b.launch(cfg) }.map_err(|err| Error::cuda(format!("launching {name}"), err))?;
    let f = modules.function("flash_attention", &format!("flash_attn_bwd_dq_{suf}"))?;
    let n = qn as i64;
    let cfg = LaunchConfig { grid_dim: (qn.div_ceil(256).clamp(1, 65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: dq_acc and dq hold qn elements.
    unsafe { stream.launch_builder(&f).arg(&dq_acc).arg(dq).arg(&n).launch(cfg) }.map_err(e("launching the dQ rounding"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_not_16_byte_aligned_is_refused_by_name() {
        assert!(check_aligned("op", &[("q", 0x1000), ("k", 0x2010)]).is_ok());
        let err = check_aligned("op", &[("q", 0x1000), ("dout", 0x2008)]).unwrap_err().to_string();
        assert!(err.contains("`dout`") && err.contains("0x2008") && err.contains("16-byte"), "{err}");
    }

    #[test]
    fn auto_takes_hopper_only_on_compute_capability_9_at_its_head_dims() {
        assert_eq!(FwdKernel::Auto.resolve(80, 128).unwrap(), FwdKernel::Sync);
        assert_eq!(FwdKernel::Auto.resolve(90, 96).unwrap(), FwdKernel::Sync);
        assert_eq!(FwdKernel::Auto.resolve(100, 64).unwrap(), FwdKernel::Sync, "sm_90a code does not run on later GPUs");
        assert_eq!(FwdKernel::Pipelined.resolve(90, 64).unwrap(), FwdKernel::Pipelined);
        let err = FwdKernel::Hopper.resolve(86, 64).unwrap_err().to_string();
        assert!(err.contains("compute capability 9.0") && err.contains("8.6"), "{err}");
        assert!(FwdKernel::Hopper.resolve(90, 32).is_err());
        assert_eq!(FwdKernel::Hopper.resolve(90, 128).unwrap(), FwdKernel::Hopper);
        assert_eq!(BwdKernel::Auto.resolve(80, 64).unwrap(), BwdKernel::Sync);
        assert_eq!(BwdKernel::Auto.resolve(90, 32).unwrap(), BwdKernel::Sync);
        assert_eq!(BwdKernel::Sync.resolve(90, 128).unwrap(), BwdKernel::Sync);
        let err = BwdKernel::Hopper.resolve(80, 128).unwrap_err().to_string();
        assert!(err.contains("flash_attn_bwd") && err.contains("8.0"), "{err}");
        assert_eq!(BwdKernel::Hopper.resolve(90, 64).unwrap(), BwdKernel::Hopper);
    }
}
