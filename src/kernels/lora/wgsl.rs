//! WGSL launchers of the LoRA GEMM family (see `super`, `kernels-wgsl/lora_gemm.wgsl` and, for a few rows, `kernels-wgsl/gemv.wgsl`).
//!
//! They take wgpu's own types: a program with its own `wgpu::Device` and `Queue` keeps one
//! [`KernelCache`](crate::device::wgpu::KernelCache) beside them and passes storage buffers. The fused forward in f32, against
//! the f64 reference (here on the device and queue tuna opened for the first adapter):
//!
//! ```
//! use tuna::device::wgpu::{adapters, download, runtime, KernelCache};
//! use tuna::kernels::lora::wgsl::{forward, Precision, Weight};
//! use tuna::kernels::lora::{reference, LoraParams};
//! use tuna::testing::{compare, Tolerance};
//! use wgpu::util::DeviceExt;
//!
//! if adapters().is_empty() {
//!     return Ok(()); // no wgpu adapter on this machine
//! }
//! let rt = runtime(0)?;
//! let (device, queue, kernels) = (&rt.device, &rt.queue, KernelCache::new());
//!
//! let p = LoraParams { m: 20, n: 36, k: 50, r: 4, scale: 2.0 };
//! let values = |len: usize, step: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * step).sin() / 2.0).collect() };
//! let (x, w, a, b) = (values(p.m * p.k, 0.7), values(p.n * p.k, 1.3), values(p.r * p.k, 0.9), values(p.n * p.r, 1.1));
//! let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
//! let buffer = |v: &[f32]| device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(v), usage });
//! let (xb, wb, ab, bb) = (buffer(&x), buffer(&w), buffer(&a), buffer(&b));
//! let (yb, xab) = (buffer(&vec![0.0; p.m * p.n]), buffer(&vec![0.0; p.m * p.r]));
//!
//! // y = x·wᵀ + s·(x·aᵀ)·bᵀ, and xa = x·aᵀ for the backward (x is also the LoRA input).
//! forward(device, queue, &kernels, &xb, &xb, Weight::Dense(&wb), None, &ab, &bb, &yb, &xab, p, Precision::F32)?;
//! let y: Vec<f32> = bytemuck::pod_collect_to_vec(&download(device, queue, &yb, p.m * p.n * 4)?);
//!
//! let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&v| v as f64).collect() };
//! let (y_ref, _) = reference::forward(&f64s(&x), &f64s(&x), &f64s(&w), None, &f64s(&a), &f64s(&b), p);
//! compare("y", &y, &y_ref, Tolerance::F32)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With `Precision::F16` (where the adapter has SHADER_F16) the buffers hold f16 values.

use super::LoraParams;
use crate::device::wgpu::{KernelCache, PooledBuffer};
use crate::kernels::check_len;
use crate::kernels::nf4::wgsl as nf4;
use crate::{Error, Result};

pub const SOURCE: &str = wgsl_source!("lora_gemm.wgsl");
pub const GEMV_SOURCE: &str = wgsl_source!("gemv.wgsl");
/// The largest M that [`forward`] sends to `gemv.wgsl` (both XA and Y, dense or NF4 W) rather
/// than the 64×64 GEMM, which would compute 64 rows for these few.
pub const GEMV_MAX_M: usize = 16;
/// Output columns of one `gemv.wgsl` workgroup.
const GEMV_COLS: usize = 4;
/// Output tile of one workgroup (both shaders).
pub(crate) const TILE: usize = 64;
pub(crate) const FLAG_BIAS: u32 = 1;
/// `lora_gemm.wgsl` only: add the product to C instead of overwriting it.
pub(crate) const FLAG_ACCUMULATE: u32 = 2;

/// Storage of a LoRA GEMM call's inputs and outputs (dA and dB are f32 either way).
pub use crate::device::wgpu::Precision;

/// The (operands, output) types of a pass producing an activation in precision `p`.
fn same(p: Precision) -> Types {
    match p {
        Precision::F32 => Types::F32,
        Precision::F16 => Types::F16,
    }
}

