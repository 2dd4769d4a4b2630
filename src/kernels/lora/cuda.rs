//! CUDA launchers of the LoRA GEMM family (see `super` and `kernels-cuda/lora_gemm.cu`).
//!
//! They take cudarc's own types, so a program with its own context and stream calls them
//! without tuna's tensors: a [`ModuleCache`](crate::device::cuda::ModuleCache) loads the kernels for the context's device (the
//! PTX `build.rs` made, machine code with `TUNA_SASS=1`, or NVRTC), and 16-bit values travel as
//! their bits (`u16`). The fused forward on bf16 buffers, against the f64 reference:
//!
//! ```
//! use cudarc::driver::CudaContext;
//! use half::bf16;
//! use tuna::device::cuda::{device_count, driver_present, ModuleCache};
//! use tuna::kernels::lora::cuda::{forward, Half, Weight};
//! use tuna::kernels::lora::{reference, LoraParams};
//! use tuna::testing::{compare, Tolerance};
//!
//! if !driver_present() || device_count()? == 0 {
//!     return Ok(()); // no CUDA device on this machine
//! }
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let modules = ModuleCache::new(&ctx)?;
//!
//! let p = LoraParams { m: 48, n: 80, k: 96, r: 8, scale: 2.0 };
//! let bits = |len: usize, step: f32| -> Vec<u16> { (0..len).map(|i| bf16::from_f32((i as f32 * step).sin() / 2.0).to_bits()).collect() };
//! let (x, w, a, b) = (bits(p.m * p.k, 0.7), bits(p.n * p.k, 1.3), bits(p.r * p.k, 0.9), bits(p.n * p.r, 1.1));
//! let (xd, wd, ad, bd) = (stream.clone_htod(&x)?, stream.clone_htod(&w)?, stream.clone_htod(&a)?, stream.clone_htod(&b)?);
//! let (mut y, mut xa) = (stream.alloc_zeros::<u16>(p.m * p.n)?, stream.alloc_zeros::<u16>(p.m * p.r)?);
//!
//! // y = x·wᵀ + s·(x·aᵀ)·bᵀ, and xa = x·aᵀ for the backward (x is also the LoRA input: no dropout).
//! let (xv, wv) = (xd.slice(..), wd.slice(..));
//! forward(&stream, &modules, Half::Bf16, &xv, &xv, Weight::Dense(&wv), None, &ad.slice(..), &bd.slice(..), &mut y.slice_mut(..), &mut xa.slice_mut(..), p)?;
//! let y: Vec<f32> = stream.clone_dtoh(&y)?.into_iter().map(|v| bf16::from_bits(v).to_f32()).collect();
//!
//! let f64s = |v: &[u16]| -> Vec<f64> { v.iter().map(|&v| bf16::from_bits(v).to_f64()).collect() };
//! let (y_ref, _) = reference::forward(&f64s(&x), &f64s(&x), &f64s(&w), None, &f64s(&a), &f64s(&b), p);
//! compare("y", &y, &y_ref, Tolerance::BF16)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `backward` takes the same buffers and `dy`, and writes f32 `da`, `db` and (optionally) `dx`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::LoraParams;
use crate::device::cuda::ModuleCache;
use crate::kernels::check_len;
use crate::kernels::nf4::cuda::Nf4Device;
use crate::{Error, Result};

/// Block tile of `lora_gemm_*` (rows, columns) and its threads; see lora_gemm.cu.
pub(crate) const TILE: (usize, usize) = (128, 64);
/// The K tile of `lora_gemm_*`.
const BK: usize = 32;
const THREADS: u32 = 128;
/// The largest M that `forward` and `linear` send to the GEMV kernels with an NF4 weight (whose
/// decoding the rows share) and with a dense one (whose 16-bit W is read as fast as the
/// tensor-core GEMM reads it, while the multiply-adds grow with M on the CUDA cores).
pub const GEMV_MAX_M: usize = 16;
/// The largest M that goes to the GEMV kernels with a dense weight (see `GEMV_MAX_M`).
pub const DENSE_GEMV_MAX_M: usize = 4;

/// The 16-bit storage type of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Half::Bf16 => "bf16",
            Half::F16 => "f16",
        }
    }
}

pub(crate) fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds i32")))
}

pub(crate) fn launch_err(op: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(format!("launching {op}"), e)
}

