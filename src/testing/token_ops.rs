//! Checks of the per-token ops of a training step (RoPE, the fused gated linear unit, embedding
//! gather and scatter-add) on one device against their f64 references, shared by `tests/ops_devices.rs`
//! and `tools/gpu-check`. Each check runs the device's launchers (`cpu::`, `wgsl::`, `cuda::`,
//! no tuna tensors) forward and backward and compares every output buffer.
//!
//! The references see exactly the values the device sees (bf16-rounded inputs for bf16).
//! Tolerances (`|got - ref| <= atol + rtol·|ref|`):
//! - RoPE, the gated linear unit: a few f32 operations per element, so `Tolerance::F32`, or
//!   `Tolerance::BF16` for bf16 outputs. RoPE's cos/sin are the kernels' own (within 1.3e-7 absolute up to 2^20
//!   radians, see `kernels::rope`), the CPU path's are libm's; both far inside `F32`.
//!   `check_rope_angles` checks cos/sin alone with atol 2.5e-7 (two f32 ulps at 1).
//! - Embedding gather: a copy, so exact. Scatter-add: a row of dtable sums its tokens' dy rows
//!   in f32, so the absolute part of the tolerance grows with the most frequent id's count
//!   (as rmsnorm's dw does with its rows). In f32 the GPU result must also equal the CPU
//!   path's bit for bit: both add in token order.

use crate::kernels::elementwise::{self, GluParams};
use crate::kernels::embedding::{self, EmbeddingParams};
use crate::kernels::rope::{self, Direction, RopeParams};
use crate::testing::lora::round_to;
use crate::testing::{compare, Rng, Tolerance};
use crate::{DType, Device};

type Check = std::result::Result<(), String>;

fn rounded(dtype: DType, v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| round_to(dtype, x)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::BF16 => Tolerance::BF16,
        DType::F16 => Tolerance::F16,
        _ => Tolerance::F32,
    }
}

/// CUDA has f32 and bf16 kernels; WGSL f32, and f16 where the adapter has SHADER_F16; the CPU
/// path f32.
fn supported(op: &str, dev: Device, dtype: DType) -> Check {
    let wgpu_f16 = |i: usize| crate::device::wgpu::runtime(i).is_ok_and(|rt| rt.has_f16());
    match (dev, dtype) {
        (_, DType::F32) | (Device::Cuda(_), DType::BF16) => Ok(()),
        (Device::Wgpu(i), DType::F16) if wgpu_f16(i) => Ok(()),
        _ => Err(format!("{op} on {dev}: no {dtype} kernel")),
    }
}

/// The WGSL storage of `dtype` (the checks call this only where `supported` passed).
fn precision(dtype: DType) -> crate::device::wgpu::Precision {
    match dtype {
        DType::F16 => crate::device::wgpu::Precision::F16,
        _ => crate::device::wgpu::Precision::F32,
    }
}

/// Llama's inverse frequencies `theta^(-2i/D)`, i < D/2, in f32.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64) as f32).collect()
}

/// One RoPE case: x `[tokens, heads, head_dim]` at random positions in `[0, max_position)`
/// (several packed sequences look the same to the kernel: one position per token).
#[derive(Clone, Copy, Debug)]
pub struct RopeCase {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub max_position: usize,
    pub dtype: DType,
    pub seed: u64,
}