/// The types of a pass producing an f32 gradient (dA, dB) from operands in precision `p`.
fn to_f32(p: Precision) -> Types {
    match p {
        Precision::F32 => Types::F32,
        Precision::F16 => Types::F16ToF32,
    }
}

/// Element types (operands `T`, output `TC`) of one pass: the shader's aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Types {
    F32,
    F16,
    F16ToF32,
    /// A f32, B f16, C f32: an f32 gradient against an f16 weight (the fused loss's dX).
    F32F16ToF32,
}

impl Types {
    /// The aliases set to f16, and a pipeline-name suffix.
    fn f16_aliases(self) -> (&'static [&'static str], &'static str) {
        match self {
            Types::F32 => (&[], ""),
            Types::F16 => (&["TA", "TB", "TC"], "::f16"),
            Types::F16ToF32 => (&["TA", "TB"], "::f16_to_f32"),
            Types::F32F16ToF32 => (&["TB"], "::f32_f16_to_f32"),
        }
    }

    /// `source` (a LoRA shader declaring the aliases `TA`, `TB`, `TC`) with this
    /// variant's aliases set, made once per variant in `cache`, and the pipeline-name suffix.
    fn variant(self, source: &'static str, cache: &'static [std::sync::OnceLock<String>; 4]) -> (&'static str, &'static str) {
        let (aliases, suffix) = self.f16_aliases();
        if aliases.is_empty() {
            return (source, suffix);
        }
        (cache[self as usize].get_or_init(|| crate::device::wgpu::f16_variant(source, aliases)), suffix)
    }

    /// `lora_gemm.wgsl` in these types.
    fn source(self) -> (&'static str, &'static str) {
        static CACHE: [std::sync::OnceLock<String>; 4] = [const { std::sync::OnceLock::new() }; 4];
        self.variant(SOURCE, &CACHE)
    }

    /// `nf4_gemm.wgsl` in these types.
    fn nf4_source(self) -> (&'static str, &'static str) {
        static CACHE: [std::sync::OnceLock<String>; 4] = [const { std::sync::OnceLock::new() }; 4];
        self.variant(nf4::SOURCE, &CACHE)
    }

    /// `gemv.wgsl` in these types, with sums for 16 rows or (`one_row`, decoding) for one:
    /// on lavapipe the one-row instance ran a decoding step's linears 2.5-4x faster than the
    /// 16-row one, and on a GPU it holds 15 fewer registers. The pipeline-name suffix too.
    fn gemv_source(self, one_row: bool) -> (&'static str, String) {
        static CACHE: [std::sync::OnceLock<String>; 4] = [const { std::sync::OnceLock::new() }; 4];
        static ONE_ROW: [std::sync::OnceLock<String>; 4] = [const { std::sync::OnceLock::new() }; 4];
        static ONE_ROW_F32: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        if !one_row {
            let (source, suffix) = self.variant(GEMV_SOURCE, &CACHE);
            return (source, suffix.to_string());
        }
        const ROWS: &str = "const MAXM: u32 = 16u;";
        let f32_source = ONE_ROW_F32.get_or_init(|| {
            debug_assert!(GEMV_SOURCE.contains(ROWS), "gemv.wgsl declares no `{ROWS}`");
            GEMV_SOURCE.replacen(ROWS, "const MAXM: u32 = 1u;", 1)
        });
        let (source, suffix) = self.variant(f32_source, &ONE_ROW);
        (source, format!("::m1{suffix}"))
    }
}

/// The frozen weight W `[N, K]` of a LoRA GEMM: stored in the activations' precision, or NF4
/// (QLoRA) and dequantized in `nf4_gemm.wgsl`'s tile loads (f32, whatever the precision).
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    Dense(&'a wgpu::Buffer),
    Nf4(&'a nf4::Nf4Buffers),
}

impl Weight<'_> {
    fn check(&self, op: &'static str, bytes: usize, p: LoraParams) -> Result<()> {
        match self {
            Weight::Dense(w) => check_elems(op, bytes, &[("w", w, p.n * p.k)]),
            Weight::Nf4(q) if q.len != p.n * p.k => Err(Error::InvalidArgument(format!("{op}: NF4 weight holds {} elements, needs N·K = {}", q.len, p.n * p.k))),
            Weight::Nf4(_) => Ok(()),
        }
    }
}