pub(crate) fn check_dims(op: &'static str, p: LoraParams) -> Result<()> {
    if p.r == 0 || p.r > 128 {
        return Err(Error::InvalidArgument(format!("{op}: rank {} outside 1..=128", p.r)));
    }
    for (what, v) in [("M·K", p.m * p.k), ("N·K", p.n * p.k), ("M·N", p.m * p.n)] {
        to_i32(op, what, v)?;
    }
    Ok(())
}

/// A 16-bit scratch buffer, not zeroed: every use is the C of a GEMM that writes all of it
/// (`GemmOut::Half` or `HalfScaled`: XA, s·G, and dropout's two dX halves).
pub(crate) fn scratch(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<u16>> {
    // SAFETY: plain u16s; each caller's GEMM writes every element before any read.
    unsafe { stream.alloc::<u16>(n.max(1)) }.map_err(|e| Error::cuda("allocating LoRA scratch", e))
}

/// `c = alpha·op(a)·op(b)` (the rank-R products, `matmul_tn`), on the tensor cores: a row-major `[m, k1]`
/// or (`a_km`) `[k1, m]` with row stride `lda`, b `[n, k1]` or (`kn`) `[k1, n]` with row stride
/// `ldb`.
#[allow(clippy::too_many_arguments)]
fn product(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    (a, lda): (&CudaView<'_, u16>, usize),
    (b, ldb): (&CudaView<'_, u16>, usize),
    c: GemmOut<'_, '_>,
    (m, n, k1): (usize, usize, usize),
    (a_km, kn): (bool, bool),
    alpha: f32,
) -> Result<()> {
    let g = Gemm { a1: (a, lda), b1: Some((b, ldb)), a2: (a, lda), b2: (b, ldb), bias: None, m, n, k1, k2: 0, a_km, kn, alpha };
    gemm(stream, modules, dt, g, c, None)
}

/// The two-phase GEMM's operands: `c[m, n] = a1·op(b1) + a2·op(b2) (+ bias)` over k1 then k2.
pub(crate) struct Gemm<'a, 'b> {
    pub a1: (&'a CudaView<'b, u16>, usize),
    /// None: W comes from NF4 (the `nf4_` kernels).
    pub b1: Option<(&'a CudaView<'b, u16>, usize)>,
    pub a2: (&'a CudaView<'b, u16>, usize),
    pub b2: (&'a CudaView<'b, u16>, usize),
    pub bias: Option<&'a CudaView<'b, u16>>,
    pub m: usize,
    pub n: usize,
    pub k1: usize,
    pub k2: usize,
    /// A1 and A2 stored [K, M] instead of [M, K] (dense B stored [K, N] only: the `_km_kn`
    /// kernels, for products reduced over the tokens).
    pub a_km: bool,
    /// B stored [K, N] (dX) instead of [N, K] (forward).
    pub kn: bool,
    /// C = alpha · (the products) (+ bias), scaled in f32 before any rounding.
    pub alpha: f32,
}

/// Where a GEMM puts C `[M, N]`.
pub enum GemmOut<'a, 'b> {
    /// Written in the 16-bit type.
    Half(&'a mut CudaViewMut<'b, u16>),
    /// Written in f32 (LoRA's dA and dB: no zeroing pass before).
    F32(&'a mut CudaViewMut<'b, f32>),
    /// Added in f32 to what the buffer holds (a sum over launches: dW over chunks of rows).
    AddF32(&'a mut CudaViewMut<'b, f32>),
    /// Written in the 16-bit type twice: C, and `s·C` rounded from the same f32 (no bias): XA
    /// and s·XA from one product.
    HalfScaled(&'a mut CudaViewMut<'b, u16>, &'a mut CudaViewMut<'b, u16>, f32),
    /// Added to what the 16-bit buffer holds, in f32, rounded once: dX summed over the linears
    /// that read one input (q, k, v; gate, up) with no separate add.
    HalfAdd(&'a mut CudaViewMut<'b, u16>),
}

impl<'a, 'b> GemmOut<'a, 'b> {
    fn len(&self) -> usize {
        match self {
            GemmOut::Half(c) => c.len(),
            GemmOut::F32(c) | GemmOut::AddF32(c) => c.len(),
            GemmOut::HalfScaled(c, c2, _) => c.len().min(c2.len()),
            GemmOut::HalfAdd(c) => c.len(),
        }
    }

    /// `HalfAdd(c)` when `add`, else `Half(c)`.
    pub fn half(c: &'a mut CudaViewMut<'b, u16>, add: bool) -> Self {
        if add {
            GemmOut::HalfAdd(c)
        } else {
            GemmOut::Half(c)
        }
    }

    /// The kernels' `add_c` flag: add into C (16-bit or f32) instead of writing it.
    pub(super) fn add_c(&self) -> i32 {
        matches!(self, GemmOut::HalfAdd(_) | GemmOut::AddF32(_)) as i32
    }
}

/// Launches `lora_gemm_*`, or `nf4_lora_gemm_*` with W from `nf4`; on an H100 or H200 the big
/// dense products go to `gemm_sm90_*` instead (`super::sm90`). An output with too few
/// blocks to fill the GPU (the rank-R products: XA, G and dB with N = R, dA with M = R, over
/// K = features or tokens; never with a bias) is split along K (`split_k`): each slice of K
/// tiles writes its own f32 `[M, N]` buffer, and the last block of each output tile to finish
/// sums the slices in order into C, in the same launch: the same result every run.
pub(crate) fn gemm(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, g: Gemm, mut c: GemmOut<'_, '_>, nf4: Option<&Nf4Device>) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    if g.a_km && (!g.kn || nf4.is_some()) {
        return Err(Error::InvalidArgument("lora_gemm (cuda): an A stored [K, M] needs a dense B stored [K, N]".into()));
    }
    if matches!(c, GemmOut::HalfScaled(..)) && g.bias.is_some() {
        return Err(Error::InvalidArgument("lora_gemm (cuda): a second, scaled output takes no bias".into()));
    }
    if c.len() < g.m * g.n {
        return Err(Error::InvalidArgument(format!("lora_gemm (cuda): C holds {} elements, below M·N = {}·{}", c.len(), g.m, g.n)));
    }
    if super::sm90::gemm(stream, modules, dt, &g, &mut c, nf4)? {
        return Ok(());
    }
    let layout = match (g.a_km, g.kn) {
        (true, _) => "_km_kn",
        (false, true) => "_kn",
        (false, false) => "",
    };
    let name = format!("{}lora_gemm{layout}_{}", if nf4.is_some() { "nf4_" } else { "" }, dt.suffix());
    let f = modules.function("lora_gemm", &name)?;
    let i = |what: &str, v: usize| to_i32(&name, what, v);
    let (lda1, lda2, ldb2) = (i("lda1", g.a1.1)?, i("lda2", g.a2.1)?, i("ldb2", g.b2.1)?);
    let ldb1 = i("ldb1", g.b1.map_or(0, |b| b.1))?;
    let (m, n, k1, k2) = (i("m", g.m)?, i("n", g.n)?, i("k1", g.k1)?, i("k2", g.k2)?);
    let grid = (g.n.div_ceil(TILE.1), g.m.div_ceil(TILE.0));
    if grid.1 > 65535 {
        return Err(Error::InvalidArgument(format!("{name}: M = {} needs more than 65535 row tiles", g.m)));
    }
    let tiles = g.k1.div_ceil(BK) + g.k2.div_ceil(BK);
    // A bias would be added once per slice: such GEMMs (the plain linear) run whole.
    let (splits, per) = if g.bias.is_some() { (1, tiles) } else { split_k(grid.0 * grid.1, tiles, modules.multiprocessors()) };
    let split = if splits > 1 { i("split", per)? } else { 0 };
    // Split-K's slices (every element of each written by its block before the sum reads it).
    let mut parts = match splits {
        1 => None,
        // SAFETY: plain f32s; the kernel writes every element of a slice within [M, N]
        // before any read of it (see `sum_split_tile` in lora_gemm.cu).
        _ => Some(unsafe { stream.alloc::<f32>(splits * g.m * g.n) }.map_err(|e| Error::cuda(format!("{name}: {splits} split-K slices"), e))?),
    };
    let null = 0u64;
    let alpha2 = match c {
        GemmOut::HalfScaled(_, _, s) => s,
        _ => 0.0,
    };
    let add_c = c.add_c();
    let cfg = LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, splits as u32), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut launch = |done: Option<&mut CudaSlice<u32>>| -> Result<()> {
        let mut bld = stream.launch_builder(&f);
        bld.arg(g.a1.0).arg(&lda1);
        match g.b1 {
            Some((b, _)) => bld.arg(b),
            None => bld.arg(&null),
        };
        bld.arg(&ldb1).arg(g.a2.0).arg(&lda2).arg(g.b2.0).arg(&ldb2);
        match g.bias {
            Some(b) => bld.arg(b),
            None => bld.arg(&null),
        };
        // c, c32, c2
        match &mut c {
            GemmOut::Half(c) | GemmOut::HalfAdd(c) => bld.arg(&mut **c).arg(&null).arg(&null),
            GemmOut::F32(c) | GemmOut::AddF32(c) => bld.arg(&null).arg(&mut **c).arg(&null),
            GemmOut::HalfScaled(c, c2, _) => bld.arg(&mut **c).arg(&null).arg(&mut **c2),
        };
        bld.arg(&m).arg(&n).arg(&k1).arg(&k2).arg(&split).arg(&g.alpha).arg(&alpha2);
        match (parts.as_mut(), done) {
            (Some(p), Some(done)) => bld.arg(p).arg(done),
            _ => bld.arg(&null).arg(&null),
        };
        bld.arg(&add_c);
        if let Some(q) = nf4 {
            q.push_args(&mut bld);
        }
        // SAFETY: argument order and types match the kernel; the caller checked every buffer
        // against (m, n, k1, k2) and its leading dimension, C (and c2) against M·N above; the
        // slices hold splits·m·n floats, the counters (zero, left zero by the kernel) at least
        // one per block of the (x, y) grid.
        unsafe { bld.launch(cfg) }.map_err(launch_err(&name))?;
        Ok(())
    };
    match splits {
        1 => launch(None),
        _ => modules.with_split_counters(stream, grid.0 * grid.1, |done| launch(Some(done))),
    }
}

/// Split-K for an f32 GEMM output of `blocks` blocks over `tiles` K tiles on a GPU with `sms`
/// multiprocessors: (slices, K tiles per slice). Enough slices for two blocks per
/// multiprocessor, each slice at least 8 K tiles; one slice when the grid fills the GPU.
pub(crate) fn split_k(blocks: usize, tiles: usize, sms: usize) -> (usize, usize) {
    let want = (2 * sms).div_ceil(blocks.max(1)).min(tiles / 8).max(1);
    let per = tiles.div_ceil(want).max(1);
    (tiles.div_ceil(per).max(1), per)
}

/// A frozen weight `[N, K]` as the GEMM reads it: 16-bit values, or NF4 dequantized in the
/// tile loads (QLoRA).
#[derive(Clone, Copy)]
pub enum Weight<'a, 'b> {
    Dense(&'a CudaView<'b, u16>),
    Nf4(&'a Nf4Device),
}

impl<'a, 'b> Weight<'a, 'b> {
    fn check(&self, op: &'static str, n: usize, k: usize) -> Result<()> {
        match self {
            Weight::Dense(w) => check_len(op, "w", w.len(), n * k),
            Weight::Nf4(q) => crate::kernels::nf4::cuda::check_weight(op, q, LoraParams { m: 0, n, k, r: 0, scale: 0.0 }),
        }
    }

    /// Whether `m` rows go to the GEMV kernels rather than the GEMM.
    fn gemv_fits(&self, m: usize) -> bool {
        m <= match self {
            Weight::Dense(_) => DENSE_GEMV_MAX_M,
            Weight::Nf4(_) => GEMV_MAX_M,
        }
    }

    /// The GEMM's B1 operand (None: the NF4 weight, passed apart) with leading dimension `ld`.
    fn b1(&self, ld: usize) -> (Option<(&'a CudaView<'b, u16>, usize)>, Option<&'a Nf4Device>) {
        match *self {
            Weight::Dense(w) => (Some((w, ld)), None),
            Weight::Nf4(q) => (None, Some(q)),
        }
    }
}

/// The plain linear (the LoRA GEMM with rank 0): `y = x·wᵀ (+ bias)`, x `[m, k]`, w `[n, k]`,
/// bias `[n]`, y `[m, n]`, all dense.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    x: &CudaView<'_, u16>,
    w: Weight<'_, '_>,
    bias: Option<&CudaView<'_, u16>>,
    y: &mut CudaViewMut<'_, u16>,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let op = "linear (cuda)";
    w.check(op, n, k)?;
    for (what, have, need) in [("x", x.len(), m * k), ("y", y.len(), m * n)] {
        check_len(op, what, have, need)?;
    }
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), n)?;
    }
    for (what, v) in [("M·K", m * k), ("N·K", n * k), ("M·N", m * n)] {
        to_i32(op, what, v)?;
    }
    if w.gemv_fits(m) {
        return gemv(stream, modules, dt, x, w, None, bias, y, (m, n, k));
    }
    let (b1, nf4) = w.b1(k);
    let g = Gemm { a1: (x, k), b1, a2: (x, k), b2: (x, k), bias, m, n, k1: k, k2: 0, a_km: false, kn: false, alpha: 1.0 };
    gemm(stream, modules, dt, g, GemmOut::Half(y), nf4)
}

