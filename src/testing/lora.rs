//! Fused LoRA linear and NF4 QLoRA checks on one device against `kernels::lora::reference`
//! (f64), shared by `tests/lora_devices.rs` and `tools/gpu-check`. Each check calls the
//! device's launchers (`cpu::`, `wgsl::`, `cuda::`) directly.
//!
//! Tolerance (DESIGN.md, the FlashAttention rule): a naive implementation in the device's
//! precision — the same math as plain loops, f32 accumulation in index order, every stored
//! intermediate and output rounded to the storage type — is run beside the device, its largest
//! error against the f64 reference measured per output, and the device may be off by at most
//! twice that, plus a floor of four f32 ulps of the largest reference value (so a case where
//! the naive loops happen to be exact does not demand exactness) and, in 16-bit cases, one
//! rounding of the largest value and the rounding a stored intermediate carries into the
//! product that reads it (`naive_tolerance`). A GEMM's rounding grows with
//! its inner dimension (K + R terms for Y, N + R for dX, M for dA and dB) and with the input
//! magnitudes; measuring it instead of fixing a number keeps the bound tight at every shape
//! while any indexing or tiling bug (an error the size of a product term) still fails it.

use crate::kernels::lora::{cpu, reference, LoraParams};
use crate::kernels::matmul::reference::matmul;
use crate::kernels::matmul::MatmulParams;
use crate::kernels::nf4;
use crate::testing::{compare, Rng, Tolerance};
use crate::{DType, Device};

type Check = std::result::Result<(), String>;

/// One LoRA linear test case.
#[derive(Clone, Copy, Debug)]
pub struct LoraCase {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub bias: bool,
    pub scale: f32,
    /// F32 (CPU, wgpu), F16 (wgpu with SHADER_F16; CUDA) or BF16 (CUDA) storage of every input
    /// and output but dA, dB.
    pub dtype: DType,
    pub seed: u64,
    /// LoRA dropout `(p, seed)` on the adapter's input (f32 on the CPU and wgpu, bf16 on CUDA;
    /// with NF4 on the CPU and wgpu).
    pub dropout: Option<(f32, u64)>,
}

impl LoraCase {
    pub fn params(&self) -> LoraParams {
        LoraParams { m: self.m, n: self.n, k: self.k, r: self.r, scale: self.scale }
    }
}

/// Rounds to the storage type and back.
pub fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

fn rounded(dtype: DType, v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| round_to(dtype, x)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Plain loops in f32, index order (the naive implementation of the tolerance rule).
fn mm32(a: &[f32], b: &[f32], p: MatmulParams) -> Vec<f32> {
    let (ars, acs) = if p.trans_a { (1, p.m) } else { (p.k, 1) };
    let (brs, bcs) = if p.trans_b { (1, p.k) } else { (p.n, 1) };
    let mut c = vec![0.0f32; p.m * p.n];
    for i in 0..p.m {
        for j in 0..p.n {
            let mut acc = 0.0f32;
            for l in 0..p.k {
                acc += a[i * ars + l * acs] * b[l * brs + j * bcs];
            }
            c[i * p.n + j] = acc;
        }
    }
    c
}

fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> MatmulParams {
    MatmulParams { m, n, k, trans_a, trans_b }
}

/// The unit roundoff of a 16-bit storage type (half its ulp at 1: 2^-8 for bf16, 2^-11 for
/// f16), 0 for f32 (its rounding is in the floor's f32 ulps).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 0.0,
    }
}

/// The tolerance of the rule above for one output of a case in `dtype`: naive error doubled,
/// plus the floor. In a 16-bit case the floor has two more parts, each an error a correct
/// kernel can make that the naive model's own may happen to stay below on a small case:
/// - one rounding to the type of the largest value: the output is stored in it, or (dA, dB)
///   computed from intermediates stored in it;
/// - `carried`: the largest error that rounding a stored intermediate (XA, G) carries into this
///   output's second product (`carried_rounding`). The kernels differ in what they round (the
///   WGSL kernel rounds XA and applies s in f32, the CUDA one rounds s·XA), so the naive
///   model's rounding errors can cancel where the device's do not.
pub fn naive_tolerance(naive: &[f32], want: &[f64], out: DType, carried: f64) -> Tolerance {
    let err = naive.iter().zip(want).fold(0.0f64, |e, (&g, &w)| e.max((g as f64 - w).abs()));
    let big = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    Tolerance { atol: 2.0 * err + (4.0 * f32::EPSILON as f64 + unit_roundoff(out)) * big + carried, rtol: 0.0 }
}

