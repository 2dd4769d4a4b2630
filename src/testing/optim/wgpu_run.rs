//! The optimizer checks' runs on wgpu, through the WGSL launchers.

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