/// The K + R pass `c = op(A1)·op(W) + s2·op(A2)·op(B2) (+ bias)` of the forward (Y) and of dX,
/// W dense (`lora_gemm.wgsl`) or NF4 (`nf4_gemm.wgsl`); `u` holds the shapes, scales and
/// strides (W's index its flat `[N, K]` elements in both shaders).
#[allow(clippy::too_many_arguments)]
fn weight_pass(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    types: Types,
    w: Weight<'_>,
    u: &GemmUniform,
    [a1, a2, b2]: [&wgpu::Buffer; 3],
    bias: Option<&wgpu::Buffer>,
    c: &wgpu::Buffer,
    groups: (u32, u32),
) -> Result<()> {
    // Without a bias (flag unset) the binding is never read; any buffer binds.
    let bias = bias.unwrap_or(a1);
    match w {
        Weight::Dense(w) => lora_pass(device, kernels, enc, types, "lora_gemm", u, &[(1, a1), (2, w), (3, a2), (4, b2), (5, bias), (6, c)], groups),
        Weight::Nf4(q) => {
            let (source, suffix) = types.nf4_source();
            let mut bind = nf4::weight_bindings(q).to_vec();
            bind.extend([(1, a1), (6, a2), (7, b2), (8, bias), (9, c)]);
            pass(device, kernels, enc, (&format!("nf4_gemm::nf4_lora_gemm{suffix}"), source, "nf4_lora_gemm"), &GemmUniform { offset: q.offset, ..*u }, &bind, groups)
        }
    }
}

/// `y = x·wᵀ (+ bias) (+ s·xa·bᵀ)` for `m <= GEMV_MAX_M` rows (`gemv.wgsl`), x `[m, k]`, w
/// `[n, k]` dense or NF4, `lora = (xa [m, r], b [n, r], r, s)`. The caller checked every length.
#[allow(clippy::too_many_arguments)]
fn gemv_pass(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    types: Types,
    w: Weight<'_>,
    x: &wgpu::Buffer,
    lora: Option<(&wgpu::Buffer, &wgpu::Buffer, usize, f32)>,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    debug_assert!(m <= GEMV_MAX_M);
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Bindings a pass does not read (no adapter, no bias) take any buffer.
    let (xa, b, r, s) = lora.unwrap_or((x, x, 0, 0.0));
    let mut u = GemmUniform { m: m as u32, n: n as u32, k1: k as u32, k2: r as u32, s2: s, flags: if bias.is_some() { FLAG_BIAS } else { 0 }, ..Default::default() };
    let mut bind = vec![(1, x), (3, xa), (4, b), (5, bias.unwrap_or(x)), (6, y)];
    let entry = match w {
        Weight::Dense(w) => {
            bind.push((2, w));
            "gemv"
        }
        Weight::Nf4(q) => {
            // `gemv.wgsl` binds the NF4 buffers at 7..=10, `nf4_gemm.wgsl` at 2..=5.
            bind.extend(nf4::weight_bindings(q).map(|(i, b)| (i + 5, b)));
            u.offset = q.offset;
            "nf4_gemv"
        }
    };
    let (source, suffix) = types.gemv_source(m == 1);
    let name = format!("gemv::{entry}{suffix}");
    let groups = crate::device::wgpu::grid(to_u32(&name, "workgroups", n.div_ceil(GEMV_COLS))?);
    pass(device, kernels, enc, (&name, source, entry), &u, &bind, groups)
}

/// The uniform of `lora_gemm.wgsl` and `nf4_gemm.wgsl` (`Params` of `gemm_params.wgsli`, which
/// both include) and of `gemv.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GemmUniform {
    pub m: u32,
    pub n: u32,
    pub k1: u32,
    pub k2: u32,
    /// (row stride, column stride) of op(A1), op(B1), op(A2), op(B2).
    pub strides: [[u32; 2]; 4],
    pub s1: f32,
    pub s2: f32,
    pub flags: u32,
    pub len: u32,
    pub offset: f32,
    pub _pad: [u32; 3],
}