/// For y, xa, dx, da and db, the largest over the output's elements of what one rounding of
/// each stored intermediate term can carry into it: u·|s|·Σ |p||q| over the product that reads
/// the intermediate (u the storage type's unit roundoff): Σ_r |XA||B| for y, Σ_r |G||A| for dX
/// (times the dropout scale), Σ_m |G||X̃| for dA, Σ_m |dY||XA| for dB; xa reads none.
fn carried_rounding(case: &LoraCase, inp: &LoraInputs, want: &LoraOutputs64) -> [f64; 5] {
    let (m, n, k, r) = (case.m, case.n, case.k, case.r);
    // An f32 intermediate is rounded too (2^-24): a CPU case with one output and a long sum
    // (m 59, n 29, k 1, r 1) was 16 f32 ulps off in dA while the naive model's errors cancelled.
    let u = if case.dtype == DType::F32 { 2f64.powi(-24) } else { unit_roundoff(case.dtype) };
    let us = u * case.scale.abs() as f64;
    // Σ |p||q| is the product of the magnitudes.
    let abs = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| x.abs()).collect() };
    let largest = |v: Vec<f64>| us * v.into_iter().fold(0.0f64, f64::max);
    let (xa, dy) = (abs(&want.xa), f64s(&inp.dy));
    let (a, b, xl) = (abs(&f64s(&inp.a)), abs(&f64s(&inp.b)), abs(&f64s(&inp.x_lora)));
    let g = abs(&matmul(&dy, &f64s(&inp.b), mm(m, r, n, false, false)));
    let mut dx = matmul(&g, &a, mm(m, k, r, false, false));
    if let Some(ds) = &inp.drop_scale {
        dx.iter_mut().zip(ds).for_each(|(v, &d)| *v *= d as f64);
    }
    [
        largest(matmul(&xa, &b, mm(m, n, r, false, true))),
        0.0,
        largest(dx),
        largest(matmul(&g, &xl, mm(r, k, m, true, false))),
        largest(matmul(&abs(&dy), &xa, mm(n, r, m, true, false))),
    ]
}

/// Inputs of one case, already rounded to the storage type (so the reference sees exactly
/// what the device sees). `x_lora` is x after the case's dropout (x itself without), made on
/// the host with the mask every device draws; `drop_scale` is `mask / (1 - p)` per element.
#[derive(Clone)]
pub struct LoraInputs {
    pub x: Vec<f32>,
    pub x_lora: Vec<f32>,
    pub drop_scale: Option<Vec<f32>>,
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub dy: Vec<f32>,
}

impl LoraInputs {
    pub fn new(case: &LoraCase) -> Self {
        let (m, n, k, r, t) = (case.m, case.n, case.k, case.r, case.dtype);
        let mut rng = Rng::new(case.seed);
        let x = rounded(t, rng.vec(m * k, -1.0, 1.0));
        let drop_scale = case.dropout.map(|(p, seed)| {
            let keep = 1.0 / (1.0 - p);
            (0..m * k).map(|i| if crate::rng::uniform_at(seed, i as u64) >= p { keep } else { 0.0 }).collect::<Vec<f32>>()
        });
        let x_lora = match &drop_scale {
            Some(ds) => x.iter().zip(ds).map(|(&v, &d)| round_to(t, v * d)).collect(),
            None => x.clone(),
        };
        LoraInputs {
            x,
            x_lora,
            drop_scale,
            w: rounded(t, rng.vec(n * k, -1.0, 1.0)),
            bias: case.bias.then(|| rounded(t, rng.vec(n, -1.0, 1.0))),
            a: rounded(t, rng.vec(r * k, -1.0, 1.0)),
            b: rounded(t, rng.vec(n * r, -1.0, 1.0)),
            dy: rounded(t, rng.vec(m * n, -1.0, 1.0)),
        }
    }
}

/// What a device returns: y, xa (forward); dx, da, db (backward).
pub struct LoraOutputs {
    pub y: Vec<f32>,
    pub xa: Vec<f32>,
    pub dx: Vec<f32>,
    pub da: Vec<f32>,
    pub db: Vec<f32>,
}