/// RoPE forward (x to y) and backward (dy to dx) on `dev` against the f64 reference.
pub fn check_rope(dev: Device, case: RopeCase) -> Check {
    supported("rope", dev, case.dtype)?;
    let mut rng = Rng::new(case.seed);
    let p = RopeParams { tokens: case.tokens, heads: case.heads, head_dim: case.head_dim };
    let n = case.tokens * case.heads * case.head_dim;
    let x = rounded(case.dtype, rng.vec(n, -2.0, 2.0));
    let dy = rounded(case.dtype, rng.vec(n, -1.0, 1.0));
    let positions: Vec<i32> = (0..case.tokens).map(|_| rng.below(case.max_position.max(1)) as i32).collect();
    let freq = inv_freq(case.head_dim, 10000.0);
    let tol = tolerance(case.dtype);
    for (dir, input, what) in [(Direction::Forward, &x, "y"), (Direction::Backward, &dy, "dx")] {
        let want = rope::reference::rope(&f64s(input), &positions, &freq, case.heads, dir);
        let got = run_rope(dev, case.dtype, input, &positions, &freq, p, dir).map_err(|e| format!("rope on {dev}: {e}"))?;
        compare(&format!("rope {what} on {dev} ({case:?})"), &got, &want, tol)?;
    }
    Ok(())
}

/// The kernels' cos/sin alone: one head of D = 2 holding (1, 0) rotates to (cos f, sin f)
/// (backward: (cos f, -sin f)) with `f = p * inv_freq` at every position given, compared with
/// the f64 cos/sin of the f32 angle within 2.5e-7 absolute.
pub fn check_rope_angles(dev: Device, positions: &[i32], inv_freq: f32) -> Check {
    let tokens = positions.len();
    let p = RopeParams { tokens, heads: 1, head_dim: 2 };
    let x: Vec<f32> = (0..tokens).flat_map(|_| [1.0, 0.0]).collect();
    let tol = Tolerance { atol: 2.5e-7, rtol: 0.0 };
    for dir in [Direction::Forward, Direction::Backward] {
        let want = rope::reference::rope(&f64s(&x), positions, &[inv_freq], 1, dir);
        let got = run_rope(dev, DType::F32, &x, positions, &[inv_freq], p, dir).map_err(|e| format!("rope on {dev}: {e}"))?;
        compare(&format!("rope cos/sin {dir:?} on {dev} (inv_freq {inv_freq})"), &got, &want, tol)?;
    }
    Ok(())
}

fn run_rope(dev: Device, dtype: DType, x: &[f32], pos: &[i32], freq: &[f32], p: RopeParams, dir: Direction) -> crate::Result<Vec<f32>> {
    match dev {
        Device::Cpu => {
            let mut y = vec![0.0; x.len()];
            rope::cpu::rope(x, &mut y, pos, freq, p.heads, dir);
            Ok(y)
        }
        Device::Wgpu(i) => wgpu_run::rope(i, precision(dtype), x, pos, freq, p, dir),
        Device::Cuda(i) => cuda_run::rope(i, dtype, x, pos, freq, p, dir),
    }
}

/// The gated linear unit's forward and backward (`p.act`: SwiGLU or GeGLU) on `dev` against
/// the f64 reference; `packed` puts g and u (and dg and du) in the two halves of each row of
/// one `[rows, 2 * cols]` buffer.
pub fn check_glu(dev: Device, dtype: DType, p: GluParams, packed: bool, seed: u64) -> Check {
    supported("glu", dev, dtype)?;
    let mut rng = Rng::new(seed);
    let GluParams { rows, cols, act } = p;
    // g over [-12, 12]: both branches of the stable sigmoid and its saturated tails.
    let g = rounded(dtype, rng.vec(rows * cols, -12.0, 12.0));
    let u = rounded(dtype, rng.vec(rows * cols, -2.0, 2.0));
    let dy = rounded(dtype, rng.vec(rows * cols, -1.0, 1.0));
    let y_want = elementwise::reference::glu(&f64s(&g), &f64s(&u), act);
    let (dg_want, du_want) = elementwise::reference::glu_backward(&f64s(&g), &f64s(&u), &f64s(&dy), act);
    let out = run_glu(dev, dtype, &g, &u, &dy, p, packed).map_err(|e| format!("glu ({act:?}) on {dev}: {e}"))?;
    let what = |name: &str| format!("glu ({act:?}) {name} on {dev} ({dtype} [{rows}, {cols}], packed {packed})");
    let tol = tolerance(dtype);
    compare(&what("y"), &out.y, &y_want, tol)?;
    compare(&what("dg"), &out.dg, &dg_want, tol)?;
    compare(&what("du"), &out.du, &du_want, tol)
}

