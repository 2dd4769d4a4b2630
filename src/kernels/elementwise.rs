//! Element-wise ops: add and mul with a broadcast right-hand side, scale, SiLU, and the fused
//! gated linear unit of the MLP (SwiGLU for Llama, GeGLU with the tanh GELU for Gemma).
//!
//! Broadcasting is the one form the model needs: `rhs` has the trailing dims of `lhs` (a bias
//! `[N]` onto `[M, N]`), so element i of lhs meets element `i % rhs.len()` of rhs.
//!
//! Backward:
//! - add: `dlhs = dy`, `drhs = sum over the broadcast rows of dy`
//! - mul: `dlhs = dy * rhs`, `drhs = sum over the broadcast rows of dy * lhs`
//! - scale by s: `dx = s * dy`
//! - silu(x) = x·σ(x): `dx = dy * σ(x) * (1 + x * (1 - σ(x)))`
//!
//! Gated linear unit (fused, one pass each way): `y = act(g) * u` over `[M, F]` (M rows, F the
//! MLP's intermediate size). Both activations are `act(g) = g·σ(a(g))` ([`GluAct`]): SiLU with
//! `a(g) = g`, the tanh GELU with `a(g) = 2k(g + 0.044715 g³)`, `k = √(2/π)` (as
//! `(1 + tanh z) / 2 = σ(2z)`). Partial derivatives:
//! - `dg = dy * u * σ(a) * (1 + g * (1 - σ(a)) * a'(g))`
//! - `du = dy * act(g)`
//!
//! Two layouts (`GluParams` and the `*_packed` launchers): g and u in separate `[M, F]`
//! buffers, or packed as the two halves of each row of one `[M, 2F]` buffer (g in columns
//! `0..F`, u in `F..2F`), the output of a fused gate/up projection; dg and du then go to one
//! `[M, 2F]` gradient buffer the same way. Kernels address both through a row stride and the
//! offset of u, so neither layout copies. y and dy are always dense `[M, F]`.
//! Kernels: `kernels-cuda/elementwise.cu` (f32, bf16), `kernels-wgsl/elementwise.wgsl` (f32).
//! σ(a) is evaluated as `1 / (1 + e)` or `e / (1 + e)` with `e = exp(-|a|)`, which never
//! overflows.

use crate::kernels::check_len;
use crate::{Error, Result};

/// The activation of a gated linear unit's gate: `act(g) = g·σ(a(g))`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GluAct {
    /// SiLU, `g·σ(g)` (SwiGLU: Llama, Mistral, Qwen; transformers' `silu`).
    #[default]
    Silu,
    /// GELU in its tanh form, `g/2·(1 + tanh(k(g + 0.044715 g³)))`, `k = √(2/π)` (GeGLU:
    /// Gemma; transformers' `gelu_pytorch_tanh`).
    GeluTanh,
}

impl GluAct {
    /// The kernels' code for it (`act` in `kernels-cuda/elementwise.cu` and the WGSL file).
    pub fn code(self) -> u32 {
        match self {
            GluAct::Silu => 0,
            GluAct::GeluTanh => 1,
        }
    }

    /// `a(g)` and `a'(g)`: the gate's sigmoid argument and its derivative.
    #[inline(always)]
    pub fn arg(self, g: f32) -> (f32, f32) {
        match self {
            GluAct::Silu => (g, 1.0),
            GluAct::GeluTanh => {
                const K2: f32 = 1.595_769_2; // 2·√(2/π), rounded to f32 as the kernels round it
                (K2 * (g + 0.044715 * g * g * g), K2 * (1.0 + 3.0 * 0.044715 * g * g))
            }
        }
    }