/// The naive implementation in the case's precision (see the module doc). Stored
/// intermediates are rounded as the GPU paths store them: XA, and s·XA, s·G on CUDA; with
/// dropout, dX's two products (`dY·W` and the LoRA share) apart before the masked sum.
fn naive(case: &LoraCase, inp: &LoraInputs) -> LoraOutputs {
    let (m, n, k, r, t, s) = (case.m, case.n, case.k, case.r, case.dtype, case.scale);
    let xa = rounded(t, mm32(&inp.x_lora, &inp.a, mm(m, r, k, false, true)));
    let xa_s: Vec<f32> = xa.iter().map(|&v| round_to(t, s * v)).collect();
    let base = mm32(&inp.x, &inp.w, mm(m, n, k, false, true));
    let lora = mm32(&xa_s, &inp.b, mm(m, n, r, false, true));
    let y = (0..m * n).map(|i| round_to(t, base[i] + lora[i] + inp.bias.as_ref().map_or(0.0, |b| b[i % n]))).collect();
    let g = mm32(&inp.dy, &inp.b, mm(m, r, n, false, false));
    let g_s: Vec<f32> = g.iter().map(|&v| round_to(t, s * v)).collect();
    let dxw = mm32(&inp.dy, &inp.w, mm(m, k, n, false, false));
    let dxl = mm32(&g_s, &inp.a, mm(m, k, r, false, false));
    let dx = match &inp.drop_scale {
        Some(ds) => (0..m * k).map(|i| round_to(t, round_to(t, dxw[i]) + round_to(t, dxl[i]) * ds[i])).collect(),
        None => (0..m * k).map(|i| round_to(t, dxw[i] + dxl[i])).collect(),
    };
    let da = mm32(&g_s, &inp.x_lora, mm(r, k, m, true, false));
    let db: Vec<f32> = mm32(&inp.dy, &xa, mm(n, r, m, true, false)).iter().map(|v| s * v).collect();
    LoraOutputs { y, xa, dx, da, db }
}

fn compare_all(what: &str, case: &LoraCase, inp: &LoraInputs, got: &LoraOutputs, want: &LoraOutputs64, nv: &LoraOutputs) -> Check {
    // (name, device, reference, naive)
    type Output<'a> = (&'a str, &'a [f32], &'a [f64], &'a [f32]);
    let outs: [Output; 5] = [
        ("y", &got.y, &want.y, &nv.y),
        ("xa", &got.xa, &want.xa, &nv.xa),
        ("dx", &got.dx, &want.dx, &nv.dx),
        ("da", &got.da, &want.da, &nv.da),
        ("db", &got.db, &want.db, &nv.db),
    ];
    let carried = carried_rounding(case, inp, want);
    for ((name, g, w, n), c) in outs.into_iter().zip(carried) {
        compare(&format!("{what} {name} ({case:?})"), g, w, naive_tolerance(n, w, case.dtype, c))?;
    }
    Ok(())
}

struct LoraOutputs64 {
    y: Vec<f64>,
    xa: Vec<f64>,
    dx: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
}

fn reference_outputs(case: &LoraCase, inp: &LoraInputs, w: &[f32]) -> LoraOutputs64 {
    let p = case.params();
    let (x, w) = (f64s(&inp.x), f64s(w));
    let (a, b, dy) = (f64s(&inp.a), f64s(&inp.b), f64s(&inp.dy));
    let bias = inp.bias.as_deref().map(f64s);
    let x_lora = f64s(&inp.x_lora);
    let (y, xa) = reference::forward(&x, &x_lora, &w, bias.as_deref(), &a, &b, p);
    let drop_scale = inp.drop_scale.as_deref().map(f64s);
    let (dx, da, db) = reference::backward(&dy, &x_lora, &xa, &w, &a, &b, drop_scale.as_deref(), p);
    LoraOutputs64 { y, xa, dx, da, db }
}

/// Fused LoRA forward and backward on `dev` against the f64 reference.
pub fn check_lora(dev: Device, case: LoraCase) -> Check {
    let inp = LoraInputs::new(&case);
    let want = reference_outputs(&case, &inp, &inp.w);
    let got = match dev {
        Device::Cpu => run_cpu(&case, &inp, &inp.w),
        Device::Wgpu(i) => wgpu_run::lora(i, &case, &inp, None),
        Device::Cuda(i) => cuda_run::lora(i, &case, &inp, None),
    }
    .map_err(|e| format!("lora on {dev}: {e}"))?;
    compare_all(&format!("lora on {dev}"), &case, &inp, &got, &want, &naive(&case, &inp))
}