/// Row-major operand strides: `[rows, cols]` as stored, read plain or transposed.
pub fn plain(cols: usize) -> [u32; 2] {
    [cols as u32, 1]
}
pub fn transposed(cols: usize) -> [u32; 2] {
    [1, cols as u32]
}

pub(crate) fn to_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{op}: {what} = {v} exceeds u32")))
}

/// Checks every `(name, buffer, f32 elements)`; lengths must also index in u32.
pub(crate) fn check_buffers(op: &'static str, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<()> {
    check_elems(op, 4, bufs)
}

/// `check_buffers` for elements of `bytes` bytes.
fn check_elems(op: &'static str, bytes: usize, bufs: &[(&str, &wgpu::Buffer, usize)]) -> Result<()> {
    for (name, b, elems) in bufs {
        to_u32(op, &format!("length of `{name}`"), *elems)?;
        check_len(op, name, b.size() as usize / bytes, *elems)?;
    }
    Ok(())
}

/// Scratch for `elems` f32 values, at least 4 (a vec4's binding), from the pool where tuna
/// opened the device.
pub(crate) fn scratch(device: &wgpu::Device, elems: usize) -> PooledBuffer {
    crate::device::wgpu::scratch(device, 4 * elems.max(4))
}

/// Records one pass of `entry` in `source` over an `[m, n]` output, binding the uniform at 0
/// and `buffers` as `(binding, buffer)`.
pub(crate) fn pass(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    (name, source, entry): (&str, &str, &str),
    u: &GemmUniform,
    buffers: &[(u32, &wgpu::Buffer)],
    groups: (u32, u32),
) -> Result<()> {
    if groups.0 == 0 || groups.1 == 0 {
        return Ok(());
    }
    if groups.0 > 65535 || groups.1 > 65535 {
        return Err(Error::InvalidArgument(format!("{name}: {groups:?} workgroups exceed the 65535 per dimension limit")));
    }
    let pipe = kernels.pipeline(device, name, source, entry)?;
    let ub = crate::device::wgpu::uniform(device, u);
    let mut binds = vec![(0, &ub)];
    binds.extend_from_slice(buffers);
    crate::device::wgpu::encode(device, enc, &pipe, &binds, (groups.0, groups.1, 1));
    Ok(())
}

pub(crate) fn tiles(m: usize, n: usize) -> (u32, u32) {
    (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32)
}

/// `c[m, n] = s · op(a)[m, k] · op(b)[k, n]` (the `gemm` entry point) in the element types
/// `types`; `flags` may add `FLAG_ACCUMULATE`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_flags(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    (a, sa): (&wgpu::Buffer, [u32; 2]),
    (b, sb): (&wgpu::Buffer, [u32; 2]),
    c: &wgpu::Buffer,
    (m, n, k): (usize, usize, usize),
    s: f32,
    types: Types,
    flags: u32,
) -> Result<()> {
    let u = GemmUniform { m: m as u32, n: n as u32, k1: k as u32, strides: [sa, sb, [0, 0], [0, 0]], s1: s, flags, ..Default::default() };
    lora_pass(device, kernels, enc, types, "gemm", &u, &[(1, a), (2, b), (3, a), (4, b), (5, a), (6, c)], tiles(m, n))
}

/// `pass` of an entry point of `lora_gemm.wgsl` with the element types `types`.
#[allow(clippy::too_many_arguments)]
fn lora_pass(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    types: Types,
    entry: &str,
    u: &GemmUniform,
    buffers: &[(u32, &wgpu::Buffer)],
    groups: (u32, u32),
) -> Result<()> {
    let (source, suffix) = types.source();
    pass(device, kernels, enc, (&format!("lora_gemm::{entry}{suffix}"), source, entry), u, buffers, groups)
}

pub const DROPOUT_SOURCE: &str = wgsl_source!("dropout.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutUniform {
    len: u32,
    seed_lo: u32,
    seed_hi: u32,
    p: f32,
    keep: f32,
    s: f32,
    _pad: [u32; 2],
}

/// The storage types of a dropout launch: x (and t) in, y out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutTypes {
    F32,
    /// The dropped input of an f16 model.
    F16,
    /// f32 in, f16 out: dX of an f16 model from f32 products.
    F32ToF16,
}