/// The GEMV kernels (M up to `GEMV_MAX_M` with an NF4 W, `DENSE_GEMV_MAX_M` with a dense one:
/// decoding and tiny batches): `y = x·wᵀ (+ bias) (+ xa_s·bᵀ)`, `lora = (xa_s [M, R], b [N, R],
/// R)` with s already applied to xa_s; one warp per output column. One row (decoding) has its
/// own instances: one accumulator where the others hold 4 or 16, 32 registers (ptxas, sm_90),
/// so the most warps fit on a multiprocessor. The callers checked every length.
#[allow(clippy::too_many_arguments)]
fn gemv(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    x: &CudaView<'_, u16>,
    w: Weight<'_, '_>,
    lora: Option<(&CudaView<'_, u16>, &CudaView<'_, u16>, usize)>,
    bias: Option<&CudaView<'_, u16>>,
    y: &mut CudaViewMut<'_, u16>,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let rows = match (m, w) {
        (1, _) => 1,
        (_, Weight::Dense(_)) => DENSE_GEMV_MAX_M,
        (_, Weight::Nf4(_)) => GEMV_MAX_M,
    };
    let name = format!("{}gemv_m{rows}_{}", if matches!(w, Weight::Nf4(_)) { "nf4_" } else { "" }, dt.suffix());
    let f = modules.function("lora_gemm", &name)?;
    let i = |what: &str, v: usize| to_i32(&name, what, v);
    let r = lora.map_or(0, |l| l.2);
    let (mi, ni, ki, ri) = (i("m", m)?, i("n", n)?, i("k", k)?, i("r", r)?);
    let null = 0u64;
    let mut bld = stream.launch_builder(&f);
    bld.arg(x);
    match lora {
        Some((xa_s, b, _)) => bld.arg(xa_s).arg(b),
        None => bld.arg(&null).arg(&null),
    };
    match bias {
        Some(bias) => bld.arg(bias),
        None => bld.arg(&null),
    };
    bld.arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&ri);
    match w {
        Weight::Dense(w) => {
            bld.arg(w);
        }
        Weight::Nf4(q) => q.push_args(&mut bld),
    }
    // 8 warps per block, one output column each.
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match `*gemv_m*_*` (x, xa_s, b, bias, y, m, n, k, r, then W); the
    // callers checked x, W, bias and y against (m, n, k), and xa_s and b against r.
    unsafe { bld.launch(cfg) }.map_err(launch_err(&name))?;
    Ok(())
}