/// The same with W quantized to NF4 (`nf4::cpu::quantize`): the reference and the naive loops
/// use the CPU dequantization of W (byte-exact against bitsandbytes), the device its own
/// in-kernel dequantization.
pub fn check_nf4_lora(dev: Device, case: LoraCase) -> Check {
    let inp = LoraInputs::new(&case);
    let q = nf4::cpu::quantize(&inp.w);
    let wq = nf4::cpu::dequantize(&q).map_err(|e| e.to_string())?;
    let want = reference_outputs(&case, &inp, &wq);
    let dq = LoraInputs { w: wq.clone(), ..inp.clone() };
    let got = match dev {
        Device::Cpu => run_cpu(&case, &inp, &wq),
        Device::Wgpu(i) => wgpu_run::lora(i, &case, &inp, Some(&q)),
        Device::Cuda(i) => cuda_run::lora(i, &case, &inp, Some(&q)),
    }
    .map_err(|e| format!("nf4 lora on {dev}: {e}"))?;
    compare_all(&format!("nf4 lora on {dev}"), &case, &dq, &got, &want, &naive(&case, &dq))
}

/// The LoRA dropout kernels on `dev` (wgpu: f32; CUDA: f32 and bf16) give the CPU's mask and
/// arithmetic bit for bit: `y = x * keep` where `uniform_at(seed, i) >= p`, and the axpy form
/// `y = x + s * t * keep` (else `x`), each operation rounded in f32 (and the result once more to
/// bf16 for bf16 storage). The CPU applies dropout inside the op, so a GPU device is required.
pub fn check_dropout(dev: Device, n: usize, p: f32, seed: u64) -> Check {
    let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
    let t: Vec<f32> = (0..n).map(|i| 0.3 - (i % 11) as f32 * 0.0625).collect();
    let (keep, s) = (1.0 / (1.0 - p), 0.37f32);
    let dtypes: &[DType] = match dev {
        Device::Cuda(_) => &[DType::F32, DType::BF16],
        Device::Wgpu(_) => &[DType::F32],
        Device::Cpu => return Err("check_dropout: the CPU has no dropout launcher (it drops out inside the op)".into()),
    };
    for &dt in dtypes {
        let (x, t) = (rounded(dt, x.clone()), rounded(dt, t.clone()));
        let kept = |i: usize| crate::rng::uniform_at(seed, i as u64) >= p;
        let want_drop: Vec<f32> = (0..n).map(|i| round_to(dt, if kept(i) { x[i] * keep } else { 0.0 })).collect();
        let want_axpy: Vec<f32> = (0..n).map(|i| round_to(dt, if kept(i) { x[i] + s * t[i] * keep } else { x[i] })).collect();
        let (drop, axpy) = match dev {
            Device::Wgpu(i) => wgpu_run::dropout(i, &x, &t, s, p, seed),
            _ => cuda_run::dropout(dev, dt, &x, &t, s, p, seed),
        }
        .map_err(|e| format!("dropout on {dev}: {e}"))?;
        for (what, got, want) in [("dropout", &drop, &want_drop), ("dropout axpy", &axpy, &want_axpy)] {
            let bad: Vec<usize> = (0..n).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
            if let Some(&i) = bad.first() {
                return Err(format!("{what} {dt} on {dev}, seed {seed:#x}, p {p}: {} of {n} elements differ, first [{i}] got {} want {}", bad.len(), got[i], want[i]));
            }
        }
    }
    Ok(())
}

/// NF4 dequantization on `dev` equals `nf4::cpu::dequantize` bit for bit.
pub fn check_nf4_dequant(dev: Device, len: usize, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    // Rows of different scales, so the absmax values (and their double quantization) vary.
    let w: Vec<f32> = (0..len).map(|i| rng.uniform(-1.0, 1.0) * (1.0 + (i / 97 % 7) as f32)).collect();
    let q = nf4::cpu::quantize(&w);
    let want = nf4::cpu::dequantize(&q).map_err(|e| e.to_string())?;
    let got = match dev {
        Device::Cpu => Ok(want.clone()),
        Device::Wgpu(i) => wgpu_run::dequant(i, &q),
        Device::Cuda(i) => cuda_run::dequant(i, &q),
    }
    .map_err(|e| format!("nf4 dequantize on {dev}: {e}"))?;
    if let Some(i) = (0..len).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        return Err(format!("nf4 dequantize on {dev} ({len} elements): [{i}] got {} want {} (bit-exact expected)", got[i], want[i]));
    }
    Ok(())
}

