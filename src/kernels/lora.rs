//! Fused LoRA linear: `Y = X·Wᵀ (+ bias) + s·(X̃·Aᵀ)·Bᵀ`, with X̃ the LoRA input after dropout
//! (`X̃ = X ⊙ mask / (1 - p)`, or X itself without dropout).
//!
//! Shapes: X `[M, K]`, W `[N, K]` (frozen), bias `[N]` (frozen), A `[R, K]`, B `[N, R]`,
//! Y `[M, N]`; the forward also returns `XA = X̃·Aᵀ` `[M, R]` for the backward.
//!
//! Backward, small (rank-R) products first, W gets no gradient (`G = dY·B`, `[M, R]`):
//! - `dX = dY·W + s·(G·A) ⊙ mask / (1 - p)`
//! - `dA = s·Gᵀ·X̃`
//! - `dB = s·dYᵀ·XA`
//!
//! CPU path: the `gemm` crate; the LoRA term is accumulated into the base product's output
//! (`Y += s·XA·Bᵀ` in one call), so Y is written once. GPU kernels: the LoRA-GEMM family.

use crate::kernels::matmul::MatmulParams;

/// Sizes and scale of one LoRA linear.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl LoraParams {
    fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> MatmulParams {
        MatmulParams { m, n, k, trans_a, trans_b }
    }
}

pub mod reference {
    use super::LoraParams;
    use crate::kernels::matmul::reference::matmul;

    /// Returns (Y, XA). `x_lora` is the dropped-out input (X itself without dropout).
    pub fn forward(x: &[f64], x_lora: &[f64], w: &[f64], bias: Option<&[f64]>, a: &[f64], b: &[f64], p: LoraParams) -> (Vec<f64>, Vec<f64>) {
        let mut y = matmul(x, w, LoraParams::mm(p.m, p.n, p.k, false, true));
        let xa = matmul(x_lora, a, LoraParams::mm(p.m, p.r, p.k, false, true));
        let lora = matmul(&xa, b, LoraParams::mm(p.m, p.n, p.r, false, true));
        for (i, y) in y.iter_mut().enumerate() {
            *y += p.scale as f64 * lora[i] + bias.map_or(0.0, |b| b[i % p.n]);
        }
        (y, xa)
    }

    /// Returns (dX, dA, dB) for upstream gradient `dy`; `drop_scale` is `mask / (1 - p)` per
    /// element of X when dropout was applied (then `x_lora = X ⊙ drop_scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(dy: &[f64], x_lora: &[f64], xa: &[f64], w: &[f64], a: &[f64], b: &[f64], drop_scale: Option<&[f64]>, p: LoraParams) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let s = p.scale as f64;
        let g = matmul(dy, b, LoraParams::mm(p.m, p.r, p.n, false, false));
        let da: Vec<f64> = matmul(&g, x_lora, LoraParams::mm(p.r, p.k, p.m, true, false)).iter().map(|v| s * v).collect();
        let db: Vec<f64> = matmul(dy, xa, LoraParams::mm(p.n, p.r, p.m, true, false)).iter().map(|v| s * v).collect();
        let mut dx = matmul(dy, w, LoraParams::mm(p.m, p.k, p.n, false, false));
        let ga = matmul(&g, a, LoraParams::mm(p.m, p.k, p.r, false, false));
        for (i, d) in dx.iter_mut().enumerate() {
            *d += s * ga[i] * drop_scale.map_or(1.0, |ds| ds[i]);
        }
        (dx, da, db)
    }
}

pub mod cpu {
    use super::LoraParams;
    use crate::kernels::matmul::cpu::{matmul_acc, matmul_new};
    use crate::Result;

    /// Returns `y` (`[M, N]`) and `xa` (`[M, R]`). `w` is W `[N, K]`, or Wᵀ `[K, N]` when
    /// `w_transposed` (the layout the CPU GEMM reads fastest; see `Tensor::cpu_f32_transposed`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(x: &[f32], x_lora: &[f32], w: &[f32], w_transposed: bool, bias: Option<&[f32]>, a: &[f32], b: &[f32], p: LoraParams) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut y = matmul_new(x, w, LoraParams::mm(p.m, p.n, p.k, false, !w_transposed))?;
        let xa = matmul_new(x_lora, a, LoraParams::mm(p.m, p.r, p.k, false, true))?;
        matmul_acc(&xa, b, &mut y, LoraParams::mm(p.m, p.n, p.r, false, true), p.scale)?;
        if let Some(bias) = bias {
            for row in y.chunks_mut(p.n) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        Ok((y, xa))
    }

