//! The CPU's elementwise ops (split from `elementwise.rs`): broadcasts, maps, row
//! sums, SiLU, and the gated linear unit forward and backward (rows in the CPU's widest vectors, `math::wide!`).

use rayon::prelude::*;

use super::{GluAct, GluParams};
use crate::device::cpu::rows_per_task;
use crate::Result;

const CHUNK: usize = 1 << 14;

/// `f(a[i], b[i % b.len()])` for every i; `a.len()` must be a multiple of `b.len()`.
pub fn broadcast_new(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    if b.len() == a.len() {
        return a.par_iter().with_min_len(CHUNK).zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect();
    }
    let mut out = vec![0.0f32; a.len()];
    if !out.is_empty() {
        broadcast(a, b, &mut out, f);
    }
    out
}

/// `f(a[i])` for every i, into a new vector.
pub fn map_new(a: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    a.par_iter().with_min_len(CHUNK).map(|&x| f(x)).collect()
}

/// `out[i] = f(a[i], b[i % b.len()])`; `a.len()` must be a multiple of `b.len()`.
pub fn broadcast(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let nb = b.len();
    if nb == a.len() {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = f(*a, *b);
            }
        });
    } else {
        let rows = (CHUNK / nb.max(1)).max(1) * nb;
        out.par_chunks_mut(rows).zip(a.par_chunks(rows)).for_each(|(o, a)| {
            for (o, a) in o.chunks_mut(nb).zip(a.chunks(nb)) {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = f(*a, *b);
                }
            }
        });
    }
}

/// Sums `a` (a multiple of `n` long) over its rows of length n: the backward of a broadcast.
pub fn sum_rows_into(a: &[f32], n: usize) -> Vec<f32> {
    let rows = (CHUNK / n.max(1)).max(1) * n;
    a.par_chunks(rows)
        .map(|block| {
            let mut acc = vec![0.0f32; n];
            for row in block.chunks(n) {
                for (s, v) in acc.iter_mut().zip(row) {
                    *s += v;
                }
            }
            acc
        })
        .reduce(
            || vec![0.0f32; n],
            |mut x, y| {
                for (a, b) in x.iter_mut().zip(y) {
                    *a += b;
                }
                x
            },
        )
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + crate::kernels::math::exp(-x))
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// d silu(x) / dx.
pub fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

crate::kernels::math::wide! {
    /// One row of the SwiGLU forward, in the CPU's widest vectors.
    fn swiglu_row(g: &[f32], u: &[f32], y: &mut [f32]) = swiglu_row_lanes
}

crate::kernels::math::wide! {
    /// One row of the SwiGLU backward, in the CPU's widest vectors.
    fn swiglu_bwd_row(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) = swiglu_bwd_row_lanes
}

crate::kernels::math::wide! {
    /// One row of the GeGLU (tanh GELU) forward, in the CPU's widest vectors.
    fn geglu_row(g: &[f32], u: &[f32], y: &mut [f32]) = geglu_row_lanes
}

crate::kernels::math::wide! {
    /// One row of the GeGLU (tanh GELU) backward, in the CPU's widest vectors.
    fn geglu_bwd_row(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) = geglu_bwd_row_lanes
}

/// One row of a gated linear unit's forward with the activation `act` (straight-line once
/// `act` is a constant, so it vectorises).
#[inline(always)]
fn glu_row_lanes(act: GluAct, g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g * sigmoid(act.arg(g).0) * u;
    }
}

/// One row of a gated linear unit's backward.
#[inline(always)]
fn glu_bwd_row_lanes(act: GluAct, g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let (a, da) = act.arg(g);
        let s = sigmoid(a);
        *dg = dy * u * s * (1.0 + g * (1.0 - s) * da);
        *du = dy * g * s;
    }
}

#[inline(always)]
fn swiglu_row_lanes(g: &[f32], u: &[f32], y: &mut [f32]) {
    glu_row_lanes(GluAct::Silu, g, u, y)
}

#[inline(always)]
fn swiglu_bwd_row_lanes(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    glu_bwd_row_lanes(GluAct::Silu, g, u, dy, dg, du)
}

#[inline(always)]
fn geglu_row_lanes(g: &[f32], u: &[f32], y: &mut [f32]) {
    glu_row_lanes(GluAct::GeluTanh, g, u, y)
}

#[inline(always)]
fn geglu_bwd_row_lanes(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    glu_bwd_row_lanes(GluAct::GeluTanh, g, u, dy, dg, du)
}

/// One row of the forward with `act`, the widest vectors for each.
fn glu_row(act: GluAct, g: &[f32], u: &[f32], y: &mut [f32]) {
    match act {
        GluAct::Silu => swiglu_row(g, u, y),
        GluAct::GeluTanh => geglu_row(g, u, y),
    }
}

/// One row of the backward with `act`.
fn glu_bwd_row(act: GluAct, g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    match act {
        GluAct::Silu => swiglu_bwd_row(g, u, dy, dg, du),
        GluAct::GeluTanh => geglu_bwd_row(g, u, dy, dg, du),
    }
}