    /// transformers' name (`hidden_act`).
    pub fn hf_name(self) -> &'static str {
        match self {
            GluAct::Silu => "silu",
            GluAct::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// Sizes of one gated-linear-unit call: M rows of F gate and F up values, and the gate's
/// activation.
#[derive(Clone, Copy, Debug)]
pub struct GluParams {
    /// M: rows (tokens).
    pub rows: usize,
    /// F: intermediate size (columns of g, of u, and of y).
    pub cols: usize,
    pub act: GluAct,
}

impl GluParams {
    /// Elements of a dense `[M, F]` operand.
    fn dense(&self) -> usize {
        self.rows * self.cols
    }

    /// Checks separate g, u `[M, F]` and an output (y, or dg and du) of the same size.
    fn check_separate(&self, op: &'static str, bufs: &[(&str, usize)]) -> Result<()> {
        self.fits(op)?;
        bufs.iter().try_for_each(|(name, len)| check_len(op, name, *len, self.dense()))
    }

    /// Checks a packed `[M, 2F]` input (and gradient) and dense `[M, F]` operands.
    fn check_packed(&self, op: &'static str, packed: &[(&str, usize)], dense: &[(&str, usize)]) -> Result<()> {
        self.fits(op)?;
        packed.iter().try_for_each(|(name, len)| check_len(op, name, *len, 2 * self.dense()))?;
        dense.iter().try_for_each(|(name, len)| check_len(op, name, *len, self.dense()))
    }

    /// The GPU kernels index with 32-bit integers (WGSL) and take M, F as i32 (CUDA).
    fn fits(&self, op: &'static str) -> Result<()> {
        let packed = self.rows.checked_mul(self.cols).and_then(|n| n.checked_mul(2));
        match packed {
            Some(n) if n <= i32::MAX as usize => Ok(()),
            _ => Err(Error::InvalidArgument(format!("{op}: [{}, 2 * {}] exceeds i32 elements", self.rows, self.cols))),
        }
    }
}

pub mod reference {
    use super::GluAct;

    pub fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().enumerate().map(|(i, x)| x + b[i % b.len()]).collect()
    }
    pub fn mul(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().enumerate().map(|(i, x)| x * b[i % b.len()]).collect()
    }
    pub fn scale(a: &[f64], s: f64) -> Vec<f64> {
        a.iter().map(|x| x * s).collect()
    }
    pub fn silu(a: &[f64]) -> Vec<f64> {
        a.iter().map(|&x| x / (1.0 + (-x).exp())).collect()
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// `act(g)` and its derivative, from their textbook forms: `g·σ(g)` and the tanh GELU
    /// `g/2·(1 + tanh(k(g + 0.044715 g³)))` (not through the kernels' shared sigmoid form).
    fn act(act: GluAct, g: f64) -> (f64, f64) {
        match act {
            GluAct::Silu => (g * sigmoid(g), sigmoid(g) * (1.0 + g * (1.0 - sigmoid(g)))),
            GluAct::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let t = (k * (g + 0.044715 * g.powi(3))).tanh();
                (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g))
            }
        }
    }

    /// `y = act(g) * u`, g and u of one length.
    pub fn glu(g: &[f64], u: &[f64], a: GluAct) -> Vec<f64> {
        g.iter().zip(u).map(|(&g, &u)| act(a, g).0 * u).collect()
    }

    /// Returns (dg, du) of `glu` for the upstream gradient dy.
    pub fn glu_backward(g: &[f64], u: &[f64], dy: &[f64], a: GluAct) -> (Vec<f64>, Vec<f64>) {
        let dg = g.iter().zip(u).zip(dy).map(|((&g, &u), &dy)| dy * u * act(a, g).1).collect();
        let du = g.iter().zip(dy).map(|(&g, &dy)| dy * act(a, g).0).collect();
        (dg, du)
    }
}