/// NF4 quantization of a `dtype` tensor on `dev` (`nf4::quantize_tensor`: the device passes on a
/// GPU) equals `nf4::cpu::quantize` of the same values byte for byte: codes, absmax indices,
/// second-level scales and offset. The values mix scales, an all-zero block, a block whose
/// only nonzero value is its absmax, values at ±absmax, and a block of absmax 1 holding the
/// midpoints between codes exactly (ties, which go to the lower code).
pub fn check_nf4_quantize(dev: Device, dtype: DType, len: usize, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let mut w: Vec<f32> = (0..len).map(|i| rng.uniform(-1.0, 1.0) * (1.0 + (i / 97 % 7) as f32)).collect();
    for (i, v) in w.iter_mut().enumerate() {
        let j = i % nf4::BLOCK;
        match i / nf4::BLOCK % 6 {
            1 => *v = 0.0,
            2 if j != 3 => *v = 0.0,
            3 if i % 9 == 0 => *v = -3.5,
            4 if j == 0 => *v = 1.0,
            4 => *v = (nf4::NF4[j % 15] + nf4::NF4[j % 15 + 1]) / 2.0,
            _ => {}
        }
    }
    let w = rounded(dtype, w);
    let want = nf4::cpu::quantize(&w);
    let got = crate::Tensor::from_slice(&w, [len], &dev)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| nf4::quantize_tensor(&t))
        .map_err(|e| format!("nf4 quantize {dtype} on {dev}: {e}"))?;
    let what = format!("nf4 quantize {dtype} on {dev} ({len} elements)");
    if let Some(i) = (0..want.packed.len()).find(|&i| got.packed.get(i) != Some(&want.packed[i])) {
        return Err(format!("{what}: packed byte {i} (elements {}, {}) got {:?} want {:#04x}", 2 * i, 2 * i + 1, got.packed.get(i), want.packed[i]));
    }
    if got != want {
        return Err(format!("{what}: the codes agree but not the double quantization (absmax indices equal: {}, scales equal: {}, offset {} vs {})", got.absmax == want.absmax, got.absmax2 == want.absmax2, got.offset, want.offset));
    }
    Ok(())
}

fn run_cpu(case: &LoraCase, inp: &LoraInputs, w: &[f32]) -> crate::Result<LoraOutputs> {
    let p = case.params();
    let w = cpu::Base::F32 { w, transposed: false };
    let (y, xa) = cpu::forward(&inp.x, &inp.x_lora, w, inp.bias.as_deref(), &inp.a, &inp.b, p)?;
    let (mut da, mut db) = (vec![0.0; p.r * p.k], vec![0.0; p.n * p.r]);
    let dx = cpu::backward(&inp.dy, &inp.x_lora, &xa, w, &inp.a, &inp.b, inp.drop_scale.as_deref(), true, &mut da, &mut db, p)?.unwrap_or_default();
    Ok(LoraOutputs { y, xa, dx, da, db })
}

mod wgpu_run {
    use super::{LoraCase, LoraInputs, LoraOutputs};
    use crate::device::wgpu::{runtime, PooledBuffer, WgpuRuntime};
    use crate::kernels::lora::wgsl::{self, Precision};
    use crate::kernels::nf4::{self, Nf4Tensor};
    use crate::{DType, Error, Result};

    fn up(rt: &WgpuRuntime, v: &[f32]) -> PooledBuffer {
        rt.upload(bytemuck::cast_slice(v))
    }