/// Outputs of one gated-linear-unit run, dense `[M, F]` each (unpacked from dgu when packed).
struct GluOut {
    y: Vec<f32>,
    dg: Vec<f32>,
    du: Vec<f32>,
}

/// `[g | u]` rows of width 2F from g and u of width F.
fn pack(g: &[f32], u: &[f32], cols: usize) -> Vec<f32> {
    g.chunks(cols.max(1)).zip(u.chunks(cols.max(1))).flat_map(|(g, u)| g.iter().chain(u).copied()).collect()
}

/// The halves of `[a | b]` rows of width 2F.
fn unpack(ab: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut a, mut b) = (Vec::with_capacity(rows * cols), Vec::with_capacity(rows * cols));
    for r in 0..rows {
        a.extend_from_slice(&ab[r * 2 * cols..r * 2 * cols + cols]);
        b.extend_from_slice(&ab[r * 2 * cols + cols..(r + 1) * 2 * cols]);
    }
    (a, b)
}

fn run_glu(dev: Device, dtype: DType, g: &[f32], u: &[f32], dy: &[f32], p: GluParams, packed: bool) -> crate::Result<GluOut> {
    let n = p.rows * p.cols;
    if packed {
        let gu = pack(g, u, p.cols);
        let (y, dgu) = match dev {
            Device::Cpu => {
                let (mut y, mut dgu) = (vec![0.0; n], vec![0.0; 2 * n]);
                elementwise::cpu::glu_packed(&gu, &mut y, p)?;
                elementwise::cpu::glu_backward_packed(&gu, dy, &mut dgu, p)?;
                (y, dgu)
            }
            Device::Wgpu(i) => wgpu_run::glu_packed(i, precision(dtype), &gu, dy, p)?,
            Device::Cuda(i) => cuda_run::glu_packed(i, dtype, &gu, dy, p)?,
        };
        let (dg, du) = unpack(&dgu, p.rows, p.cols);
        return Ok(GluOut { y, dg, du });
    }
    match dev {
        Device::Cpu => {
            let (mut y, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            elementwise::cpu::glu(g, u, &mut y, p)?;
            elementwise::cpu::glu_backward(g, u, dy, &mut dg, &mut du, p)?;
            Ok(GluOut { y, dg, du })
        }
        Device::Wgpu(i) => wgpu_run::glu(i, precision(dtype), g, u, dy, p),
        Device::Cuda(i) => cuda_run::glu(i, dtype, g, u, dy, p),
    }
}

/// Embedding gather and scatter-add on `dev` against the f64 reference: ids uniform in
/// `[0, vocab)` (a small vocab makes ids repeat, and repeat across chunks of 256 tokens), a
/// non-zero starting dtable (the backward adds into it).
pub fn check_embedding(dev: Device, dtype: DType, tokens: usize, vocab: usize, dim: usize, seed: u64) -> Check {
    supported("embedding", dev, dtype)?;
    let mut rng = Rng::new(seed);
    let p = EmbeddingParams { tokens, vocab, dim };
    let ids: Vec<i32> = (0..tokens).map(|_| rng.below(vocab) as i32).collect();
    let table = rounded(dtype, rng.vec(vocab * dim, -1.0, 1.0));
    let dy = rounded(dtype, rng.vec(tokens * dim, -1.0, 1.0));
    let dtable0 = rounded(dtype, rng.vec(vocab * dim, -1.0, 1.0));
    embedding::check_ids(&ids, vocab).map_err(|e| e.to_string())?;

    let y_want = embedding::reference::gather(&f64s(&table), &ids, dim);
    let mut dtable_want = f64s(&dtable0);
    embedding::reference::scatter_add(&f64s(&dy), &ids, &mut dtable_want, dim);
    let (y, dtable) = match dev {
        Device::Cpu => {
            let mut y = vec![0.0; tokens * dim];
            embedding::cpu::gather(&table, &ids, &mut y, dim);
            let mut dtable = dtable0.clone();
            embedding::cpu::scatter_add(&dy, &ids, &mut dtable, dim);
            Ok((y, dtable))
        }
        Device::Wgpu(i) => wgpu_run::embedding(i, precision(dtype), &table, &ids, &dy, &dtable0, p),
        Device::Cuda(i) => cuda_run::embedding(i, dtype, &table, &ids, &dy, &dtable0, p),
    }
    .map_err(|e| format!("embedding on {dev}: {e}"))?;

    let what = |name: &str| format!("embedding {name} on {dev} ({dtype}, T {tokens}, V {vocab}, E {dim})");
    compare(&what("y"), &y, &y_want, Tolerance { atol: 0.0, rtol: 0.0 })?;
    let mut count = vec![0usize; vocab];
    ids.iter().for_each(|&i| count[i as usize] += 1);
    let most = count.into_iter().max().unwrap_or(0).max(1) as f64;
    let tol = tolerance(dtype);
    compare(&what("dtable"), &dtable, &dtable_want, Tolerance { atol: tol.atol * most, rtol: tol.rtol })?;
    if dtype == DType::F32 {
        let mut cpu = dtable0.clone();
        embedding::cpu::scatter_add(&dy, &ids, &mut cpu, dim);
        if let Some(i) = (0..cpu.len()).find(|&i| cpu[i].to_bits() != dtable[i].to_bits()) {
            return Err(format!("{}: [{i}] is {} on the device, {} on the CPU path (same order, so same bits)", what("dtable"), dtable[i], cpu[i]));
        }
    }
    Ok(())
}

mod wgpu_run {
    use super::GluOut;
    use crate::device::wgpu::{runtime, PooledBuffer, Precision, WgpuRuntime};
    use crate::kernels::elementwise::{wgsl as glu, GluParams};
    use crate::kernels::embedding::{wgsl as embedding, EmbeddingParams};
    use crate::kernels::rope::{wgsl as rope, Direction, RopeParams};
    use crate::Result;

    fn up<T: bytemuck::Pod>(rt: &WgpuRuntime, v: &[T]) -> PooledBuffer {
        rt.upload(bytemuck::cast_slice(v))
    }

    /// A tensor in the precision's storage (the values are already representable).
    fn up_as(rt: &WgpuRuntime, pr: Precision, v: &[f32]) -> PooledBuffer {
        match pr {
            Precision::F32 => up(rt, v),
            Precision::F16 => up(rt, &v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>()),
        }
    }

    fn down(rt: &WgpuRuntime, pr: Precision, b: &PooledBuffer, n: usize) -> Result<Vec<f32>> {
        let bytes = rt.download(b.buffer(), (n * pr.bytes()).next_multiple_of(4))?;
        Ok(match pr {
            Precision::F32 => bytemuck::pod_collect_to_vec(&bytes[..4 * n]),
            Precision::F16 => bytes.chunks_exact(2).take(n).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rope(i: usize, pr: Precision, x: &[f32], pos: &[i32], freq: &[f32], p: RopeParams, dir: Direction) -> Result<Vec<f32>> {
        let rt = runtime(i)?;
        let (xb, pb, fb, yb) = (up_as(&rt, pr, x), up(&rt, pos), up(&rt, freq), rt.alloc(x.len() * 4));
        rope::rope(&rt.device, &rt.queue, &rt.kernels, xb.buffer(), pb.buffer(), fb.buffer(), yb.buffer(), p, dir, pr)?;
        down(&rt, pr, &yb, x.len())
    }

    pub fn glu(i: usize, pr: Precision, g: &[f32], u: &[f32], dy: &[f32], p: GluParams) -> Result<GluOut> {
        let rt = runtime(i)?;
        let n = g.len();
        let (gb, ub, dyb) = (up_as(&rt, pr, g), up_as(&rt, pr, u), up_as(&rt, pr, dy));
        let (yb, dgb, dub) = (rt.alloc(n * 4), rt.alloc(n * 4), rt.alloc(n * 4));
        let (d, q, k) = (&rt.device, &rt.queue, &rt.kernels);
        glu::forward(d, q, k, gb.buffer(), ub.buffer(), yb.buffer(), p, pr)?;
        glu::backward(d, q, k, gb.buffer(), ub.buffer(), dyb.buffer(), dgb.buffer(), dub.buffer(), p, pr)?;
        Ok(GluOut { y: down(&rt, pr, &yb, n)?, dg: down(&rt, pr, &dgb, n)?, du: down(&rt, pr, &dub, n)? })
    }

    pub fn glu_packed(i: usize, pr: Precision, gu: &[f32], dy: &[f32], p: GluParams) -> Result<(Vec<f32>, Vec<f32>)> {
        let rt = runtime(i)?;
        let (gub, dyb, yb, dgub) = (up_as(&rt, pr, gu), up_as(&rt, pr, dy), rt.alloc(dy.len() * 4), rt.alloc(gu.len() * 4));
        glu::forward_packed(&rt.device, &rt.queue, &rt.kernels, gub.buffer(), yb.buffer(), p, pr)?;
        glu::backward_packed(&rt.device, &rt.queue, &rt.kernels, gub.buffer(), dyb.buffer(), dgub.buffer(), p, pr)?;
        Ok((down(&rt, pr, &yb, dy.len())?, down(&rt, pr, &dgub, gu.len())?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn embedding(i: usize, pr: Precision, table: &[f32], ids: &[i32], dy: &[f32], dtable0: &[f32], p: EmbeddingParams) -> Result<(Vec<f32>, Vec<f32>)> {
        let rt = runtime(i)?;
        let (tb, ib, dyb, dtb) = (up_as(&rt, pr, table), up(&rt, ids), up_as(&rt, pr, dy), up_as(&rt, pr, dtable0));
        let yb = rt.alloc(dy.len() * 4);
        embedding::forward(&rt.device, &rt.queue, &rt.kernels, tb.buffer(), ib.buffer(), yb.buffer(), p, pr)?;
        embedding::backward(&rt.device, &rt.queue, &rt.kernels, dyb.buffer(), ib.buffer(), dtb.buffer(), p, pr)?;
        Ok((down(&rt, pr, &yb, dy.len())?, down(&rt, pr, &dtb, table.len())?))
    }
}

mod cuda_run {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream};

    use super::GluOut;
    use crate::device::cuda::runtime;
    use crate::kernels::elementwise::{cuda as glu, GluParams};
    use crate::kernels::embedding::{cuda as embedding, EmbeddingParams};
    use crate::kernels::rope::{cuda as rope, Direction, RopeParams};
    use crate::testing::cuda_mem::{err, up, zeros, Storage};
    use crate::{DType, Error, Result};

    fn store<T: Storage>(s: &Arc<CudaStream>, v: &[f32]) -> Result<CudaSlice<T>> {
        up(s, &v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())
    }

    fn load<T: Storage>(s: &Arc<CudaStream>, d: &CudaSlice<T>, n: usize) -> Result<Vec<f32>> {
        let v = s.clone_dtoh(d).map_err(err("copy to host"))?;
        Ok(v.into_iter().take(n).map(T::to_f32).collect())
    }

    /// Runs `$body` with `$t` bound to the storage type of `$dtype`.
    macro_rules! by_dtype {
        ($dtype:expr, $t:ident => $body:expr) => {
            match $dtype {
                DType::F32 => {
                    type $t = f32;
                    $body
                }
                DType::BF16 => {
                    type $t = u16;
                    $body
                }
                d => Err(Error::InvalidArgument(format!("no CUDA kernel for {d}"))),
            }
        };
    }

    pub fn rope(i: usize, dtype: DType, x: &[f32], pos: &[i32], freq: &[f32], p: RopeParams, dir: Direction) -> Result<Vec<f32>> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        by_dtype!(dtype, T => {
            let xd = store::<T>(s, x)?;
            let (pd, fd) = (up(s, pos)?, up(s, freq)?);
            let mut yd = zeros::<T>(s, x.len())?;
            rope::rope::<T>(s, &rt.modules, &xd.slice(..), &pd.slice(..), &fd.slice(..), &mut yd.slice_mut(..), p, dir)?;
            load(s, &yd, x.len())
        })
    }

    pub fn glu(i: usize, dtype: DType, g: &[f32], u: &[f32], dy: &[f32], p: GluParams) -> Result<GluOut> {
        let rt = runtime(i)?;
        let (s, m) = (&rt.stream, &rt.modules);
        let n = g.len();
        by_dtype!(dtype, T => {
            let (gd, ud, dyd) = (store::<T>(s, g)?, store::<T>(s, u)?, store::<T>(s, dy)?);
            let (mut yd, mut dgd, mut dud) = (zeros::<T>(s, n)?, zeros::<T>(s, n)?, zeros::<T>(s, n)?);
            glu::forward::<T>(s, m, &gd.slice(..), &ud.slice(..), &mut yd.slice_mut(..), p)?;
            glu::backward::<T>(s, m, &gd.slice(..), &ud.slice(..), &dyd.slice(..), &mut dgd.slice_mut(..), &mut dud.slice_mut(..), p)?;
            Ok(GluOut { y: load(s, &yd, n)?, dg: load(s, &dgd, n)?, du: load(s, &dud, n)? })
        })
    }

    pub fn glu_packed(i: usize, dtype: DType, gu: &[f32], dy: &[f32], p: GluParams) -> Result<(Vec<f32>, Vec<f32>)> {
        let rt = runtime(i)?;
        let (s, m) = (&rt.stream, &rt.modules);
        by_dtype!(dtype, T => {
            let (gud, dyd) = (store::<T>(s, gu)?, store::<T>(s, dy)?);
            let (mut yd, mut dgud) = (zeros::<T>(s, dy.len())?, zeros::<T>(s, gu.len())?);
            glu::forward_packed::<T>(s, m, &gud.slice(..), &mut yd.slice_mut(..), p)?;
            glu::backward_packed::<T>(s, m, &gud.slice(..), &dyd.slice(..), &mut dgud.slice_mut(..), p)?;
            Ok((load(s, &yd, dy.len())?, load(s, &dgud, gu.len())?))
        })
    }

    pub fn embedding(
        i: usize,
        dtype: DType,
        table: &[f32],
        ids: &[i32],
        dy: &[f32],
        dtable0: &[f32],
        p: EmbeddingParams,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rt = runtime(i)?;
        let (s, m) = (&rt.stream, &rt.modules);
        by_dtype!(dtype, T => {
            let (td, dyd, mut dtd) = (store::<T>(s, table)?, store::<T>(s, dy)?, store::<T>(s, dtable0)?);
            let idd = up(s, ids)?;
            let mut yd = zeros::<T>(s, dy.len())?;
            embedding::forward::<T>(s, m, &td.slice(..), &idd.slice(..), &mut yd.slice_mut(..), p)?;
            embedding::backward::<T>(s, m, &dyd.slice(..), &idd.slice(..), &mut dtd.slice_mut(..), p)?;
            Ok((load(s, &yd, dy.len())?, load(s, &dtd, table.len())?))
        })
    }
}

/// `add` (b of a's shape, and a bias `[cols]` broadcast over rows) and `scale` on `dev` in
/// `dtype` (f32, or bf16 on CUDA) against the CPU: each is one f32 operation per element on
/// inputs exact in `dtype`, then one round to nearest even into `dtype`, so the bits must agree.
pub fn check_add_scale(dev: Device, dtype: DType, rows: usize, cols: usize, seed: u64) -> Check {
    use crate::{ops, Tensor};
    let e = |what: &'static str| move |err: crate::Error| format!("{what} on {dev}: {err}");
    let mut rng = Rng::new(seed);
    let mut input = |n: usize| -> Vec<f32> { rng.vec(n, -3.0, 3.0).into_iter().map(|x| round_to(dtype, x)).collect() };
    let (a, full, bias) = (input(rows * cols), input(rows * cols), input(cols));
    let on = |v: &[f32], shape: Vec<usize>| -> crate::Result<Tensor> { Tensor::from_slice(v, shape, &dev)?.to_dtype(dtype) };
    let bits = |v: Vec<f32>| -> Vec<u32> { v.into_iter().map(|x| round_to(dtype, x).to_bits()).collect() };
    let got_bits = |t: Tensor| -> crate::Result<Vec<u32>> { Ok(t.to_vec_f32()?.iter().map(|x| x.to_bits()).collect()) };
    let at = on(&a, vec![rows, cols]).map_err(e("upload"))?;
    for (what, b, shape) in [("add (same shape)", &full, vec![rows, cols]), ("add (bias over rows)", &bias, vec![cols])] {
        let want = bits(a.iter().enumerate().map(|(i, x)| x + b[i % b.len()]).collect());
        let got = got_bits(ops::add(&at, &on(b, shape).map_err(e("upload"))?).map_err(e(what))?).map_err(e(what))?;
        if got != want {
            let i = got.iter().zip(&want).position(|(g, w)| g != w).unwrap_or(0);
            return Err(format!("{what} {dtype} on {dev}: element {i} has bits {:#x}, the CPU's {:#x}", got[i], want[i]));
        }
    }
    let want = bits(a.iter().map(|x| x * -0.37).collect());
    let got = got_bits(ops::scale(&at, -0.37).map_err(e("scale"))?).map_err(e("scale"))?;
    if got != want {
        return Err(format!("scale {dtype} on {dev}: differs from the CPU's bits"));
    }
    Ok(())
}

/// `ops::matmul` with each of its four transpositions (`op(a)·op(b)`, op(a) `[m, k]`, op(b)
/// `[k, n]`) on `dev` in `dtype` against the f64 product of the same (rounded) inputs. f32:
/// relative L2 within 1e-5; 16-bit: one rounding of the output (2^-9 for bf16) bounds it at
/// 1e-2. On CUDA a transposed a goes through the transpose kernel first (the backward of a
/// trained weight, dW = dYᵀ·X), so this is that path's check.
pub fn check_matmul(dev: Device, dtype: DType, (m, n, k): (usize, usize, usize), seed: u64) -> Check {
    use crate::kernels::matmul::{reference, MatmulParams};
    use crate::{ops, Tensor};
    let mut rng = Rng::new(seed);
    let (a, b) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
    let (a, b): (Vec<f32>, Vec<f32>) = (a.into_iter().map(|x| round_to(dtype, x)).collect(), b.into_iter().map(|x| round_to(dtype, x)).collect());
    let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        let p = MatmulParams { m, n, k, trans_a, trans_b };
        let (ashape, bshape) = (if trans_a { vec![k, m] } else { vec![m, k] }, if trans_b { vec![n, k] } else { vec![k, n] });
        let want = reference::matmul(&a.iter().map(|&x| x as f64).collect::<Vec<_>>(), &b.iter().map(|&x| x as f64).collect::<Vec<_>>(), p);
        let what = format!("matmul {dtype} on {dev} [{m}, {n}, {k}] trans_a {trans_a} trans_b {trans_b}");
        let run = || -> crate::Result<Vec<f32>> {
            let at = Tensor::from_slice(&a, ashape.clone(), &dev)?.to_dtype(dtype)?;
            let bt = Tensor::from_slice(&b, bshape.clone(), &dev)?.to_dtype(dtype)?;
            ops::matmul(&at, &bt, trans_a, trans_b)?.to_vec_f32()
        };
        let got = run().map_err(|e| format!("{what}: {e}"))?;
        crate::testing::compare_l2(&what, &got, &want, bound)?;
    }
    Ok(())
}