/// The plain linear's dX: `dx = dy·w`, dy `[m, n]`, w `[n, k]`, dx `[m, k]`; with `add`,
/// `dx += dy·w` (summed in f32 by the GEMM's epilogue, rounded once).
#[allow(clippy::too_many_arguments)]
pub fn linear_dx(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, dy: &CudaView<'_, u16>, w: Weight<'_, '_>, dx: &mut CudaViewMut<'_, u16>, add: bool, (m, n, k): (usize, usize, usize)) -> Result<()> {
    let op = "linear_dx (cuda)";
    w.check(op, n, k)?;
    for (what, have, need) in [("dy", dy.len(), m * n), ("dx", dx.len(), m * k)] {
        check_len(op, what, have, need)?;
    }
    for (what, v) in [("M·K", m * k), ("N·K", n * k), ("M·N", m * n)] {
        to_i32(op, what, v)?;
    }
    let (b1, nf4) = w.b1(k);
    let g = Gemm { a1: (dy, n), b1, a2: (dy, n), b2: (dy, n), bias: None, m, n: k, k1: n, k2: 0, a_km: false, kn: true, alpha: 1.0 };
    gemm(stream, modules, dt, g, GemmOut::half(dx, add), nf4)
}

/// `c[m, n] = aᵀ·b` for a stored `[k, m]` and b `[k, n]`, both dense: a product over the
/// tokens, such as a trained weight's dW = dYᵀ·X. Both operands are read as stored (the
/// `_km_kn` kernels: mma.sync's `ldmatrix.trans`, or on an H100/H200 wgmma reading A
/// MN-major), with no transpose and no copy.
pub fn matmul_tn(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, a: &CudaView<'_, u16>, b: &CudaView<'_, u16>, c: GemmOut<'_, '_>, (m, n, k): (usize, usize, usize)) -> Result<()> {
    let op = "matmul_tn (cuda)";
    check_len(op, "a", a.len(), k * m)?;
    check_len(op, "b", b.len(), k * n)?;
    check_len(op, "c", c.len(), m * n)?;
    for (what, v) in [("K·M", k * m), ("K·N", k * n), ("M·N", m * n)] {
        to_i32(op, what, v)?;
    }
    product(stream, modules, dt, (a, m), (b, n), c, (m, n, k), (true, true), 1.0)
}

