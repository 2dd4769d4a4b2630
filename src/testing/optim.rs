//! Optimizer-step checks on one device against `kernels::optim::reference` (f64), shared by
//! `tests/optim_devices.rs` and `tools/gpu-check`. Each check runs several consecutive steps
//! (so the accumulators and moments of one step feed the next) through the device's launchers
//! (`cpu::`, `wgsl::`, `cuda::`, no tuna tensors) and compares every output buffer.
//!
//! Tolerances: the device computes in f32, the reference in f64 from the same inputs. A step
//! is a handful of f32 operations per element (relative error a few 2^-24) and the results
//! feed the next step, so after a few steps the error stays far below `Tolerance::F32`
//! (`1e-5 + 1e-4·|ref|`); the accumulator maxima are exact given the v's, so r and c carry
//! only v's rounding. bf16 parameters are compared with `Tolerance::BF16` (the storage
//! rounding, 2^-9 relative per step); their f32 master copy with `Tolerance::F32`.

use crate::kernels::optim::{clip_scale, cpu, reference, AdamWParams, Sm3Params};
use crate::testing::{compare, Rng, Tolerance};
use crate::{DType, Device};

type Check = std::result::Result<(), String>;

/// bf16 round to nearest even, back to f32 (what the device stores).
fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn sum_sq_f64(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum()
}

/// One dense SM3 test case.
#[derive(Clone, Copy, Debug)]
pub struct Sm3Case {
    pub rows: usize,
    pub cols: usize,
    pub momentum: bool,
    pub weight_decay: f32,
    /// The host-given gradient scale.
    pub grad_scale: f32,
    /// Clip by the norm of each step's gradient, computed on the device: the max norm.
    pub device_clip: Option<f32>,
    pub steps: usize,
    /// F32, or BF16 (CUDA only) parameters and gradients.
    pub dtype: DType,
    /// With bf16: keep an f32 master copy.
    pub master: bool,
    pub seed: u64,
}

impl Sm3Case {
    fn params(&self) -> Sm3Params {
        Sm3Params {
            lr: 0.05,
            eps: 1e-8,
            beta1: if self.momentum { 0.9 } else { 0.0 },
            weight_decay: self.weight_decay,
            grad_scale: self.grad_scale,
        }
    }
}

/// What a dense or sparse SM3 run leaves: parameters (f32 values of the storage), the master
/// copy (bf16 with master only), accumulators and momentum.
struct Sm3State {
    w: Vec<f32>,
    master: Option<Vec<f32>>,
    r: Vec<f32>,
    c: Vec<f32>,
    mom: Option<Vec<f32>>,
}

/// Dense SM3 over `case.steps` steps on `dev` against the f64 reference.
pub fn check_sm3(dev: Device, case: Sm3Case) -> Check {
    let (rows, cols, n) = (case.rows, case.cols, case.rows * case.cols);
    let bf16 = case.dtype == DType::BF16;
    let mut rng = Rng::new(case.seed);
    let mut w0 = rng.vec(n, -1.0, 1.0);
    let mut grads: Vec<Vec<f32>> = (0..case.steps).map(|_| rng.vec(n, -1.0, 1.0)).collect();
    if bf16 {
        w0 = round_bf16(&w0);
        grads = grads.iter().map(|g| round_bf16(g)).collect();
    }
    let p = case.params();

    // Reference: accumulators start at zero, momentum at zero.
    let (mut w, mut r, mut c) = (to_f64(&w0), vec![0.0; rows], vec![0.0; cols]);
    let mut mom = case.momentum.then(|| vec![0.0; n]);
    for g in &grads {
        let mut ps = p;
        if let Some(max_norm) = case.device_clip {
            ps.grad_scale *= clip_scale(sum_sq_f64(g), max_norm);
        }
        reference::sm3(&mut w, &to_f64(g), &mut r, &mut c, mom.as_deref_mut(), rows, cols, ps);
    }

    let got = run_sm3(dev, &case, &w0, &grads, p).map_err(|e| format!("sm3 on {dev}: {e}"))?;
    let what = |name: &str| format!("sm3 {name} on {dev} ({case:?})");
    let w_tol = if bf16 { Tolerance::BF16 } else { Tolerance::F32 };
    compare(&what("w"), &got.w, &w, w_tol)?;
    if let Some(m) = &got.master {
        compare(&what("master"), m, &w, Tolerance::F32)?;
    }
    compare(&what("r"), &got.r, &r, Tolerance::F32)?;
    compare(&what("c"), &got.c, &c, Tolerance::F32)?;
    if let (Some(g), Some(want)) = (&got.mom, &mom) {
        compare(&what("momentum"), g, want, Tolerance::F32)?;
    }
    Ok(())
}