    fn down(rt: &WgpuRuntime, b: &PooledBuffer, n: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&rt.download(b.buffer(), n * 4)?))
    }

    /// Uploads in the precision's storage type (the values are already representable).
    fn up_as(rt: &WgpuRuntime, pr: Precision, v: &[f32]) -> PooledBuffer {
        match pr {
            Precision::F32 => up(rt, v),
            Precision::F16 => rt.upload(bytemuck::cast_slice(&v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>())),
        }
    }

    fn down_as(rt: &WgpuRuntime, pr: Precision, b: &PooledBuffer, n: usize) -> Result<Vec<f32>> {
        match pr {
            Precision::F32 => down(rt, b, n),
            Precision::F16 => {
                // Copies move whole 4-byte words.
                let bytes = rt.download(b.buffer(), (2 * n).next_multiple_of(4))?;
                Ok(bytes.chunks_exact(2).take(n).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect())
            }
        }
    }

    pub fn lora(i: usize, case: &LoraCase, inp: &LoraInputs, q: Option<&Nf4Tensor>) -> Result<LoraOutputs> {
        let pr = match case.dtype {
            DType::F32 => Precision::F32,
            DType::F16 => Precision::F16,
            dt => return Err(Error::InvalidArgument(format!("no WGSL LoRA kernel for {dt}"))),
        };
        let rt = runtime(i)?;
        let p = case.params();
        let (m, n, k, r) = (p.m, p.n, p.k, p.r);
        let (x, w, a, b, dy) = (up_as(&rt, pr, &inp.x), up_as(&rt, pr, &inp.w), up_as(&rt, pr, &inp.a), up_as(&rt, pr, &inp.b), up_as(&rt, pr, &inp.dy));
        let xl = up_as(&rt, pr, &inp.x_lora);
        let bias = inp.bias.as_ref().map(|v| up_as(&rt, pr, v));
        let (y, xa, dx, da, db) = (rt.alloc(m * n * 4), rt.alloc(m * r * 4), rt.alloc(m * k * 4), rt.alloc(r * k * 4), rt.alloc(n * r * 4));
        let (dev, queue, kern) = (&rt.device, &rt.queue, &rt.kernels);
        let bias_b = bias.as_ref().map(|b| b.buffer());
        let wq = q.map(|q| nf4::wgsl::upload(dev, q)).transpose()?;
        let w = wq.as_ref().map_or(wgsl::Weight::Dense(w.buffer()), wgsl::Weight::Nf4);
        wgsl::forward(dev, queue, kern, x.buffer(), xl.buffer(), w, bias_b, a.buffer(), b.buffer(), y.buffer(), xa.buffer(), p, pr)?;
        wgsl::backward(dev, queue, kern, dy.buffer(), xl.buffer(), xa.buffer(), w, a.buffer(), b.buffer(), da.buffer(), db.buffer(), Some(dx.buffer()), case.dropout, p, pr)?;
        Ok(LoraOutputs {
            y: down_as(&rt, pr, &y, m * n)?,
            xa: down_as(&rt, pr, &xa, m * r)?,
            dx: down_as(&rt, pr, &dx, m * k)?,
            da: down(&rt, &da, r * k)?,
            db: down(&rt, &db, n * r)?,
        })
    }

    /// (dropout, dropout axpy) of x with the mask of `seed`.
    pub fn dropout(i: usize, x: &[f32], t: &[f32], s: f32, p: f32, seed: u64) -> Result<(Vec<f32>, Vec<f32>)> {
        let rt = runtime(i)?;
        let n = x.len();
        let (xb, tb, yb) = (up(&rt, x), up(&rt, t), rt.alloc(4 * n));
        wgsl::dropout(&rt.device, &rt.queue, &rt.kernels, xb.buffer(), None, yb.buffer(), n, p, seed, wgsl::DropoutTypes::F32)?;
        let drop = down(&rt, &yb, n)?;
        wgsl::dropout(&rt.device, &rt.queue, &rt.kernels, xb.buffer(), Some((tb.buffer(), s)), yb.buffer(), n, p, seed, wgsl::DropoutTypes::F32)?;
        Ok((drop, down(&rt, &yb, n)?))
    }

    pub fn dequant(i: usize, q: &Nf4Tensor) -> Result<Vec<f32>> {
        let rt = runtime(i)?;
        let wq = nf4::wgsl::upload(&rt.device, q)?;
        let out = rt.alloc(q.len * 4);
        nf4::wgsl::dequantize(&rt.device, &rt.queue, &rt.kernels, &wq, out.buffer())?;
        down(&rt, &out, q.len)
    }
}

mod cuda_run {
    use super::{LoraCase, LoraInputs, LoraOutputs};
    use crate::device::cuda::runtime;
    use crate::kernels::lora::cuda::{self, Half};
    use crate::kernels::nf4::cuda::{self as nf4, Nf4Device};
    use crate::kernels::nf4::Nf4Tensor;
    use crate::testing::cuda_mem::{down, up, zeros};
    use crate::{DType, Error, Result};

    fn bits(dt: Half, v: &[f32]) -> Vec<u16> {
        match dt {
            Half::Bf16 => v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
            Half::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect(),
        }
    }

    fn values(dt: Half, v: &[u16]) -> Vec<f32> {
        match dt {
            Half::Bf16 => v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
            Half::F16 => v.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        }
    }