/// The plain GEMM (the LoRA GEMM with rank 0): `c[m, n] = a·bᵀ` with b `[n, k]`, or with
/// `b_kn` `c = a·b` with b `[k, n]`; a and b row-major with row strides `lda`, `ldb` (any
/// sub-view: the kernel falls back to element loads where rows are not 16-byte aligned), c
/// dense `[m, n]`, written in 16 bits or added to in f32 (`GemmOut`).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    (a, lda): (&CudaView<'_, u16>, usize),
    (b, ldb): (&CudaView<'_, u16>, usize),
    c: GemmOut<'_, '_>,
    (m, n, k): (usize, usize, usize),
    b_kn: bool,
) -> Result<()> {
    let op = "matmul (cuda)";
    let span = |rows: usize, ld: usize, cols: usize| if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    let (b_rows, b_cols) = if b_kn { (k, n) } else { (n, k) };
    if lda < k || ldb < b_cols {
        return Err(Error::InvalidArgument(format!("{op}: row strides lda {lda} / ldb {ldb} below the rows' widths {k} / {b_cols}")));
    }
    check_len(op, "a", a.len(), span(m, lda, k))?;
    check_len(op, "b", b.len(), span(b_rows, ldb, b_cols))?;
    check_len(op, "c", c.len(), m * n)?;
    for (what, v) in [("M·K", m * k), ("N·K", n * k), ("M·N", m * n)] {
        to_i32(op, what, v)?;
    }
    let g = Gemm { a1: (a, lda), b1: Some((b, ldb)), a2: (a, lda), b2: (b, ldb), bias: None, m, n, k1: k, k2: 0, a_km: false, kn: b_kn, alpha: 1.0 };
    gemm(stream, modules, dt, g, c, None)
}