    /// Gradients of the LoRA linear: writes dA and dB, returns dX when `want_dx`.
    /// `drop_scale` holds `mask / (1 - p)` per element of X when dropout was applied.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        dy: &[f32],
        x_lora: &[f32],
        xa: &[f32],
        w: &[f32],
        a: &[f32],
        b: &[f32],
        drop_scale: Option<&[f32]>,
        want_dx: bool,
        da: &mut [f32],
        db: &mut [f32],
        p: LoraParams,
    ) -> Result<Option<Vec<f32>>> {
        // G = dY·B  [M, R]
        let g = matmul_new(dy, b, LoraParams::mm(p.m, p.r, p.n, false, false))?;
        // dA = s·Gᵀ·X̃  [R, K];  dB = s·dYᵀ·XA  [N, R]
        da.fill(0.0);
        matmul_acc(&g, x_lora, da, LoraParams::mm(p.r, p.k, p.m, true, false), p.scale)?;
        db.fill(0.0);
        matmul_acc(dy, xa, db, LoraParams::mm(p.n, p.r, p.m, true, false), p.scale)?;
        if !want_dx {
            return Ok(None);
        }
        // dX = dY·W + s·(G·A) ⊙ drop_scale
        let mut dx = matmul_new(dy, w, LoraParams::mm(p.m, p.k, p.n, false, false))?;
        match drop_scale {
            None => matmul_acc(&g, a, &mut dx, LoraParams::mm(p.m, p.k, p.r, false, false), p.scale)?,
            Some(ds) => {
                let ga = matmul_new(&g, a, LoraParams::mm(p.m, p.k, p.r, false, false))?;
                for ((d, v), s) in dx.iter_mut().zip(&ga).zip(ds) {
                    *d += p.scale * v * s;
                }
            }
        }
        Ok(Some(dx))
    }
}

/// WGSL launchers over wgpu's types: `kernels-wgsl/lora_gemm.wgsl`, in f32, or with
/// `Precision::F16` in half precision where the adapter has SHADER_F16 (f16 operands and
/// outputs, dA and dB in f32, f32 accumulation). Buffers need STORAGE usage and may be longer
/// than their data. Dropout: the forward takes `x_lora` (the
/// dropped-out input) beside `x`; the backward's dX assumes no dropout (`x_lora = X`), so a
/// caller with dropout multiplies the LoRA part itself or uses the CPU path.
#[allow(clippy::too_many_arguments)]
pub mod wgsl {
    use super::LoraParams;
    use crate::device::wgpu::KernelCache;
    use crate::kernels::check_len;
    use crate::{Error, Result};