impl DropoutTypes {
    fn source(self) -> (&'static str, &'static str, usize, usize) {
        use std::sync::OnceLock;
        static F16: OnceLock<String> = OnceLock::new();
        static F32_TO_F16: OnceLock<String> = OnceLock::new();
        use crate::device::wgpu::f16_variant;
        match self {
            DropoutTypes::F32 => (DROPOUT_SOURCE, "", 4, 4),
            DropoutTypes::F16 => (F16.get_or_init(|| f16_variant(DROPOUT_SOURCE, &["TX", "TY"])), "::f16", 2, 2),
            DropoutTypes::F32ToF16 => (F32_TO_F16.get_or_init(|| f16_variant(DROPOUT_SOURCE, &["TY"])), "::f32_to_f16", 4, 2),
        }
    }
}

/// The LoRA dropout of `len` elements with `rng::uniform_at(seed, i)`'s mask, bit for bit:
/// `y = x * keep` where kept (`keep = 1 / (1 - p)`), else 0. With `axpy = Some((t, s))`:
/// `y = x + s * t * keep` where kept, else `x` (the dropped input's share of dX). f32 math;
/// `types` gives the storage (f16 needs SHADER_F16).
#[allow(clippy::too_many_arguments)]
pub fn dropout(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    x: &wgpu::Buffer,
    axpy: Option<(&wgpu::Buffer, f32)>,
    y: &wgpu::Buffer,
    len: usize,
    p: f32,
    seed: u64,
    types: DropoutTypes,
) -> Result<()> {
    let op = "lora dropout (wgsl)";
    let (source, suffix, xb, yb) = types.source();
    if types != DropoutTypes::F32 {
        Precision::F16.check(device, op)?;
    }
    check_elems(op, xb, &[("x", x, len)])?;
    check_elems(op, yb, &[("y", y, len)])?;
    if let Some((t, _)) = axpy {
        check_elems(op, xb, &[("t", t, len)])?;
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!("{op}: p must be in [0, 1), got {p}")));
    }
    if len == 0 {
        return Ok(());
    }
    let u = DropoutUniform {
        len: to_u32(op, "len", len)?,
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        p,
        keep: 1.0 / (1.0 - p),
        s: axpy.map_or(0.0, |a| a.1),
        _pad: [0; 2],
    };
    let entry = if axpy.is_some() { "dropout_axpy" } else { "dropout" };
    let pipe = kernels.pipeline(device, &format!("{entry}{suffix}"), source, entry)?;
    let ub = crate::device::wgpu::uniform(device, &u);
    let (gx, gy) = crate::device::wgpu::grid((len as u32).div_ceil(256));
    let mut binds = vec![(0u32, &ub), (1, x), (3, y)];
    if let Some((t, _)) = axpy {
        binds.push((2, t));
    }
    crate::device::wgpu::dispatch_bound(device, queue, &pipe, &binds, (gx, gy, 1));
    Ok(())
}

/// `c[m, n] = op(a)·op(b)` with op(a) `[m, k]` and op(b) `[k, n]` given by their (row, column)
/// strides (see [`plain`] and [`transposed`]): the plain GEMM (rank 0 of the LoRA GEMM), every
/// operand stored in `precision`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    a: (&wgpu::Buffer, [u32; 2]),
    b: (&wgpu::Buffer, [u32; 2]),
    c: &wgpu::Buffer,
    mnk: (usize, usize, usize),
    precision: Precision,
) -> Result<()> {
    matmul_out(device, queue, kernels, a, b, c, mnk, precision, false)
}