    pub fn lora(i: usize, case: &LoraCase, inp: &LoraInputs, q: Option<&Nf4Tensor>) -> Result<LoraOutputs> {
        let dt = match case.dtype {
            DType::BF16 => Half::Bf16,
            DType::F16 => Half::F16,
            d => return Err(Error::InvalidArgument(format!("no CUDA LoRA kernel for {d}"))),
        };
        let rt = runtime(i)?;
        let (s, md) = (&rt.stream, &rt.modules);
        let p = case.params();
        let (m, n, k, r) = (p.m, p.n, p.k, p.r);
        let (x, w, a, b, dy) = (up(s, &bits(dt, &inp.x))?, up(s, &bits(dt, &inp.w))?, up(s, &bits(dt, &inp.a))?, up(s, &bits(dt, &inp.b))?, up(s, &bits(dt, &inp.dy))?);
        let bias = inp.bias.as_ref().map(|v| up(s, &bits(dt, v))).transpose()?;
        let (mut y, mut xa, mut dx) = (zeros::<u16>(s, m * n)?, zeros::<u16>(s, m * r)?, zeros::<u16>(s, m * k)?);
        let (mut da, mut db) = (zeros::<f32>(s, r * k)?, zeros::<f32>(s, n * r)?);
        let xl = up(s, &bits(dt, &inp.x_lora))?;
        let (xv, wv, av, bv, dyv) = (x.slice(..m * k), w.slice(..n * k), a.slice(..r * k), b.slice(..n * r), dy.slice(..m * n));
        let xlv = xl.slice(..m * k);
        let biasv = bias.as_ref().map(|b| b.slice(..n));
        let wq = q.map(|q| Nf4Device::upload(s, q)).transpose()?;
        let weight = match &wq {
            None => cuda::Weight::Dense(&wv),
            Some(wq) => cuda::Weight::Nf4(wq),
        };
        cuda::forward(s, md, dt, &xv, &xlv, weight, biasv.as_ref(), &av, &bv, &mut y.slice_mut(..m * n), &mut xa.slice_mut(..m * r), p)?;
        let xav = xa.slice(..m * r);
        cuda::backward(s, md, dt, &dyv, &xlv, &xav, weight, &av, &bv, &mut da.slice_mut(..r * k), &mut db.slice_mut(..n * r), Some(&mut dx.slice_mut(..m * k)), false, case.dropout, p)?;
        if case.dropout.is_none() {
            // The same dX again, added by the GEMM's epilogue onto the first (as a group of
            // linears sums theirs): 2·dX within one rounding of each sum.
            let first = values(dt, &down(s, &dx, m * k)?);
            let mut twice = up(s, &bits(dt, &first))?;
            let (mut da2, mut db2) = (zeros::<f32>(s, r * k)?, zeros::<f32>(s, n * r)?);
            cuda::backward(s, md, dt, &dyv, &xlv, &xav, weight, &av, &bv, &mut da2.slice_mut(..r * k), &mut db2.slice_mut(..n * r), Some(&mut twice.slice_mut(..m * k)), true, None, p)?;
            let twice = values(dt, &down(s, &twice, m * k)?);
            if let Some(i) = (0..m * k).find(|&i| (twice[i] - 2.0 * first[i]).abs() > 2f32.powi(-7) * (2.0 * first[i]).abs() + 1e-20) {
                return Err(Error::InvalidArgument(format!("dX added onto itself in the GEMM (m {m}, n {n}, k {k}, r {r}): element {i} is {}, twice {} is {}", twice[i], first[i], 2.0 * first[i])));
            }
        }
        linear_matches(s, md, dt, inp, q, weight, biasv.as_ref(), (m, n, k))?;
        // Split GEMMs (thin outputs: XA, G, dA, dB at enough rows) share one buffer of tile
        // counters per stream, which each launch must leave at zero for the next.
        if let Some(t) = md.read_split_counters(s)?.iter().position(|&c| c != 0) {
            return Err(Error::InvalidArgument(format!("split-K tile counter {t} left nonzero after the LoRA products (m {m}, n {n}, k {k}, r {r})")));
        }
        Ok(LoraOutputs {
            y: values(dt, &down(s, &y, m * n)?),
            xa: values(dt, &down(s, &xa, m * r)?),
            dx: values(dt, &down(s, &dx, m * k)?),
            da: down(s, &da, r * k)?,
            db: down(s, &db, n * r)?,
        })
    }