/// `y = act(g) * u` with g, u, y separate `[M, F]` slices.
pub fn glu(g: &[f32], u: &[f32], y: &mut [f32], p: GluParams) -> Result<()> {
    p.check_separate("glu_fwd", &[("g", g.len()), ("u", u.len()), ("y", y.len())])?;
    let (n, f) = (p.rows * p.cols, p.cols.max(1));
    let chunk = rows_per_task(f) * f;
    y[..n].par_chunks_mut(chunk).zip(g[..n].par_chunks(chunk)).zip(u[..n].par_chunks(chunk)).for_each(|((y, g), u)| {
        glu_row(p.act, g, u, y);
    });
    Ok(())
}

/// `y = act(g) * u` with g and u the halves of each row of `gu` `[M, 2F]`; y `[M, F]`.
pub fn glu_packed(gu: &[f32], y: &mut [f32], p: GluParams) -> Result<()> {
    p.check_packed("glu_fwd_packed", &[("gu", gu.len())], &[("y", y.len())])?;
    let f = p.cols;
    if f == 0 {
        return Ok(());
    }
    let rows = rows_per_task(f);
    y[..p.rows * f].par_chunks_mut(rows * f).zip(gu[..2 * p.rows * f].par_chunks(rows * 2 * f)).for_each(|(y, gu)| {
        for (y, gu) in y.chunks_mut(f).zip(gu.chunks(2 * f)) {
            let (g, u) = gu.split_at(f);
            glu_row(p.act, g, u, y);
        }
    });
    Ok(())
}

/// dg and du (separate `[M, F]` slices) from g, u and dy.
pub fn glu_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32], p: GluParams) -> Result<()> {
    let bufs = [("g", g.len()), ("u", u.len()), ("dy", dy.len()), ("dg", dg.len()), ("du", du.len())];
    p.check_separate("glu_bwd", &bufs)?;
    let (n, f) = (p.rows * p.cols, p.cols.max(1));
    let chunk = rows_per_task(f) * f;
    dg[..n]
        .par_chunks_mut(chunk)
        .zip(du[..n].par_chunks_mut(chunk))
        .zip(g[..n].par_chunks(chunk))
        .zip(u[..n].par_chunks(chunk))
        .zip(dy[..n].par_chunks(chunk))
        .for_each(|((((dg, du), g), u), dy)| glu_bwd_row(p.act, g, u, dy, dg, du));
    Ok(())
}

/// The packed backward: g and u from `gu` `[M, 2F]`, dg and du into `dgu` `[M, 2F]` the
/// same way; dy `[M, F]`.
pub fn glu_backward_packed(gu: &[f32], dy: &[f32], dgu: &mut [f32], p: GluParams) -> Result<()> {
    p.check_packed("glu_bwd_packed", &[("gu", gu.len()), ("dgu", dgu.len())], &[("dy", dy.len())])?;
    let f = p.cols;
    if f == 0 {
        return Ok(());
    }
    let rows = rows_per_task(f);
    let n2 = 2 * p.rows * f;
    dgu[..n2]
        .par_chunks_mut(rows * 2 * f)
        .zip(gu[..n2].par_chunks(rows * 2 * f))
        .zip(dy[..p.rows * f].par_chunks(rows * f))
        .for_each(|((dgu, gu), dy)| {
            for ((dgu, gu), dy) in dgu.chunks_mut(2 * f).zip(gu.chunks(2 * f)).zip(dy.chunks(f)) {
                let (g, u) = gu.split_at(f);
                let (dg, du) = dgu.split_at_mut(f);
                glu_bwd_row(p.act, g, u, dy, dg, du);
            }
        });
    Ok(())
}

#[cfg(test)]
#[test]
fn the_wide_glu_rows_are_the_baseline_ones() {
    // On AVX-512 or AVX2 (where this CPU has them) against the baseline loops, bit for bit,
    // over a remainder past every lane width and gates across the sigmoid's range.
    let n = 1037;
    let v = |a: f32, b: f32, m: usize| (0..n).map(|i| a + b * ((i * m) % n) as f32 / n as f32).collect::<Vec<f32>>();
    let (g, u, dy) = (v(-40.0, 80.0, 7919), v(1.5, -3.0, 104_729), v(0.25, -1.0, 31));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for act in [GluAct::Silu, GluAct::GeluTanh] {
        let mut o: [Vec<f32>; 6] = std::array::from_fn(|_| vec![0.0; n]);
        let [y, yb, dg, du, dgb, dub] = &mut o;
        glu_row(act, &g, &u, y);
        glu_row_lanes(act, &g, &u, yb);
        glu_bwd_row(act, &g, &u, &dy, dg, du);
        glu_bwd_row_lanes(act, &g, &u, &dy, dgb, dub);
        assert_eq!((bits(y), bits(dg), bits(du)), (bits(yb), bits(dgb), bits(dub)), "{act:?}");
    }
}