/// [`matmul`], with `c` in f32 whatever `precision` the operands have when `f32_out` (a
/// gradient kept in f32: sparse fine-tuning's dW, from which dδ is gathered).
#[allow(clippy::too_many_arguments)]
pub fn matmul_out(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    (a, sa): (&wgpu::Buffer, [u32; 2]),
    (b, sb): (&wgpu::Buffer, [u32; 2]),
    c: &wgpu::Buffer,
    (m, n, k): (usize, usize, usize),
    precision: Precision,
    f32_out: bool,
) -> Result<()> {
    let op = "matmul (wgsl)";
    precision.check(device, op)?;
    check_elems(op, precision.bytes(), &[("a", a, m * k), ("b", b, k * n)])?;
    check_elems(op, if f32_out { 4 } else { precision.bytes() }, &[("c", c, m * n)])?;
    let types = if f32_out { to_f32(precision) } else { same(precision) };
    let mut enc = device.create_command_encoder(&Default::default());
    if m <= GEMV_MAX_M && sa == plain(k) && sb == transposed(k) {
        // `a·bᵀ` with b `[n, k]` (a linear, the LM head of a decoding step): b is a GEMV's W.
        gemv_pass(device, kernels, &mut enc, types, Weight::Dense(b), a, None, None, c, (m, n, k))?;
    } else {
        product_flags(device, kernels, &mut enc, (a, sa), (b, sb), c, (m, n, k), 1.0, types, 0)?;
    }
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}

/// Forward: `y = x·wᵀ (+ bias) + s·xa·bᵀ` and `xa = x_lora·aᵀ` (`[M, R]`, kept for the
/// backward). Two passes: XA first, then one GEMM over K + R into y; for M up to
/// [`GEMV_MAX_M`] both are GEMVs (`gemv.wgsl`). W dense or NF4.
pub fn forward(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    x: &wgpu::Buffer,
    x_lora: &wgpu::Buffer,
    w: Weight<'_>,
    bias: Option<&wgpu::Buffer>,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
    y: &wgpu::Buffer,
    xa: &wgpu::Buffer,
    p: LoraParams,
    precision: Precision,
) -> Result<()> {
    let op = "lora_fwd (wgsl)";
    precision.check(device, op)?;
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    let bytes = precision.bytes();
    w.check(op, bytes, p)?;
    check_elems(op, bytes, &[("x", x, m * k), ("x_lora", x_lora, m * k), ("a", a, r * k), ("b", b, n * r), ("y", y, m * n), ("xa", xa, m * r)])?;
    if let Some(bias) = bias {
        check_elems(op, bytes, &[("bias", bias, n)])?;
    }
    let types = same(precision);
    let mut enc = device.create_command_encoder(&Default::default());
    if m <= GEMV_MAX_M {
        // A few rows: XA = x_lora·Aᵀ (A `[R, K]` read as W is) and Y, each weight read once.
        if r > 0 {
            gemv_pass(device, kernels, &mut enc, types, Weight::Dense(a), x_lora, None, None, xa, (m, r, k))?;
        }
        gemv_pass(device, kernels, &mut enc, types, w, x, Some((xa, b, r, p.scale)), bias, y, (m, n, k))?;
        crate::device::wgpu::submit(device, queue, enc);
        return Ok(());
    }
    product_flags(device, kernels, &mut enc, (x_lora, plain(k)), (a, transposed(k)), xa, (m, r, k), 1.0, types, 0)?;
    let u = GemmUniform {
        m: m as u32,
        n: n as u32,
        k1: k as u32,
        k2: r as u32,
        strides: [plain(k), transposed(k), plain(r), transposed(r)],
        s1: 1.0,
        s2: p.scale,
        flags: if bias.is_some() { FLAG_BIAS } else { 0 },
        ..Default::default()
    };
    weight_pass(device, kernels, &mut enc, types, w, &u, [x, xa, b], bias, y, tiles(m, n))?;
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}

/// The rank-R gradients: `g = dy·b` (`[M, R]`, returned for dX), `da = s·gᵀ·x_lora`,
/// `db = s·dyᵀ·xa`. Shared with the NF4 backward.
pub(crate) fn small_grads(
    device: &wgpu::Device,
    kernels: &KernelCache,
    enc: &mut wgpu::CommandEncoder,
    dy: &wgpu::Buffer,
    x_lora: &wgpu::Buffer,
    xa: &wgpu::Buffer,
    b: &wgpu::Buffer,
    da: &wgpu::Buffer,
    db: &wgpu::Buffer,
    p: LoraParams,
    precision: Precision,
) -> Result<PooledBuffer> {
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    let (act, grad) = (same(precision), to_f32(precision));
    let g = scratch(device, m * r);
    product_flags(device, kernels, enc, (dy, plain(n)), (b, plain(r)), g.buffer(), (m, r, n), 1.0, act, 0)?;
    product_flags(device, kernels, enc, (g.buffer(), transposed(r)), (x_lora, plain(k)), da, (r, k, m), p.scale, grad, 0)?;
    product_flags(device, kernels, enc, (dy, transposed(n)), (xa, plain(r)), db, (n, r, m), p.scale, grad, 0)?;
    Ok(g)
}