    /// The plain linear (`cuda::linear`, rank 0: the frozen layers without an adapter; the
    /// GEMV kernels up to a few rows, the GEMM past them) on the case's x, W and bias, against
    /// `x·Wᵀ + bias` in f64 (W decoded by the CPU for NF4): within one rounding to the storage
    /// type, the f32 sum's bound and, for NF4, the rounding of each decoded weight.
    #[allow(clippy::too_many_arguments)]
    fn linear_matches(
        s: &std::sync::Arc<cudarc::driver::CudaStream>,
        md: &crate::device::cuda::ModuleCache,
        dt: Half,
        inp: &LoraInputs,
        q: Option<&Nf4Tensor>,
        weight: cuda::Weight<'_, '_>,
        bias: Option<&cudarc::driver::CudaView<'_, u16>>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let w = match q {
            Some(q) => crate::kernels::nf4::cpu::dequantize(q)?,
            None => inp.w.clone(),
        };
        let mut y = zeros::<u16>(s, m * n)?;
        let xv = up(s, &bits(dt, &inp.x))?;
        cuda::linear(s, md, dt, &xv.slice(..m * k), weight, bias, &mut y.slice_mut(..m * n), (m, n, k))?;
        let got = values(dt, &down(s, &y, m * n)?);
        let u = match dt {
            Half::Bf16 => 2f64.powi(-8),
            Half::F16 => 2f64.powi(-11),
        };
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let p = inp.x[i * k + kk] as f64 * w[j * k + kk] as f64;
                    want += p;
                    mag += p.abs();
                }
                if let Some(b) = &inp.bias {
                    want += b[j] as f64;
                    mag += (b[j] as f64).abs();
                }
                // The NF4 GEMM feeds the tensor cores W decoded and rounded to the storage
                // type (the GEMV multiplies the f32 decoded value): one more rounding per term.
                let w_rounding = if q.is_some() { u * mag } else { 0.0 };
                let tol = u * want.abs() + w_rounding + (k + 2) as f64 * 2f64.powi(-23) * mag * (1.0 + u) + 2f64.powi(-24);
                let g = got[i * n + j] as f64;
                if (g - want).abs() > tol {
                    return Err(Error::InvalidArgument(format!("linear (rank 0) at (m {m}, n {n}, k {k}): y[{i}, {j}] is {g}, x·Wᵀ + bias is {want} (tolerance {tol:.3e})")));
                }
            }
        }
        Ok(())
    }

    pub fn dequant(i: usize, q: &Nf4Tensor) -> Result<Vec<f32>> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        let wq = Nf4Device::upload(s, q)?;
        let mut out = zeros::<f32>(s, q.len)?;
        nf4::dequantize(s, &rt.modules, &wq, &mut out.slice_mut(..q.len.max(1)))?;
        down(s, &out, q.len)
    }

    /// (dropout, dropout axpy) of x with the mask of `seed`, in f32 or bf16 storage.
    pub fn dropout(dev: crate::Device, dt: DType, x: &[f32], t: &[f32], sc: f32, p: f32, seed: u64) -> Result<(Vec<f32>, Vec<f32>)> {
        let crate::Device::Cuda(i) = dev else { return Err(Error::InvalidArgument(format!("{dev} is not a CUDA device"))) };
        let rt = runtime(i)?;
        let s = &rt.stream;
        let n = x.len();
        match dt {
            DType::F32 => {
                let (xb, tb, mut yb) = (up(s, x)?, up(s, t)?, zeros::<f32>(s, n)?);
                cuda::dropout(s, &rt.modules, &xb.slice(..), None, &mut yb.slice_mut(..n), p, seed)?;
                let drop = down(s, &yb, n)?;
                cuda::dropout(s, &rt.modules, &xb.slice(..), Some((&tb.slice(..), sc)), &mut yb.slice_mut(..n), p, seed)?;
                Ok((drop, down(s, &yb, n)?))
            }
            _ => {
                let (xb, tb, mut yb) = (up(s, &bits(Half::Bf16, x))?, up(s, &bits(Half::Bf16, t))?, zeros::<u16>(s, n)?);
                cuda::dropout(s, &rt.modules, &xb.slice(..), None, &mut yb.slice_mut(..n), p, seed)?;
                let drop = values(Half::Bf16, &down(s, &yb, n)?);
                cuda::dropout(s, &rt.modules, &xb.slice(..), Some((&tb.slice(..), sc)), &mut yb.slice_mut(..n), p, seed)?;
                Ok((drop, values(Half::Bf16, &down(s, &yb, n)?)))
            }
        }
    }
}