    pub const SOURCE: &str = include_str!("../../kernels-wgsl/lora_gemm.wgsl");
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
    }

    impl Types {
        /// The shader with its aliases set, and a pipeline-name suffix.
        fn source(self) -> (&'static str, &'static str) {
            use std::sync::OnceLock;
            static F16: OnceLock<String> = OnceLock::new();
            static F16_TO_F32: OnceLock<String> = OnceLock::new();
            use crate::device::wgpu::f16_variant;
            match self {
                Types::F32 => (SOURCE, ""),
                Types::F16 => (F16.get_or_init(|| f16_variant(SOURCE, &["T", "TC"])), "::f16"),
                Types::F16ToF32 => (F16_TO_F32.get_or_init(|| f16_variant(SOURCE, &["T"])), "::f16_to_f32"),
            }
        }
    }

    /// The uniform of `lora_gemm.wgsl` and `nf4_gemm.wgsl` (the first 16 words are shared; the
    /// LoRA shader ignores the rest).
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

    pub(crate) fn scratch(device: &wgpu::Device, elems: usize) -> wgpu::Buffer {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuna lora scratch"),
            size: (4 * elems.max(4)) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
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

    /// `c[m, n] = s · op(a)[m, k] · op(b)[k, n]` (the `gemm` entry point).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        device: &wgpu::Device,
        kernels: &KernelCache,
        enc: &mut wgpu::CommandEncoder,
        a: (&wgpu::Buffer, [u32; 2]),
        b: (&wgpu::Buffer, [u32; 2]),
        c: &wgpu::Buffer,
        mnk: (usize, usize, usize),
        s: f32,
    ) -> Result<()> {
        product_flags(device, kernels, enc, a, b, c, mnk, s, Types::F32, 0)
    }

    /// `c[m, n] += s · op(a)[m, k] · op(b)[k, n]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product_acc(
        device: &wgpu::Device,
        kernels: &KernelCache,
        enc: &mut wgpu::CommandEncoder,
        a: (&wgpu::Buffer, [u32; 2]),
        b: (&wgpu::Buffer, [u32; 2]),
        c: &wgpu::Buffer,
        mnk: (usize, usize, usize),
        s: f32,
    ) -> Result<()> {
        product_flags(device, kernels, enc, a, b, c, mnk, s, Types::F32, FLAG_ACCUMULATE)
    }

    #[allow(clippy::too_many_arguments)]
    fn product_flags(
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

    pub const DROPOUT_SOURCE: &str = include_str!("../../kernels-wgsl/dropout.wgsl");

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

    /// The LoRA dropout of `len` elements with `rng::uniform_at(seed, i)`'s mask, bit for bit:
    /// `y = x * keep` where kept (`keep = 1 / (1 - p)`), else 0. With `axpy = Some((t, s))`:
    /// `y = x + s * t * keep` where kept, else `x` (the dropped input's share of dX).
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
    ) -> Result<()> {
        let op = "lora dropout (wgsl)";
        check_buffers(op, &[("x", x, len), ("y", y, len)])?;
        if let Some((t, _)) = axpy {
            check_buffers(op, &[("t", t, len)])?;
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
        let pipe = kernels.pipeline(device, entry, DROPOUT_SOURCE, entry)?;
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
    /// strides (see [`plain`] and [`transposed`]): the plain GEMM (rank 0 of the LoRA GEMM).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        (a, sa): (&wgpu::Buffer, [u32; 2]),
        (b, sb): (&wgpu::Buffer, [u32; 2]),
        c: &wgpu::Buffer,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let op = "matmul (wgsl)";
        check_buffers(op, &[("a", a, m * k), ("b", b, k * n), ("c", c, m * n)])?;
        let mut enc = device.create_command_encoder(&Default::default());
        product(device, kernels, &mut enc, (a, sa), (b, sb), c, (m, n, k), 1.0)?;
        queue.submit([enc.finish()]);
        Ok(())
    }

    /// Forward: `y = x·wᵀ (+ bias) + s·xa·bᵀ` and `xa = x_lora·aᵀ` (`[M, R]`, kept for the
    /// backward). Two passes: XA first, then one GEMM over K + R into y.
    pub fn forward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        x: &wgpu::Buffer,
        x_lora: &wgpu::Buffer,
        w: &wgpu::Buffer,
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
        check_elems(op, bytes, &[("x", x, m * k), ("x_lora", x_lora, m * k), ("w", w, n * k), ("a", a, r * k), ("b", b, n * r), ("y", y, m * n), ("xa", xa, m * r)])?;
        if let Some(bias) = bias {
            check_elems(op, bytes, &[("bias", bias, n)])?;
        }
        let types = same(precision);
        let mut enc = device.create_command_encoder(&Default::default());
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
        let bias = bias.unwrap_or(x);
        lora_pass(device, kernels, &mut enc, types, "lora_gemm", &u, &[(1, x), (2, w), (3, xa), (4, b), (5, bias), (6, y)], tiles(m, n))?;
        queue.submit([enc.finish()]);
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
    ) -> Result<wgpu::Buffer> {
        let (m, n, k, r) = (p.m, p.n, p.k, p.r);
        let (act, grad) = (same(precision), to_f32(precision));
        let g = scratch(device, m * r);
        product_flags(device, kernels, enc, (dy, plain(n)), (b, plain(r)), &g, (m, r, n), 1.0, act, 0)?;
        product_flags(device, kernels, enc, (&g, transposed(r)), (x_lora, plain(k)), da, (r, k, m), p.scale, grad, 0)?;
        product_flags(device, kernels, enc, (dy, transposed(n)), (xa, plain(r)), db, (n, r, m), p.scale, grad, 0)?;
        Ok(g)
    }

    /// Backward: `da = s·(dy·b)ᵀ·x_lora`, `db = s·dyᵀ·xa`, and when `dx` is given
    /// `dx = dy·w + s·(dy·b)·a` (no dropout mask, see the module doc). W gets no gradient.
    pub fn backward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        dy: &wgpu::Buffer,
        x_lora: &wgpu::Buffer,
        xa: &wgpu::Buffer,
        w: &wgpu::Buffer,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        da: &wgpu::Buffer,
        db: &wgpu::Buffer,
        dx: Option<&wgpu::Buffer>,
        p: LoraParams,
        precision: Precision,
    ) -> Result<()> {
        let op = "lora_bwd (wgsl)";
        precision.check(device, op)?;
        let (m, n, k, r) = (p.m, p.n, p.k, p.r);
        let bytes = precision.bytes();
        check_elems(op, bytes, &[("dy", dy, m * n), ("x_lora", x_lora, m * k), ("xa", xa, m * r), ("w", w, n * k), ("a", a, r * k), ("b", b, n * r)])?;
        check_buffers(op, &[("da", da, r * k), ("db", db, n * r)])?;
        if let Some(dx) = dx {
            check_elems(op, bytes, &[("dx", dx, m * k)])?;
        }
        let mut enc = device.create_command_encoder(&Default::default());
        let g = small_grads(device, kernels, &mut enc, dy, x_lora, xa, b, da, db, p, precision)?;
        if let Some(dx) = dx {
            let u = GemmUniform {
                m: m as u32,
                n: k as u32,
                k1: n as u32,
                k2: r as u32,
                strides: [plain(n), plain(k), plain(r), plain(k)],
                s1: 1.0,
                s2: p.scale,
                ..Default::default()
            };
            lora_pass(device, kernels, &mut enc, same(precision), "lora_gemm", &u, &[(1, dy), (2, w), (3, &g), (4, a), (5, dy), (6, dx)], tiles(m, k))?;
        }
        queue.submit([enc.finish()]);
        Ok(())
    }
}