fn run_sm3(dev: Device, case: &Sm3Case, w0: &[f32], grads: &[Vec<f32>], p: Sm3Params) -> crate::Result<Sm3State> {
    let (rows, cols, n) = (case.rows, case.cols, case.rows * case.cols);
    match dev {
        Device::Cpu => {
            let (mut w, mut r, mut c) = (w0.to_vec(), vec![0.0; rows], vec![0.0; cols]);
            let mut mom = case.momentum.then(|| vec![0.0; n]);
            for g in grads {
                let mut ps = p;
                if let Some(max_norm) = case.device_clip {
                    ps.grad_scale *= clip_scale(cpu::sum_squares(&[g]), max_norm);
                }
                cpu::sm3(&mut w, g, &mut r, &mut c, mom.as_deref_mut(), rows, cols, ps)?;
            }
            Ok(Sm3State { w, master: None, r, c, mom })
        }
        Device::Wgpu(i) => {
            if case.dtype != DType::F32 {
                return Err(crate::Error::InvalidArgument(format!("no WGSL SM3 kernel for {}", case.dtype)));
            }
            wgpu_run::sm3(i, case, w0, grads, p)
        }
        Device::Cuda(i) => cuda_run::sm3(i, case, w0, grads, p),
    }
}

/// Sparse SM3 over `steps` steps: `nnz` distinct active entries (sorted) of a `[rows, cols]`
/// matrix, accumulators starting at random positive values so that "an untouched row keeps
/// its accumulator" is visible.
pub fn check_sm3_sparse(dev: Device, rows: usize, cols: usize, nnz: usize, momentum: bool, steps: usize, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let total = rows * cols;
    let nnz = nnz.min(total);
    // A random subset of size nnz: partial Fisher-Yates over 0..total, then sorted.
    let mut all: Vec<u32> = (0..total as u32).collect();
    for k in 0..nnz {
        let pick = k + rng.below(total - k);
        all.swap(k, pick);
    }
    let mut indices = all[..nnz].to_vec();
    indices.sort_unstable();
    let d0 = rng.vec(nnz, -0.1, 0.1);
    let r0 = rng.vec(rows, 0.0, 0.5);
    let c0 = rng.vec(cols, 0.0, 0.5);
    let grads: Vec<Vec<f32>> = (0..steps).map(|_| rng.vec(nnz, -1.0, 1.0)).collect();
    let p = Sm3Params { lr: 0.05, eps: 1e-8, beta1: if momentum { 0.9 } else { 0.0 }, weight_decay: 0.1, grad_scale: 0.7 };

    let (mut d, mut r, mut c) = (to_f64(&d0), to_f64(&r0), to_f64(&c0));
    let mut mom = momentum.then(|| vec![0.0; nnz]);
    for g in &grads {
        reference::sm3_sparse(&indices, &mut d, &to_f64(g), &mut r, &mut c, mom.as_deref_mut(), cols, p);
    }
    let got = match dev {
        Device::Cpu => {
            let (mut d, mut r, mut c) = (d0.clone(), r0.clone(), c0.clone());
            let mut mom = momentum.then(|| vec![0.0; nnz]);
            let mut run = || -> crate::Result<()> {
                for g in &grads {
                    cpu::sm3_sparse(&indices, &mut d, g, &mut r, &mut c, mom.as_deref_mut(), rows, cols, p)?;
                }
                Ok(())
            };
            run().map(|()| Sm3State { w: d, master: None, r, c, mom })
        }
        Device::Wgpu(i) => wgpu_run::sm3_sparse(i, &indices, &d0, &r0, &c0, &grads, momentum, rows, cols, p),
        Device::Cuda(i) => cuda_run::sm3_sparse(i, &indices, &d0, &r0, &c0, &grads, momentum, rows, cols, p),
    }
    .map_err(|e| format!("sm3_sparse on {dev}: {e}"))?;
    let what = |name: &str| format!("sm3_sparse {name} on {dev} ([{rows}, {cols}], {nnz} active, momentum {momentum})");
    compare(&what("delta"), &got.w, &d, Tolerance::F32)?;
    compare(&what("r"), &got.r, &r, Tolerance::F32)?;
    compare(&what("c"), &got.c, &c, Tolerance::F32)?;
    if let (Some(g), Some(want)) = (&got.mom, &mom) {
        compare(&what("momentum"), g, want, Tolerance::F32)?;
    }
    Ok(())
}