/// `xa = x_lora·aᵀ` `[M, R]` (the GEMM, A as its `[N, K]` operand) and `xa_s = s·xa` (the
/// forward GEMM's second operand), both rounded from the same f32 sums of one product.
fn xa(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, x_lora: &CudaView<'_, u16>, a: &CudaView<'_, u16>, xa: &mut CudaViewMut<'_, u16>, xa_s: &mut CudaViewMut<'_, u16>, p: LoraParams) -> Result<()> {
    // Views of one lifetime, as GemmOut holds them.
    let (mut c, mut c2) = (xa.slice_mut(..), xa_s.slice_mut(..));
    product(stream, modules, dt, (x_lora, p.k), (a, p.k), GemmOut::HalfScaled(&mut c, &mut c2, p.scale), (p.m, p.r, p.k), (false, false), 1.0)
}

/// Forward: `y = x·wᵀ (+ bias) + s·xa·bᵀ`, `xa = x_lora·aᵀ` (kept for the backward). W dense,
/// or NF4 (QLoRA): dequantized in the GEMM's tile loads. For a few rows (`Weight::gemv_fits`)
/// the GEMV kernels take the place of the GEMM.
pub fn forward(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    x: &CudaView<'_, u16>,
    x_lora: &CudaView<'_, u16>,
    w: Weight<'_, '_>,
    bias: Option<&CudaView<'_, u16>>,
    a: &CudaView<'_, u16>,
    b: &CudaView<'_, u16>,
    y: &mut CudaViewMut<'_, u16>,
    xa_out: &mut CudaViewMut<'_, u16>,
    p: LoraParams,
) -> Result<()> {
    let op = "lora_fwd (cuda)";
    check_dims(op, p)?;
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    w.check(op, n, k)?;
    for (what, have, need) in [("x", x.len(), m * k), ("x_lora", x_lora.len(), m * k), ("a", a.len(), r * k), ("b", b.len(), n * r), ("y", y.len(), m * n), ("xa", xa_out.len(), m * r)] {
        check_len(op, what, have, need)?;
    }
    if let Some(bias) = bias {
        check_len(op, "bias", bias.len(), n)?;
    }
    let mut xa_s = scratch(stream, m * r)?;
    xa(stream, modules, dt, x_lora, a, xa_out, &mut xa_s.slice_mut(..), p)?;
    let xs = xa_s.slice(..);
    if w.gemv_fits(m) {
        return gemv(stream, modules, dt, x, w, Some((&xs, b, r)), bias, y, (m, n, k));
    }
    let (b1, nf4) = w.b1(k);
    let g = Gemm { a1: (x, k), b1, a2: (&xs, r), b2: (b, r), bias, m, n, k1: k, k2: r, a_km: false, kn: false, alpha: 1.0 };
    gemm(stream, modules, dt, g, GemmOut::Half(y), nf4)
}