/// CUDA launchers (`kernels-cuda/lora_gemm.cu`) over cudarc's types. Storage is bf16 or f16 as
/// u16 bit patterns (`Half` picks the kernels), accumulation f32; dA and dB are f32 (they feed
/// the f32 master weights). Dropout as in `wgsl`: the forward takes `x_lora`, dX assumes none.
/// Scratch (`s·XA`, `s·G`, `[M, R]` each) is allocated on the stream per call.
#[allow(clippy::too_many_arguments)]
pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

    use super::LoraParams;
    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::kernels::nf4::cuda::Nf4Device;
    use crate::{Error, Result};

    /// Block tile of `lora_gemm_*` (rows, columns) and its threads; see lora_gemm.cu.
    pub(crate) const TILE: (usize, usize) = (128, 64);
    const THREADS: u32 = 128;
    const SMALL_BLOCK: u32 = 256;
    /// The largest M that `nf4::cuda::lora_forward` sends to the GEMV kernel.
    pub const GEMV_MAX_M: usize = 16;

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

    pub(crate) fn scratch(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<u16>> {
        stream.alloc_zeros::<u16>(n.max(1)).map_err(|e| Error::cuda("allocating LoRA scratch", e))
    }

    /// One operand of `lora_small_*`: buffer and (row stride, column stride) of op(X).
    pub(crate) struct Strided<'a, 'b> {
        pub v: &'a CudaView<'b, u16>,
        pub rs: i64,
        pub cs: i64,
    }

    /// Where `lora_small_*` writes: a 16-bit output and a copy scaled by `s2`, the scaled copy
    /// alone, or f32.
    pub(crate) enum SmallOut<'a, 'b, 'c> {
        HalfAndScaled(&'a mut CudaViewMut<'b, u16>, &'a mut CudaViewMut<'c, u16>, f32),
        Scaled(&'a mut CudaViewMut<'b, u16>, f32),
        F32(&'a mut CudaViewMut<'b, f32>),
    }

    /// `out[rows, cols] = s · op(a)[rows, inner] · op(b)[inner, cols]` on CUDA cores.
    pub(crate) fn small(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        dt: Half,
        a: Strided,
        b: Strided,
        (rows, cols, inner): (usize, usize, usize),
        s: f32,
        out: SmallOut,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let name = format!("lora_small_{}", dt.suffix());
        let f = modules.function("lora_gemm", &name)?;
        let (r, c, i) = (to_i32(&name, "rows", rows)?, to_i32(&name, "cols", cols)?, to_i32(&name, "inner", inner)?);
        let null = 0u64;
        let mut bld: LaunchArgs = stream.launch_builder(&f);
        bld.arg(a.v).arg(&a.rs).arg(&a.cs).arg(b.v).arg(&b.rs).arg(&b.cs).arg(&r).arg(&c).arg(&i).arg(&s);
        let s2 = match &out {
            SmallOut::HalfAndScaled(_, _, s2) | SmallOut::Scaled(_, s2) => *s2,
            _ => 0.0f32,
        };
        match out {
            SmallOut::HalfAndScaled(o, o2, _) => bld.arg(o).arg(o2).arg(&s2).arg(&null),
            SmallOut::Scaled(o2, _) => bld.arg(&null).arg(o2).arg(&s2).arg(&null),
            SmallOut::F32(o) => bld.arg(&null).arg(&null).arg(&s2).arg(o),
        };
        let cfg = LaunchConfig { grid_dim: ((cols as u32).div_ceil(SMALL_BLOCK), rows.min(65535) as u32, 1), block_dim: (SMALL_BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument order and types match `lora_small_*`; every buffer was length-checked
        // by the caller against the strides and sizes given.
        unsafe { bld.launch(cfg) }.map_err(launch_err(&name))?;
        Ok(())
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
        /// B stored [K, N] (dX) instead of [N, K] (forward).
        pub kn: bool,
    }

    /// Launches `lora_gemm_*`, or `nf4_lora_gemm_*` with W from `nf4`.
    pub(crate) fn gemm(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, g: Gemm, c: &mut CudaViewMut<'_, u16>, nf4: Option<&Nf4Device>) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let name = format!("{}lora_gemm{}_{}", if nf4.is_some() { "nf4_" } else { "" }, if g.kn { "_kn" } else { "" }, dt.suffix());
        let f = modules.function("lora_gemm", &name)?;
        let i = |what: &str, v: usize| to_i32(&name, what, v);
        let (lda1, lda2, ldb2) = (i("lda1", g.a1.1)?, i("lda2", g.a2.1)?, i("ldb2", g.b2.1)?);
        let ldb1 = i("ldb1", g.b1.map_or(0, |b| b.1))?;
        let (m, n, k1, k2) = (i("m", g.m)?, i("n", g.n)?, i("k1", g.k1)?, i("k2", g.k2)?);
        let null = 0u64;
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
        bld.arg(c).arg(&m).arg(&n).arg(&k1).arg(&k2);
        if let Some(q) = nf4 {
            q.push_args(&mut bld);
        }
        let grid_y = g.m.div_ceil(TILE.0);
        if grid_y > 65535 {
            return Err(Error::InvalidArgument(format!("{name}: M = {} needs more than 65535 row tiles", g.m)));
        }
        let cfg = LaunchConfig { grid_dim: (g.n.div_ceil(TILE.1) as u32, grid_y as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument order and types match the kernel; the caller checked every buffer
        // against (m, n, k1, k2) and its leading dimension.
        unsafe { bld.launch(cfg) }.map_err(launch_err(&name))?;
        Ok(())
    }

    /// `xa = x_lora·aᵀ` and `xa_s = s·xa` (the GEMM's second operand).
    pub(crate) fn xa(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, x_lora: &CudaView<'_, u16>, a: &CudaView<'_, u16>, xa: &mut CudaViewMut<'_, u16>, xa_s: &mut CudaViewMut<'_, u16>, p: LoraParams) -> Result<()> {
        let k = p.k as i64;
        small(stream, modules, dt, Strided { v: x_lora, rs: k, cs: 1 }, Strided { v: a, rs: 1, cs: k }, (p.m, p.r, p.k), 1.0, SmallOut::HalfAndScaled(xa, xa_s, p.scale))
    }

    /// Forward: `y = x·wᵀ (+ bias) + s·xa·bᵀ`, `xa = x_lora·aᵀ` (kept for the backward).
    pub fn forward(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        dt: Half,
        x: &CudaView<'_, u16>,
        x_lora: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
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
        for (what, have, need) in [("x", x.len(), m * k), ("x_lora", x_lora.len(), m * k), ("w", w.len(), n * k), ("a", a.len(), r * k), ("b", b.len(), n * r), ("y", y.len(), m * n), ("xa", xa_out.len(), m * r)] {
            check_len(op, what, have, need)?;
        }
        if let Some(bias) = bias {
            check_len(op, "bias", bias.len(), n)?;
        }
        let mut xa_s = scratch(stream, m * r)?;
        xa(stream, modules, dt, x_lora, a, xa_out, &mut xa_s.slice_mut(..), p)?;
        let xs = xa_s.slice(..);
        let g = Gemm { a1: (x, k), b1: Some((w, k)), a2: (&xs, r), b2: (b, r), bias, m, n, k1: k, k2: r, kn: false };
        gemm(stream, modules, dt, g, y, None)
    }

    /// `s·G = s·dy·b` (`[M, R]`, the dX GEMM's second operand), `da = (s·G)ᵀ·x_lora`,
    /// `db = s·dyᵀ·xa`. Shared with the NF4 backward.
    pub(crate) fn small_grads(
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
        let (n_, k_, r_) = (n as i64, k as i64, r as i64);
        let mut gs = scratch(stream, m * r)?;
        small(stream, modules, dt, Strided { v: dy, rs: n_, cs: 1 }, Strided { v: b, rs: r_, cs: 1 }, (m, r, n), 1.0, SmallOut::Scaled(&mut gs.slice_mut(..), p.scale))?;
        let gv = gs.slice(..);
        small(stream, modules, dt, Strided { v: &gv, rs: 1, cs: r_ }, Strided { v: x_lora, rs: k_, cs: 1 }, (r, k, m), 1.0, SmallOut::F32(da))?;
        small(stream, modules, dt, Strided { v: dy, rs: 1, cs: n_ }, Strided { v: xa, rs: r_, cs: 1 }, (n, r, m), p.scale, SmallOut::F32(db))?;
        Ok(gs)
    }

    /// Backward: `da`, `db` (f32) and, when `dx` is given, `dx = dy·w + s·(dy·b)·a`.
    pub fn backward(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        dt: Half,
        dy: &CudaView<'_, u16>,
        x_lora: &CudaView<'_, u16>,
        xa: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        a: &CudaView<'_, u16>,
        b: &CudaView<'_, u16>,
        da: &mut CudaViewMut<'_, f32>,
        db: &mut CudaViewMut<'_, f32>,
        dx: Option<&mut CudaViewMut<'_, u16>>,
        p: LoraParams,
    ) -> Result<()> {
        let op = "lora_bwd (cuda)";
        check_dims(op, p)?;
        let (m, n, k, r) = (p.m, p.n, p.k, p.r);
        for (what, have, need) in [("dy", dy.len(), m * n), ("x_lora", x_lora.len(), m * k), ("xa", xa.len(), m * r), ("w", w.len(), n * k), ("a", a.len(), r * k), ("b", b.len(), n * r), ("da", da.len(), r * k), ("db", db.len(), n * r)] {
            check_len(op, what, have, need)?;
        }
        if let Some(dx) = &dx {
            check_len(op, "dx", dx.len(), m * k)?;
        }
        let gs = small_grads(stream, modules, dt, dy, x_lora, xa, b, da, db, p)?;
        if let Some(dx) = dx {
            let gv = gs.slice(..);
            let g = Gemm { a1: (dy, n), b1: Some((w, k)), a2: (&gv, r), b2: (a, k), bias: None, m, n: k, k1: n, k2: r, kn: true };
            gemm(stream, modules, dt, g, dx, None)?;
        }
        Ok(())
    }
}