/// One AdamW test case.
#[derive(Clone, Copy, Debug)]
pub struct AdamWCase {
    pub n: usize,
    pub weight_decay: f32,
    pub grad_scale: f32,
    pub device_clip: Option<f32>,
    pub steps: usize,
    pub dtype: DType,
    pub master: bool,
    pub seed: u64,
}

struct AdamWState {
    w: Vec<f32>,
    master: Option<Vec<f32>>,
    m: Vec<f32>,
    v: Vec<f32>,
}

fn adamw_params(case: &AdamWCase, step: u32) -> AdamWParams {
    AdamWParams { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: case.weight_decay, step, grad_scale: case.grad_scale }
}

/// AdamW over `case.steps` steps (t = 1, 2, ...) on `dev` against the f64 reference.
pub fn check_adamw(dev: Device, case: AdamWCase) -> Check {
    let n = case.n;
    let bf16 = case.dtype == DType::BF16;
    let mut rng = Rng::new(case.seed);
    let mut w0 = rng.vec(n, -1.0, 1.0);
    let mut grads: Vec<Vec<f32>> = (0..case.steps).map(|_| rng.vec(n, -1.0, 1.0)).collect();
    if bf16 {
        w0 = round_bf16(&w0);
        grads = grads.iter().map(|g| round_bf16(g)).collect();
    }
    let (mut w, mut m, mut v) = (to_f64(&w0), vec![0.0; n], vec![0.0; n]);
    for (t, g) in grads.iter().enumerate() {
        let mut p = adamw_params(&case, t as u32 + 1);
        if let Some(max_norm) = case.device_clip {
            p.grad_scale *= clip_scale(sum_sq_f64(g), max_norm);
        }
        reference::adamw(&mut w, &to_f64(g), &mut m, &mut v, p);
    }
    let got = match dev {
        Device::Cpu => {
            let (mut w, mut m, mut v) = (w0.clone(), vec![0.0; n], vec![0.0; n]);
            for (t, g) in grads.iter().enumerate() {
                let mut p = adamw_params(&case, t as u32 + 1);
                if let Some(max_norm) = case.device_clip {
                    p.grad_scale *= clip_scale(cpu::sum_squares(&[g]), max_norm);
                }
                cpu::adamw(&mut w, g, &mut m, &mut v, p).map_err(|e| e.to_string())?;
            }
            AdamWState { w, master: None, m, v }
        }
        Device::Wgpu(_) if bf16 => return Err(format!("adamw on {dev}: no WGSL kernel for bf16")),
        Device::Wgpu(i) => wgpu_run::adamw(i, &case, &w0, &grads).map_err(|e| format!("adamw on {dev}: {e}"))?,
        Device::Cuda(i) => cuda_run::adamw(i, &case, &w0, &grads).map_err(|e| format!("adamw on {dev}: {e}"))?,
    };
    let what = |name: &str| format!("adamw {name} on {dev} ({case:?})");
    compare(&what("w"), &got.w, &w, if bf16 { Tolerance::BF16 } else { Tolerance::F32 })?;
    if let Some(mm) = &got.master {
        compare(&what("master"), mm, &w, Tolerance::F32)?;
    }
    compare(&what("m"), &got.m, &m, Tolerance::F32)?;
    compare(&what("v"), &got.v, &v, Tolerance::F32)
}

/// `cuda::adamw_multi` (many tensors per launch) against `cuda::adamw` on each tensor alone,
/// which `check_adamw` checks against the f64 reference: the same bits of parameter, master,
/// m and v after `steps` steps with the clip factor from the device sum of squares of every
/// gradient. `sizes` past `MULTI_TENSORS` cross a launch; zeros and odd lengths test the block
/// map. `master` with f32 parameters: the multi step writes each new parameter into a fresh
/// buffer beside the master (how training gets its parameters without a copy), compared with
/// the in-place one-tensor step.
pub fn check_adamw_multi(dev: Device, sizes: &[usize], dtype: DType, master: bool, steps: usize, seed: u64) -> Check {
    match dev {
        Device::Cuda(i) => cuda_run::adamw_multi_vs_one(i, sizes, dtype, master, steps, seed).map_err(|e| format!("adamw_multi on {dev}: {e}")),
        _ => Err(format!("adamw_multi: a CUDA launcher, not for {dev}")),
    }
}