/// `s·G = s·dy·b` (`[M, R]`, the dX GEMM's second operand), `da = (s·G)ᵀ·x_lora`,
/// `db = s·dyᵀ·xa`, every product on the tensor cores (s applied in f32 by the GEMM's
/// epilogue): G with B `[N, R]` read as the GEMM's `[K, N]` operand; dA and dB reduce over the
/// tokens, so both read their token-major operands as stored (`[K, M]` A, `[K, N]` B: the
/// `_km_kn` kernels), written in f32 to da and db (no zeroing pass). (Used by `backward` for
/// dense and NF4 weights.)
#[allow(clippy::too_many_arguments)]
fn small_grads(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    dy: &CudaView<'_, u16>,
    x_lora: &CudaView<'_, u16>,
    xa: &CudaView<'_, u16>,
    b: &CudaView<'_, u16>,
    da: &mut CudaViewMut<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    p: LoraParams,
) -> Result<CudaSlice<u16>> {
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    let mut gs = scratch(stream, m * r)?;
    product(stream, modules, dt, (dy, n), (b, r), GemmOut::Half(&mut gs.slice_mut(..m * r)), (m, r, n), (false, true), p.scale)?;
    product(stream, modules, dt, (&gs.slice(..m * r), r), (x_lora, k), GemmOut::F32(da), (r, k, m), (true, true), 1.0)?;
    product(stream, modules, dt, (dy, n), (xa, r), GemmOut::F32(db), (n, r, m), (true, true), p.scale)?;
    Ok(gs)
}

/// Backward: `da`, `db` (f32) and, when `dx` is given, `dx = dy·w + s·(dy·b)·a` (with `add_dx`,
/// added to what dx holds, in the GEMM's epilogue), or with `dropout = Some((p, seed))` (the
/// forward's, which made `x_lora`; bf16 only; not with `add_dx`)
/// `dx = dy·w + s·((dy·b)·a) ∘ mask / (1 - p)`, the two products rounded apart, then summed
/// under the mask by `dropout`. W dense or NF4 (QLoRA: dequantized in the GEMM's tile loads).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    dt: Half,
    dy: &CudaView<'_, u16>,
    x_lora: &CudaView<'_, u16>,
    xa: &CudaView<'_, u16>,
    w: Weight<'_, '_>,
    a: &CudaView<'_, u16>,
    b: &CudaView<'_, u16>,
    da: &mut CudaViewMut<'_, f32>,
    db: &mut CudaViewMut<'_, f32>,
    dx: Option<&mut CudaViewMut<'_, u16>>,
    add_dx: bool,
    dropout: Option<(f32, u64)>,
    p: LoraParams,
) -> Result<()> {
    let op = "lora_bwd (cuda)";
    if add_dx && dropout.is_some() {
        return Err(Error::InvalidArgument(format!("{op}: dX under LoRA dropout is summed by the dropout kernel, not added in the GEMM")));
    }
    check_dims(op, p)?;
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    w.check(op, n, k)?;
    for (what, have, need) in [("dy", dy.len(), m * n), ("x_lora", x_lora.len(), m * k), ("xa", xa.len(), m * r), ("a", a.len(), r * k), ("b", b.len(), n * r), ("da", da.len(), r * k), ("db", db.len(), n * r)] {
        check_len(op, what, have, need)?;
    }
    if let Some(dx) = &dx {
        check_len(op, "dx", dx.len(), m * k)?;
    }
    if dropout.is_some() && dt != Half::Bf16 {
        return Err(Error::InvalidArgument(format!("{op}: LoRA dropout has bf16 kernels only, not {dt:?}")));
    }
    let gs = small_grads(stream, modules, dt, dy, x_lora, xa, b, da, db, p)?;
    let gv = gs.slice(..);
    let (b1, nf4) = w.b1(k);
    match (dx, dropout) {
        (Some(dx), None) => {
            let g = Gemm { a1: (dy, n), b1, a2: (&gv, r), b2: (a, k), bias: None, m, n: k, k1: n, k2: r, a_km: false, kn: true, alpha: 1.0 };
            gemm(stream, modules, dt, g, GemmOut::half(dx, add_dx), nf4)?;
        }
        // dY·W and (s·G)·A apart (each a rank-0 GEMM), then summed under the mask.
        (Some(dx), Some((pd, seed))) => {
            let (mut base, mut ga) = (scratch(stream, m * k)?, scratch(stream, m * k)?);
            linear_dx(stream, modules, dt, dy, w, &mut base.slice_mut(..), false, (m, n, k))?;
            let lora = Gemm { a1: (&gv, r), b1: Some((a, k)), a2: (&gv, r), b2: (a, k), bias: None, m, n: k, k1: r, k2: 0, a_km: false, kn: true, alpha: 1.0 };
            gemm(stream, modules, dt, lora, GemmOut::Half(&mut ga.slice_mut(..)), None)?;
            self::dropout(stream, modules, &base.slice(..m * k), Some((&ga.slice(..m * k), 1.0)), dx, pd, seed)?;
        }
        (None, _) => {}
    }
    Ok(())
}

