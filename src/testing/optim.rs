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

mod cuda_run;
mod wgpu_run;