/// The sum of squares of several gradient buffers computed on `dev`, against the f64 sum, and
/// the clip factor from it against `clip_scale` of the f64 sum. CUDA sums in f64, WGSL in f32
/// partials; the tolerances are below. The buffers at odd positions hold f16 values, which
/// wgpu reads as f16 gradients (an f16 model's), the other devices as f32.
pub fn check_sum_squares(dev: Device, sizes: &[usize], max_norm: f32, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let grads: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let g = rng.vec(n, -2.0, 2.0);
            if k % 2 == 1 {
                g.into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect()
            } else {
                g
            }
        })
        .collect();
    let want: f64 = grads.iter().map(|g| sum_sq_f64(g)).sum();
    let got = match dev {
        Device::Cpu => Ok(cpu::sum_squares(&grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>())),
        Device::Wgpu(i) => wgpu_run::sum_squares(i, &grads),
        Device::Cuda(i) => cuda_run::sum_squares(i, &grads),
    }
    .map_err(|e| format!("sum_squares on {dev}: {e}"))?;
    // f64 sums (CPU, CUDA) in any order stay within n·2^-53 of each other (worst case; 1.9e-9
    // at 16M elements). WGSL's f32 partials: each invocation adds a few elements, then a tree
    // of depth ~8 + log2(groups), so a few dozen 2^-24 at the sizes tested here.
    let n_total: usize = sizes.iter().sum();
    let rtol = if matches!(dev, Device::Wgpu(_)) { 1e-5 } else { (n_total as f64 * f64::EPSILON / 2.0).max(1e-13) };
    if !(Tolerance { atol: 0.0, rtol }).ok(got, want) {
        return Err(format!("sum of squares on {dev} (sizes {sizes:?}): got {got}, want {want} (rtol {rtol})"));
    }
    let (s_got, s_want) = (clip_scale(got, max_norm), clip_scale(want, max_norm));
    if !(Tolerance { atol: 0.0, rtol: rtol.max(1e-6) }).ok(s_got as f64, s_want as f64) {
        return Err(format!("clip factor on {dev}: {s_got} from the device sum, {s_want} from the f64 sum"));
    }
    Ok(())
}

mod wgpu_run {
    use super::{AdamWCase, AdamWState, Sm3Case, Sm3State};
    use crate::device::wgpu::{runtime, PooledBuffer, Precision, WgpuRuntime};
    use crate::kernels::optim::{wgsl, AdamWParams, Sm3Params};
    use crate::Result;

    fn up(rt: &WgpuRuntime, v: &[f32]) -> PooledBuffer {
        rt.upload(bytemuck::cast_slice(v))
    }