/// The LoRA dropout of `rng::uniform_at(seed, i)`'s mask, bit for bit
/// (`kernels-cuda/dropout.cu`): `y = x * keep` where kept (`keep = 1 / (1 - p)`), else 0. With
/// `axpy = Some((t, s))`: `y = x + s * t * keep` where kept, else `x` (the dropped input's share
/// of dX). f32 (`T = f32`) or bf16 bits (`T = u16`); y may not alias x.
pub fn dropout<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    modules: &ModuleCache,
    x: &CudaView<'_, T>,
    axpy: Option<(&CudaView<'_, T>, f32)>,
    y: &mut CudaViewMut<'_, T>,
    p: f32,
    seed: u64,
) -> Result<()> {
    const OP: &str = "lora dropout (cuda)";
    let n = x.len();
    check_len(OP, "y", y.len(), n)?;
    if let Some((t, _)) = axpy {
        check_len(OP, "t", t.len(), n)?;
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!("{OP}: p must be in [0, 1), got {p}")));
    }
    let suffix = match std::mem::size_of::<T>() {
        4 => "f32",
        2 => "bf16",
        s => return Err(Error::InvalidArgument(format!("{OP}: no kernel for {s}-byte elements"))),
    };
    if n == 0 {
        return Ok(());
    }
    let name = if axpy.is_some() { format!("dropout_axpy_{suffix}") } else { format!("dropout_{suffix}") };
    let f = modules.function("dropout", &name)?;
    let cfg = LaunchConfig { grid_dim: ((n.div_ceil(256) as u32).min(65535 * 8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (n64, keep) = (n as i64, 1.0f32 / (1.0 - p));
    let mut b = stream.launch_builder(&f);
    b.arg(x);
    if let Some((t, _)) = &axpy {
        b.arg(*t);
    }
    b.arg(y).arg(&n64).arg(&seed).arg(&p).arg(&keep);
    if let Some((_, s)) = &axpy {
        b.arg(s);
    }
    // SAFETY: the argument list matches dropout_* / dropout_axpy_* (pointers, long, u64, floats);
    // x, t and y hold at least n elements (checked above).
    unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn split_k_covers_every_tile_with_no_empty_slice() {
        // dA of a Llama-1B linear on an H100: M = R = 16 (1 row tile), N = 2048 (32 column
        // tiles), K = 8192 tokens (256 tiles).
        assert_eq!(split_k(32, 256, 132), (9, 29));
        // A grid that fills the GPU, or too few K tiles: one slice.
        assert_eq!(split_k(4096, 256, 132), (1, 256));
        assert_eq!(split_k(4, 7, 132), (1, 7));
        for blocks in [1, 3, 32, 100, 263, 264, 1000] {
            for tiles in [0, 1, 8, 15, 16, 17, 64, 255, 256, 1000] {
                let (s, per) = split_k(blocks, tiles, 132);
                assert!(s >= 1 && per >= 1, "{blocks} blocks, {tiles} tiles: ({s}, {per})");
                assert!(s * per >= tiles && (s - 1) * per < tiles.max(1), "{blocks} blocks, {tiles} tiles: ({s}, {per}) leaves a tile out or a slice empty");
                assert!(s == 1 || per >= 8, "{blocks} blocks, {tiles} tiles: slices of {per} tiles");
            }
        }
    }
}