pub mod cpu;

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::GluParams;
    use crate::device::cuda::ModuleCache;
    use crate::{Error, Result};

    const BLOCK: u32 = 256;
    /// grid.y covers rows; larger M loops (the kernels stride rows by gridDim.y).
    const MAX_GRID_Y: u32 = 65535;

    fn suffix<T>(op: &str) -> Result<&'static str> {
        match std::mem::size_of::<T>() {
            4 => Ok("f32"),
            2 => Ok("bf16"),
            s => Err(Error::InvalidArgument(format!("{op}: no CUDA kernel for {s}-byte elements"))),
        }
    }

    /// Grid over (column blocks, rows); None when there is nothing to do.
    fn config(p: GluParams) -> Option<LaunchConfig> {
        if p.rows == 0 || p.cols == 0 {
            return None;
        }
        let gx = (p.cols as u32).div_ceil(BLOCK);
        let gy = (p.rows as u32).min(MAX_GRID_Y);
        Some(LaunchConfig { grid_dim: (gx, gy, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
    }

    fn launch_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
        move |e| Error::cuda(format!("launching {op}"), e)
    }

    /// Forward with g and u given as views of one buffer or two: row m, column f of g is
    /// `g[m * ld + f]`, of u `u[u_off + m * ld + f]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_strided<T: DeviceRepr>(
        op: &'static str,
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        g: &CudaView<'_, T>,
        u: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        p: GluParams,
        u_off: i32,
        ld: i32,
    ) -> Result<()> {
        let Some(cfg) = config(p) else { return Ok(()) };
        let f = modules.function("elementwise", &format!("glu_fwd_{}", suffix::<T>(op)?))?;
        let (m, n, act) = (p.rows as i32, p.cols as i32, p.act.code() as i32);
        // SAFETY: argument types match the kernel signature; the caller checked the lengths.
        unsafe { stream.launch_builder(&f).arg(g).arg(u).arg(y).arg(&m).arg(&n).arg(&u_off).arg(&ld).arg(&act).launch(cfg) }
            .map_err(launch_err(op))?;
        Ok(())
    }

    /// `y = act(g) * u`, g, u, y `[M, F]`; f32 (`T = f32`) or bf16 bits (`T = u16`).
    pub fn forward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        g: &CudaView<'_, T>,
        u: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        p: GluParams,
    ) -> Result<()> {
        const OP: &str = "glu_fwd";
        p.check_separate(OP, &[("g", g.len()), ("u", u.len()), ("y", y.len())])?;
        forward_strided(OP, stream, modules, g, u, y, p, 0, p.cols as i32)
    }

    /// `y = act(g) * u` with g, u the halves of each row of `gu` `[M, 2F]`; y `[M, F]`.
    pub fn forward_packed<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        gu: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        p: GluParams,
    ) -> Result<()> {
        const OP: &str = "glu_fwd_packed";
        p.check_packed(OP, &[("gu", gu.len())], &[("y", y.len())])?;
        forward_strided(OP, stream, modules, gu, gu, y, p, p.cols as i32, 2 * p.cols as i32)
    }

    /// dg and du (separate `[M, F]`) from g, u and dy, in one kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        g: &CudaView<'_, T>,
        u: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dg: &mut CudaViewMut<'_, T>,
        du: &mut CudaViewMut<'_, T>,
        p: GluParams,
    ) -> Result<()> {
        const OP: &str = "glu_bwd";
        p.check_separate(OP, &[("g", g.len()), ("u", u.len()), ("dy", dy.len()), ("dg", dg.len()), ("du", du.len())])?;
        let Some(cfg) = config(p) else { return Ok(()) };
        let f = modules.function("elementwise", &format!("glu_bwd_{}", suffix::<T>(OP)?))?;
        let (m, n, act) = (p.rows as i32, p.cols as i32, p.act.code() as i32);
        // SAFETY: argument types match the kernel signature; lengths checked above.
        unsafe { stream.launch_builder(&f).arg(g).arg(u).arg(dy).arg(dg).arg(du).arg(&m).arg(&n).arg(&act).launch(cfg) }
            .map_err(launch_err(OP))?;
        Ok(())
    }

    /// The packed backward: g, u from `gu` `[M, 2F]`; dg, du into `dgu` `[M, 2F]` the same way.
    pub fn backward_packed<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        gu: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dgu: &mut CudaViewMut<'_, T>,
        p: GluParams,
    ) -> Result<()> {
        const OP: &str = "glu_bwd_packed";
        p.check_packed(OP, &[("gu", gu.len()), ("dgu", dgu.len())], &[("dy", dy.len())])?;
        let Some(cfg) = config(p) else { return Ok(()) };
        let f = modules.function("elementwise", &format!("glu_bwd_packed_{}", suffix::<T>(OP)?))?;
        let (m, n, act) = (p.rows as i32, p.cols as i32, p.act.code() as i32);
        // SAFETY: as in `backward`.
        unsafe { stream.launch_builder(&f).arg(gu).arg(dy).arg(dgu).arg(&m).arg(&n).arg(&act).launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }
    /// A grid-stride launch over n elements (at most 65535·8 blocks of 256).
    fn flat(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((n.div_ceil(BLOCK as usize) as u32).clamp(1, 65535 * 8), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    /// `y = a + b` with b broadcast over a's leading dims (`b.len()` divides `a.len()`).
    pub fn add<T: DeviceRepr>(stream: &Arc<CudaStream>, modules: &ModuleCache, a: &CudaView<'_, T>, b: &CudaView<'_, T>, y: &mut CudaViewMut<'_, T>) -> Result<()> {
        const OP: &str = "add (cuda)";
        let (n, nb) = (a.len(), b.len());
        crate::kernels::check_len(OP, "y", y.len(), n)?;
        if n > 0 && (nb == 0 || n % nb != 0) {
            return Err(Error::InvalidArgument(format!("{OP}: b of {nb} elements does not broadcast over a of {n}")));
        }
        if n == 0 {
            return Ok(());
        }
        let f = modules.function("elementwise", &format!("add_{}", suffix::<T>(OP)?))?;
        let (n64, nb64) = (n as i64, nb as i64);
        // SAFETY: argument types match add_*; a and y hold n elements, b nb (checked above).
        unsafe { stream.launch_builder(&f).arg(a).arg(b).arg(y).arg(&n64).arg(&nb64).launch(flat(n)) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// `y = s · a`, with `s` a host float or, for `scale_by`, the device scalar `s_dev[0]`.
    pub fn scale<T: DeviceRepr>(stream: &Arc<CudaStream>, modules: &ModuleCache, a: &CudaView<'_, T>, y: &mut CudaViewMut<'_, T>, s: f32) -> Result<()> {
        const OP: &str = "scale (cuda)";
        let n = a.len();
        crate::kernels::check_len(OP, "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = modules.function("elementwise", &format!("scale_{}", suffix::<T>(OP)?))?;
        let n64 = n as i64;
        // SAFETY: argument types match scale_*; a and y hold n elements.
        unsafe { stream.launch_builder(&f).arg(a).arg(y).arg(&n64).arg(&s).launch(flat(n)) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// `y = s_dev[0] · a` (s_dev one f32 on the device: a loss gradient, never read on the host).
    pub fn scale_by<T: DeviceRepr>(stream: &Arc<CudaStream>, modules: &ModuleCache, a: &CudaView<'_, T>, s_dev: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, T>) -> Result<()> {
        const OP: &str = "scale_by (cuda)";
        let n = a.len();
        crate::kernels::check_len(OP, "y", y.len(), n)?;
        crate::kernels::check_len(OP, "s", s_dev.len(), 1)?;
        if n == 0 {
            return Ok(());
        }
        let f = modules.function("elementwise", &format!("scale_by_{}", suffix::<T>(OP)?))?;
        let n64 = n as i64;
        // SAFETY: argument types match scale_by_*; a and y hold n elements, s one.
        unsafe { stream.launch_builder(&f).arg(a).arg(s_dev).arg(y).arg(&n64).launch(flat(n)) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// `y = xᵀ`: x row-major `[rows, cols]`, y `[cols, rows]`, bits moved unchanged (2- or
    /// 4-byte elements). For the products whose first operand is transposed (dW = dYᵀ·X).
    pub fn transpose<T: DeviceRepr>(stream: &Arc<CudaStream>, modules: &ModuleCache, x: &CudaView<'_, T>, y: &mut CudaViewMut<'_, T>, rows: usize, cols: usize) -> Result<()> {
        const OP: &str = "transpose (cuda)";
        crate::kernels::check_len(OP, "x", x.len(), rows * cols)?;
        crate::kernels::check_len(OP, "y", y.len(), rows * cols)?;
        let i32_of = |v: usize, what: &str| i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{OP}: {what} = {v} exceeds i32")));
        let (r, c) = (i32_of(rows, "rows")?, i32_of(cols, "cols")?);
        i32_of(rows * cols, "rows·cols")?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let bits = match std::mem::size_of::<T>() {
            2 => "b16",
            4 => "b32",
            s => return Err(Error::InvalidArgument(format!("{OP}: no kernel for {s}-byte elements"))),
        };
        let f = modules.function("elementwise", &format!("transpose_{bits}"))?;
        let cfg = LaunchConfig { grid_dim: ((cols as u32).div_ceil(32), (rows as u32).div_ceil(32).min(MAX_GRID_Y), 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types match transpose_*; x and y hold rows·cols elements (checked),
        // and the kernel indexes below that.
        unsafe { stream.launch_builder(&f).arg(x).arg(y).arg(&r).arg(&c).launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }
}

pub mod wgsl {
    use super::GluParams;
    pub use crate::device::wgpu::Precision;
    use crate::device::wgpu::{dispatch, uniform, KernelCache};
    use crate::Result;

    pub const SOURCE: &str = wgsl_source!("elementwise.wgsl");
    const WG: u32 = 256;
    const MAX_GRID_Y: u32 = 65535;

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Params {
        rows: u32,
        cols: u32,
        /// Offset of u's first element in its buffer (F when packed).
        u_off: u32,
        /// Row stride of g, u, dg and du (F, or 2F when packed).
        ld: u32,
        act: u32,
        pad: [u32; 3],
    }

    /// Elements of `precision` a buffer holds.
    fn elems_of(b: &wgpu::Buffer, precision: Precision) -> usize {
        b.size() as usize / precision.bytes()
    }

    fn elems(b: &wgpu::Buffer) -> usize {
        elems_of(b, Precision::F32)
    }

    /// Workgroups over (column blocks, rows); the kernels stride rows by num_workgroups.y.
    fn groups(p: GluParams) -> (u32, u32, u32) {
        ((p.cols as u32).div_ceil(WG), (p.rows as u32).min(MAX_GRID_Y), 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        entry: &str,
        p: GluParams,
        packed: bool,
        buffers: &[&wgpu::Buffer],
        precision: Precision,
    ) -> Result<()> {
        if p.rows == 0 || p.cols == 0 {
            return Ok(());
        }
        let f = p.cols as u32;
        let params = if packed {
            Params { rows: p.rows as u32, cols: f, u_off: f, ld: 2 * f, act: p.act.code(), pad: [0; 3] }
        } else {
            Params { rows: p.rows as u32, cols: f, u_off: 0, ld: f, act: p.act.code(), pad: [0; 3] }
        };
        let pipe = kernels.pipeline_as(device, entry, SOURCE, entry, precision)?;
        let u = uniform(device, &params);
        let mut all = vec![&u];
        all.extend_from_slice(buffers);
        dispatch(device, queue, &pipe, &all, groups(p));
        Ok(())
    }

    pub const ADD_SOURCE: &str = wgsl_source!("add.wgsl");

    /// `y[i] = a[i] + b[i % nb]` over `len` elements stored in `precision` (b broadcast over
    /// a's leading dims; nb must divide len).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        y: &wgpu::Buffer,
        len: usize,
        nb: usize,
        precision: Precision,
    ) -> Result<()> {
        const OP: &str = "add (wgsl)";
        if nb == 0 || !len.is_multiple_of(nb) {
            return Err(crate::Error::InvalidArgument(format!("{OP}: b of {nb} elements does not broadcast over {len}")));
        }
        for (name, buf, n) in [("a", a, len), ("b", b, nb), ("y", y, len)] {
            crate::kernels::check_len(OP, name, elems_of(buf, precision), n)?;
        }
        let u32_of = |v: usize| u32::try_from(v).map_err(|_| crate::Error::InvalidArgument(format!("{OP}: {v} elements exceed u32")));
        let (len32, nb32) = (u32_of(len)?, u32_of(nb)?);
        if len == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, "add_bcast", ADD_SOURCE, "add_bcast", precision)?;
        let u = uniform(device, &[len32, nb32, 0, 0]);
        let (gx, gy) = crate::device::wgpu::grid(len32.div_ceil(WG));
        dispatch(device, queue, &pipe, &[&u, a, b, y], (gx, gy, 1));
        Ok(())
    }

    /// `y[i] = s * a[i]` over `len` elements stored in `precision` (f32 math).
    #[allow(clippy::too_many_arguments)]
    pub fn scale(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, a: &wgpu::Buffer, y: &wgpu::Buffer, len: usize, s: f32, precision: Precision) -> Result<()> {
        const OP: &str = "scale (wgsl)";
        for (name, buf) in [("a", a), ("y", y)] {
            crate::kernels::check_len(OP, name, elems_of(buf, precision), len)?;
        }
        let len32 = u32::try_from(len).map_err(|_| crate::Error::InvalidArgument(format!("{OP}: {len} elements exceed u32")))?;
        if len == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, "scale", ADD_SOURCE, "scale", precision)?;
        let u = uniform(device, &[len32, 1, s.to_bits(), 0]);
        let (gx, gy) = crate::device::wgpu::grid(len32.div_ceil(WG));
        // `scale` binds the uniform (0), a (1) and y (3), not b.
        crate::device::wgpu::dispatch_bound(device, queue, &pipe, &[(0, &u), (1, a), (3, y)], (gx, gy, 1));
        Ok(())
    }

    /// `y[i] = s[0] * a[i]` over `len` elements, f32, with the factor in a device buffer.
    pub fn scale_by(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, a: &wgpu::Buffer, s: &wgpu::Buffer, y: &wgpu::Buffer, len: usize) -> Result<()> {
        const OP: &str = "scale_by (wgsl)";
        for (name, buf, n) in [("a", a, len), ("s", s, 1), ("y", y, len)] {
            crate::kernels::check_len(OP, name, elems(buf), n)?;
        }
        let len32 = u32::try_from(len).map_err(|_| crate::Error::InvalidArgument(format!("{OP}: {len} elements exceed u32")))?;
        if len == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline(device, "scale_by", ADD_SOURCE, "scale_by")?;
        let u = uniform(device, &[len32, 1, 0, 0]);
        let (gx, gy) = crate::device::wgpu::grid(len32.div_ceil(WG));
        dispatch(device, queue, &pipe, &[&u, a, s, y], (gx, gy, 1));
        Ok(())
    }

    /// `y = act(g) * u`, g, u, y `[M, F]` stored in `precision` (f32 math).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        g: &wgpu::Buffer,
        u: &wgpu::Buffer,
        y: &wgpu::Buffer,
        p: GluParams,
        precision: Precision,
    ) -> Result<()> {
        let e = |b| elems_of(b, precision);
        p.check_separate("glu_fwd", &[("g", e(g)), ("u", e(u)), ("y", e(y))])?;
        run(device, queue, kernels, "glu_fwd", p, false, &[g, u, y], precision)
    }

    /// `y = act(g) * u` with g, u the halves of each row of `gu` `[M, 2F]`; y `[M, F]`.
    pub fn forward_packed(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        gu: &wgpu::Buffer,
        y: &wgpu::Buffer,
        p: GluParams,
        precision: Precision,
    ) -> Result<()> {
        let e = |b| elems_of(b, precision);
        p.check_packed("glu_fwd_packed", &[("gu", e(gu))], &[("y", e(y))])?;
        // Bound twice, read-only both times: g and u are the two halves.
        run(device, queue, kernels, "glu_fwd", p, true, &[gu, gu, y], precision)
    }

    /// dg and du (separate `[M, F]`) from g, u and dy, stored in `precision`, in one kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        g: &wgpu::Buffer,
        u: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dg: &wgpu::Buffer,
        du: &wgpu::Buffer,
        p: GluParams,
        precision: Precision,
    ) -> Result<()> {
        let e = |b| elems_of(b, precision);
        let bufs = [("g", e(g)), ("u", e(u)), ("dy", e(dy)), ("dg", e(dg)), ("du", e(du))];
        p.check_separate("glu_bwd", &bufs)?;
        run(device, queue, kernels, "glu_bwd", p, false, &[g, u, dy, dg, du], precision)
    }

    /// The packed backward: g, u from `gu` `[M, 2F]`; dg, du into `dgu` `[M, 2F]` the same way.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_packed(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        gu: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dgu: &wgpu::Buffer,
        p: GluParams,
        precision: Precision,
    ) -> Result<()> {
        let e = |b| elems_of(b, precision);
        p.check_packed("glu_bwd_packed", &[("gu", e(gu)), ("dgu", e(dgu))], &[("dy", e(dy))])?;
        run(device, queue, kernels, "glu_bwd_packed", p, true, &[gu, dy, dgu], precision)
    }
}