/// Backward: `da = s·(dy·b)ᵀ·x_lora`, `db = s·dyᵀ·xa`, and when `dx` is given
/// `dx = dy·w + s·(dy·b)·a`, or with `dropout = Some((p, seed))` (the forward's, which made
/// `x_lora`) `dx = dy·w + s·((dy·b)·a) ∘ mask / (1 - p)`: the two products apart and the masked
/// sum by `dropout`. W (dense or NF4) gets no gradient.
pub fn backward(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    kernels: &KernelCache,
    dy: &wgpu::Buffer,
    x_lora: &wgpu::Buffer,
    xa: &wgpu::Buffer,
    w: Weight<'_>,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
    da: &wgpu::Buffer,
    db: &wgpu::Buffer,
    dx: Option<&wgpu::Buffer>,
    dropout: Option<(f32, u64)>,
    p: LoraParams,
    precision: Precision,
) -> Result<()> {
    let op = "lora_bwd (wgsl)";
    precision.check(device, op)?;
    let (m, n, k, r) = (p.m, p.n, p.k, p.r);
    let bytes = precision.bytes();
    w.check(op, bytes, p)?;
    check_elems(op, bytes, &[("dy", dy, m * n)])?;
    if let Some(dx) = dx {
        check_elems(op, bytes, &[("dx", dx, m * k)])?;
    }
    let mut enc = device.create_command_encoder(&Default::default());
    // Without an adapter (R = 0) only dX = dY·W runs: x_lora, XA, A, B, dA and dB are never
    // read or written, so any buffers bind in their places.
    let g = if r == 0 {
        scratch(device, 0)
    } else {
        check_elems(op, bytes, &[("x_lora", x_lora, m * k), ("xa", xa, m * r), ("a", a, r * k), ("b", b, n * r)])?;
        check_buffers(op, &[("da", da, r * k), ("db", db, n * r)])?;
        small_grads(device, kernels, &mut enc, dy, x_lora, xa, b, da, db, p, precision)?
    };
    let g = g.buffer();
    // dX's pass: A1 = dY, W read along its rows, A2 = G, B2 = A.
    let mut u = GemmUniform {
        m: m as u32,
        n: k as u32,
        k1: n as u32,
        k2: r as u32,
        strides: [plain(n), plain(k), plain(r), plain(k)],
        s1: 1.0,
        s2: p.scale,
        ..Default::default()
    };
    match (dx, dropout) {
        (Some(dx), None) => weight_pass(device, kernels, &mut enc, same(precision), w, &u, [dy, g, a], None, dx, tiles(m, k))?,
        // The two products apart in f32 (from f16 operands in f16): dY·W (the K + R pass with
        // no R) and G·A, then summed under the mask and stored in dX's type.
        (Some(dx), Some((pd, seed))) => {
            let (base, ga) = (scratch(device, m * k), scratch(device, m * k));
            let (types, drop) = match precision {
                Precision::F32 => (Types::F32, DropoutTypes::F32),
                Precision::F16 => (Types::F16ToF32, DropoutTypes::F32ToF16),
            };
            u.k2 = 0;
            weight_pass(device, kernels, &mut enc, types, w, &u, [dy, g, a], None, base.buffer(), tiles(m, k))?;
            product_flags(device, kernels, &mut enc, (g, plain(r)), (a, plain(k)), ga.buffer(), (m, k, r), 1.0, types, 0)?;
            crate::device::wgpu::submit(device, queue, enc);
            return self::dropout(device, queue, kernels, base.buffer(), Some((ga.buffer(), p.scale)), dx, m * k, pd, seed, drop);
        }
        (None, _) => {}
    }
    crate::device::wgpu::submit(device, queue, enc);
    Ok(())
}