    fn down(rt: &WgpuRuntime, b: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&rt.download(b, n * 4)?))
    }

    /// A device sum of squares of `g` (one f32 buffer) for the clip factor.
    fn sum_sq_of(rt: &WgpuRuntime, g: &wgpu::Buffer, n: usize) -> Result<PooledBuffer> {
        let out = rt.alloc(4);
        wgsl::sum_squares(&rt.device, &rt.queue, &rt.kernels, &[(g, n, Precision::F32)], out.buffer())?;
        Ok(out)
    }

    pub fn sm3(i: usize, case: &Sm3Case, w0: &[f32], grads: &[Vec<f32>], p: Sm3Params) -> Result<Sm3State> {
        let rt = runtime(i)?;
        let (rows, cols, n) = (case.rows, case.cols, case.rows * case.cols);
        let w = up(&rt, w0);
        let (mut r, mut c) = (rt.alloc_zeros(rows * 4), rt.alloc_zeros(cols * 4));
        let (mut r2, mut c2) = (rt.alloc(rows * 4), rt.alloc(cols * 4));
        let mom = case.momentum.then(|| rt.alloc_zeros(n * 4));
        for g in grads {
            let gb = up(&rt, g);
            let ss = case.device_clip.map(|_| sum_sq_of(&rt, gb.buffer(), n)).transpose()?;
            let clip = ss.as_ref().zip(case.device_clip).map(|(s, max_norm)| wgsl::DeviceClip { sum_sq: s.buffer(), max_norm });
            wgsl::sm3(
                &rt.device,
                &rt.queue,
                &rt.kernels,
                w.buffer(),
                gb.buffer(),
                r.buffer(),
                c.buffer(),
                r2.buffer(),
                c2.buffer(),
                mom.as_ref().map(|m| m.buffer()),
                rows,
                cols,
                p,
                clip.as_ref(),
            )?;
            std::mem::swap(&mut r, &mut r2);
            std::mem::swap(&mut c, &mut c2);
        }
        Ok(Sm3State {
            w: down(&rt, w.buffer(), n)?,
            master: None,
            r: down(&rt, r.buffer(), rows)?,
            c: down(&rt, c.buffer(), cols)?,
            mom: mom.map(|m| down(&rt, m.buffer(), n)).transpose()?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sm3_sparse(
        i: usize,
        indices: &[u32],
        d0: &[f32],
        r0: &[f32],
        c0: &[f32],
        grads: &[Vec<f32>],
        momentum: bool,
        rows: usize,
        cols: usize,
        p: Sm3Params,
    ) -> Result<Sm3State> {
        let rt = runtime(i)?;
        let nnz = indices.len();
        let idx = rt.upload(bytemuck::cast_slice(indices));
        let (d, r, c) = (up(&rt, d0), up(&rt, r0), up(&rt, c0));
        let mom = momentum.then(|| rt.alloc_zeros(nnz * 4));
        for g in grads {
            let gb = up(&rt, g);
            let m = mom.as_ref().map(|m| m.buffer());
            wgsl::sm3_sparse(&rt.device, &rt.queue, &rt.kernels, idx.buffer(), nnz, d.buffer(), gb.buffer(), r.buffer(), c.buffer(), m, rows, cols, p, None)?;
        }
        Ok(Sm3State {
            w: down(&rt, d.buffer(), nnz)?,
            master: None,
            r: down(&rt, r.buffer(), rows)?,
            c: down(&rt, c.buffer(), cols)?,
            mom: mom.map(|m| down(&rt, m.buffer(), nnz)).transpose()?,
        })
    }

    pub fn adamw(i: usize, case: &AdamWCase, w0: &[f32], grads: &[Vec<f32>]) -> Result<AdamWState> {
        let rt = runtime(i)?;
        let n = case.n;
        let w = up(&rt, w0);
        let (m, v) = (rt.alloc_zeros(n * 4), rt.alloc_zeros(n * 4));
        for (t, g) in grads.iter().enumerate() {
            let gb = up(&rt, g);
            let ss = case.device_clip.map(|_| sum_sq_of(&rt, gb.buffer(), n)).transpose()?;
            let clip = ss.as_ref().zip(case.device_clip).map(|(s, max_norm)| wgsl::DeviceClip { sum_sq: s.buffer(), max_norm });
            let p: AdamWParams = super::adamw_params(case, t as u32 + 1);
            wgsl::adamw(&rt.device, &rt.queue, &rt.kernels, w.buffer(), gb.buffer(), m.buffer(), v.buffer(), n, p, clip.as_ref())?;
        }
        Ok(AdamWState { w: down(&rt, w.buffer(), n)?, master: None, m: down(&rt, m.buffer(), n)?, v: down(&rt, v.buffer(), n)? })
    }

    /// The buffers at odd positions go up as f16 (their values are f16's).
    pub fn sum_squares(i: usize, grads: &[Vec<f32>]) -> Result<f64> {
        let rt = runtime(i)?;
        let half = |k: usize| if k % 2 == 1 { Precision::F16 } else { Precision::F32 };
        let bufs: Vec<PooledBuffer> = grads
            .iter()
            .enumerate()
            .map(|(k, g)| match half(k) {
                Precision::F16 => rt.upload(bytemuck::cast_slice(&g.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>())),
                Precision::F32 => up(&rt, g),
            })
            .collect();
        let list: Vec<(&wgpu::Buffer, usize, Precision)> = bufs.iter().zip(grads).enumerate().map(|(k, (b, g))| (b.buffer(), g.len(), half(k))).collect();
        let out = rt.alloc(4);
        wgsl::sum_squares(&rt.device, &rt.queue, &rt.kernels, &list, out.buffer())?;
        Ok(down(&rt, out.buffer(), 1)?[0] as f64)
    }
}

mod cuda_run {
    use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
    use std::sync::Arc;

    use super::{AdamWCase, AdamWState, Sm3Case, Sm3State};
    use crate::device::cuda::runtime;
    use crate::kernels::optim::{cuda, AdamWParams, Sm3Params};
    use crate::{DType, Error, Result};

    fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
        move |e| Error::Cuda { context: what.to_string(), message: format!("{e:?}") }
    }

    fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
        s.clone_htod(v).map_err(err("copy to device"))
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
        s.alloc_zeros::<T>(n.max(1)).map_err(err("alloc"))
    }

    fn down<T: DeviceRepr + Default + Clone>(s: &Arc<CudaStream>, d: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v = s.clone_dtoh(d).map_err(err("copy to host"))?;
        v.truncate(n);
        Ok(v)
    }

    /// Parameter storage of a test: f32, or bf16 bits.
    trait Storage: DeviceRepr + ValidAsZeroBits + Default + Clone + Copy + Unpin {
        fn from_f32(v: f32) -> Self;
        fn to_f32(self) -> f32;
    }
    impl Storage for f32 {
        fn from_f32(v: f32) -> Self {
            v
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    impl Storage for u16 {
        fn from_f32(v: f32) -> Self {
            half::bf16::from_f32(v).to_bits()
        }
        fn to_f32(self) -> f32 {
            half::bf16::from_bits(self).to_f32()
        }
    }

    fn store<T: Storage>(v: &[f32]) -> Vec<T> {
        v.iter().map(|&x| T::from_f32(x)).collect()
    }

    pub fn sm3(i: usize, case: &Sm3Case, w0: &[f32], grads: &[Vec<f32>], p: Sm3Params) -> Result<Sm3State> {
        match case.dtype {
            DType::F32 => sm3_t::<f32>(i, case, w0, grads, p),
            DType::BF16 => sm3_t::<u16>(i, case, w0, grads, p),
            d => Err(Error::InvalidArgument(format!("no CUDA SM3 kernel for {d}"))),
        }
    }

    fn sm3_t<T: Storage>(i: usize, case: &Sm3Case, w0: &[f32], grads: &[Vec<f32>], p: Sm3Params) -> Result<Sm3State> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        let (rows, cols, n) = (case.rows, case.cols, case.rows * case.cols);
        let mut w = up(s, &store::<T>(w0))?;
        let mut master = if case.master { Some(up(s, w0)?) } else { None };
        let (mut r, mut c) = (zeros::<f32>(s, rows)?, zeros::<f32>(s, cols)?);
        let (mut r2, mut c2) = (zeros::<f32>(s, rows)?, zeros::<f32>(s, cols)?);
        let mut mom = if case.momentum { Some(zeros::<f32>(s, n)?) } else { None };
        let mut ss = zeros::<f64>(s, 1)?;
        for g in grads {
            let gd = up(s, &store::<T>(g))?;
            if case.device_clip.is_some() {
                cuda::sum_squares(s, &rt.modules, &[gd.slice(..n)], &mut ss.slice_mut(..))?;
            }
            let clip = case.device_clip.map(|max_norm| cuda::DeviceClip { sum_sq: ss.slice(..), max_norm });
            let mut mom_v = mom.as_mut().map(|m| m.slice_mut(..n));
            let mut master_v = master.as_mut().map(|m| m.slice_mut(..n));
            cuda::sm3::<T>(
                s,
                &rt.modules,
                &mut w.slice_mut(..n),
                &gd.slice(..n),
                master_v.as_mut(),
                &r.slice(..rows),
                &c.slice(..cols),
                &mut r2.slice_mut(..rows),
                &mut c2.slice_mut(..cols),
                mom_v.as_mut(),
                rows,
                cols,
                p,
                clip.as_ref(),
            )?;
            std::mem::swap(&mut r, &mut r2);
            std::mem::swap(&mut c, &mut c2);
        }
        Ok(Sm3State {
            w: down(s, &w, n)?.into_iter().map(T::to_f32).collect(),
            master: master.map(|m| down(s, &m, n)).transpose()?,
            r: down(s, &r, rows)?,
            c: down(s, &c, cols)?,
            mom: mom.map(|m| down(s, &m, n)).transpose()?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sm3_sparse(
        i: usize,
        indices: &[u32],
        d0: &[f32],
        r0: &[f32],
        c0: &[f32],
        grads: &[Vec<f32>],
        momentum: bool,
        rows: usize,
        cols: usize,
        p: Sm3Params,
    ) -> Result<Sm3State> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        let nnz = indices.len();
        let idx = up(s, indices)?;
        let (mut d, mut r, mut c) = (up(s, d0)?, up(s, r0)?, up(s, c0)?);
        let mut mom = if momentum { Some(zeros::<f32>(s, nnz)?) } else { None };
        for g in grads {
            let gd = up(s, g)?;
            let mut mom_v = mom.as_mut().map(|m| m.slice_mut(..nnz));
            cuda::sm3_sparse(
                s,
                &rt.modules,
                &idx.slice(..),
                &mut d.slice_mut(..),
                &gd.slice(..),
                &mut r.slice_mut(..),
                &mut c.slice_mut(..),
                mom_v.as_mut(),
                rows,
                cols,
                p,
                None,
            )?;
        }
        Ok(Sm3State {
            w: down(s, &d, nnz)?,
            master: None,
            r: down(s, &r, rows)?,
            c: down(s, &c, cols)?,
            mom: mom.map(|m| down(s, &m, nnz)).transpose()?,
        })
    }

    pub fn adamw(i: usize, case: &AdamWCase, w0: &[f32], grads: &[Vec<f32>]) -> Result<AdamWState> {
        match case.dtype {
            DType::F32 => adamw_t::<f32>(i, case, w0, grads),
            DType::BF16 => adamw_t::<u16>(i, case, w0, grads),
            d => Err(Error::InvalidArgument(format!("no CUDA AdamW kernel for {d}"))),
        }
    }

    fn adamw_t<T: Storage>(i: usize, case: &AdamWCase, w0: &[f32], grads: &[Vec<f32>]) -> Result<AdamWState> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        let n = case.n;
        let mut w = up(s, &store::<T>(w0))?;
        let mut master = if case.master { Some(up(s, w0)?) } else { None };
        let (mut m, mut v) = (zeros::<f32>(s, n)?, zeros::<f32>(s, n)?);
        let mut ss = zeros::<f64>(s, 1)?;
        for (t, g) in grads.iter().enumerate() {
            let gd = up(s, &store::<T>(g))?;
            if case.device_clip.is_some() {
                cuda::sum_squares(s, &rt.modules, &[gd.slice(..n)], &mut ss.slice_mut(..))?;
            }
            let clip = case.device_clip.map(|max_norm| cuda::DeviceClip { sum_sq: ss.slice(..), max_norm });
            let mut master_v = master.as_mut().map(|mm| mm.slice_mut(..n));
            let p = super::adamw_params(case, t as u32 + 1);
            cuda::adamw::<T>(s, &rt.modules, &mut w.slice_mut(..n), &gd.slice(..n), master_v.as_mut(), &mut m.slice_mut(..n), &mut v.slice_mut(..n), p, clip.as_ref())?;
        }
        Ok(AdamWState {
            w: down(s, &w, n)?.into_iter().map(T::to_f32).collect(),
            master: master.map(|mm| down(s, &mm, n)).transpose()?,
            m: down(s, &m, n)?,
            v: down(s, &v, n)?,
        })
    }

    pub fn adamw_multi_vs_one(i: usize, sizes: &[usize], dtype: DType, master: bool, steps: usize, seed: u64) -> std::result::Result<(), String> {
        match dtype {
            DType::F32 => multi_vs_one::<f32>(i, sizes, master, steps, seed),
            DType::BF16 => multi_vs_one::<u16>(i, sizes, master, steps, seed),
            d => Err(format!("no CUDA AdamW kernel for {d}")),
        }
    }

    /// Each tensor's buffers on the device: parameter, master, m, v.
    struct Set<T> {
        w: Vec<CudaSlice<T>>,
        master: Vec<CudaSlice<f32>>,
        m: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
    }

    fn multi_vs_one<T: Storage + PartialEq + std::fmt::Debug>(i: usize, sizes: &[usize], master: bool, steps: usize, seed: u64) -> std::result::Result<(), String> {
        let rt = runtime(i).map_err(|e| e.to_string())?;
        let (s, md) = (&rt.stream, &rt.modules);
        let f32_params = std::mem::size_of::<T>() == 4;
        let mut rng = crate::testing::Rng::new(seed);
        let w0: Vec<Vec<f32>> = sizes.iter().map(|&n| store::<T>(&rng.vec(n, -1.0, 1.0)).into_iter().map(T::to_f32).collect()).collect();
        let set = || -> Result<Set<T>> {
            Ok(Set {
                w: w0.iter().map(|w| up(s, &store::<T>(w))).collect::<Result<_>>()?,
                master: w0.iter().map(|w| up(s, w)).collect::<Result<_>>()?,
                m: sizes.iter().map(|&n| zeros::<f32>(s, n)).collect::<Result<_>>()?,
                v: sizes.iter().map(|&n| zeros::<f32>(s, n)).collect::<Result<_>>()?,
            })
        };
        let (mut one, mut multi) = (set().map_err(|e| e.to_string())?, set().map_err(|e| e.to_string())?);
        let mut ss = zeros::<f64>(s, 1).map_err(|e| e.to_string())?;
        for t in 0..steps {
            let grads: Vec<CudaSlice<T>> = sizes.iter().map(|&n| up(s, &store::<T>(&rng.vec(n, -1.0, 1.0)))).collect::<Result<_>>().map_err(|e| e.to_string())?;
            let gv: Vec<_> = grads.iter().zip(sizes).map(|(g, &n)| g.slice(..n)).collect();
            cuda::sum_squares(s, md, &gv, &mut ss.slice_mut(..)).map_err(|e| e.to_string())?;
            let clip = cuda::DeviceClip { sum_sq: ss.slice(..), max_norm: 1.0 };
            let p = AdamWParams { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: t as u32 + 1, grad_scale: 0.5 };
            for (k, &n) in sizes.iter().enumerate() {
                // The one-tensor step: f32 in place (its master unused), bf16 with or without it.
                let mut mv = (master && !f32_params).then(|| one.master[k].slice_mut(..n));
                cuda::adamw::<T>(s, md, &mut one.w[k].slice_mut(..n), &gv[k], mv.as_mut(), &mut one.m[k].slice_mut(..n), &mut one.v[k].slice_mut(..n), p, Some(&clip)).map_err(|e| e.to_string())?;
            }
            let mut tensors: Vec<cuda::AdamWTensor<'_, T>> = Vec::new();
            let Set { w, master: ms, m, v } = &mut multi;
            for ((((w, mm), m), v), (g, &n)) in w.iter_mut().zip(ms.iter_mut()).zip(m.iter_mut()).zip(v.iter_mut()).zip(gv.iter().zip(sizes)) {
                tensors.push(cuda::AdamWTensor { w: w.slice_mut(..n), g: g.slice(..n), master: master.then(|| mm.slice_mut(..n)), m: m.slice_mut(..n), v: v.slice_mut(..n) });
            }
            cuda::adamw_multi::<T>(s, md, &mut tensors, p, Some(&clip)).map_err(|e| e.to_string())?;
        }
        for (k, &n) in sizes.iter().enumerate() {
            let bits = |what: &str, a: Vec<f32>, b: Vec<f32>| -> std::result::Result<(), String> {
                match a.iter().zip(&b).position(|(x, y)| x.to_bits() != y.to_bits()) {
                    Some(e) => Err(format!("tensor {k} of {sizes:?} ({}{}): {what}[{e}] = {} from the multi step, {} from the one-tensor step", if f32_params { "f32" } else { "bf16" }, if master { " + master" } else { "" }, a[e], b[e])),
                    None => Ok(()),
                }
            };
            let d = |x: &CudaSlice<f32>| down(s, x, n).map_err(|e| e.to_string());
            let dw = |x: &CudaSlice<T>| down(s, x, n).map(|v| v.into_iter().map(T::to_f32).collect::<Vec<f32>>()).map_err(|e| e.to_string());
            bits("w", dw(&multi.w[k])?, dw(&one.w[k])?)?;
            bits("m", d(&multi.m[k])?, d(&one.m[k])?)?;
            bits("v", d(&multi.v[k])?, d(&one.v[k])?)?;
            if master {
                // f32: the one-tensor step kept its value in w.
                bits("master", d(&multi.master[k])?, if f32_params { dw(&one.w[k])? } else { d(&one.master[k])? })?;
            }
        }
        Ok(())
    }

    pub fn sum_squares(i: usize, grads: &[Vec<f32>]) -> Result<f64> {
        let rt = runtime(i)?;
        let s = &rt.stream;
        let bufs: Vec<CudaSlice<f32>> = grads.iter().map(|g| up(s, g)).collect::<Result<_>>()?;
        let views: Vec<_> = bufs.iter().zip(grads).map(|(b, g)| b.slice(..g.len())).collect();
        let mut out = zeros::<f64>(s, 1)?;
        cuda::sum_squares(s, &rt.modules, &views, &mut out.slice_mut(..))?;
        Ok(down(s, &out, 1)?[0])
    }
}
