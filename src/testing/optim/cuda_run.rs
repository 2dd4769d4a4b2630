//! The optimizer checks' runs on CUDA, through the CUDA launchers (and `adamw_multi`
//! against the one-tensor kernel).

use cudarc::driver::CudaSlice;

use super::{AdamWCase, AdamWState, Sm3Case, Sm3State};
use crate::device::cuda::runtime;
use crate::kernels::optim::{cuda, AdamWParams, Sm3Params};
use crate::testing::cuda_mem::{down, up, zeros, Storage};
use crate::{DType, Error, Result};

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
    /// The bf16 copies of f32 parameters (asked for every other tensor).
    half: Vec<CudaSlice<u16>>,
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
            half: sizes.iter().map(|&n| zeros::<u16>(s, n)).collect::<Result<_>>()?,
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
        let Set { w, master: ms, m, v, half } = &mut multi;
        for (k, ((((w, mm), m), v), h)) in w.iter_mut().zip(ms.iter_mut()).zip(m.iter_mut()).zip(v.iter_mut()).zip(half.iter_mut()).enumerate() {
            let (g, n) = (&gv[k], sizes[k]);
            let half = (f32_params && k % 2 == 1).then(|| h.slice_mut(..n));
            tensors.push(cuda::AdamWTensor { w: w.slice_mut(..n), g: g.slice(..n), master: master.then(|| mm.slice_mut(..n)), m: m.slice_mut(..n), v: v.slice_mut(..n), half });
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
        if f32_params && k % 2 == 1 {
            // The bf16 copy: the half crate's rounding (which `cast` matches) of the new value.
            let h: Vec<f32> = down(s, &multi.half[k], n).map_err(|e| e.to_string())?.into_iter().map(|b| f32::from(half::bf16::from_bits(b))).collect();
            let want: Vec<f32> = dw(&one.w[k])?.into_iter().map(|x| f32::from(half::bf16::from_f32(x))).collect();
            bits("bf16 copy", h, want)?;
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
