// Sparse SM3 step, f32, over N active entries of an [R, C] matrix given as strictly
// increasing flat indices i*C + j, with their values (deltas), gradients and momenta [N]. The
// update is dense SM3's (see optim_sm3.wgsl); a row (column) touched by some active entry gets
// the maximum of v over those entries, any other keeps its accumulator.
//
// Two passes. sm3_sparse: one invocation per entry (index wid.y * num_workgroups.x * 256 +
// gid.x), atomicMax of bits(v) + 1 into `acc_tmp` ([R] rows, then [C] columns, zeroed by the
// launcher); the + 1 makes 0 mean "untouched" (v >= 0, and bits(v) <= bits(inf) never
// overflows). sm3_sparse_finish: one invocation per max(R, C), writes the touched slots into
// r and c. The passes are separate dispatches, so every old value is read before any is
// replaced.

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    // bit 0: momentum on; bit 1: device sum of squares bound.
    flags: u32,
    lr: f32,
    eps: f32,
    beta1: f32,
    decay: f32,
    scale: f32,
    max_norm: f32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> indices: array<u32>;
@group(0) @binding(2) var<storage, read_write> delta: array<f32>;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> r: array<f32>;
@group(0) @binding(5) var<storage, read_write> c: array<f32>;
@group(0) @binding(6) var<storage, read_write> mom: array<f32>;
@group(0) @binding(7) var<storage, read> sumsq: array<f32>;
@group(0) @binding(8) var<storage, read_write> acc_tmp: array<atomic<u32>>;

#include "grad_scale.wgsli"

@compute @workgroup_size(256)
fn sm3_sparse(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.y * nwg.x * WG + gid.x;
    if (e >= p.n) {
        return;
    }
    let flat = indices[e];
    let i = flat / p.cols;
    let j = flat % p.cols;
    if (i >= p.rows) {
        return;  // outside the matrix: skipped rather than written out of bounds
    }
    let g = grad[e] * grad_scale();
    let v = min(r[i], c[j]) + g * g;
    var u = g / (sqrt(v) + p.eps);
    if ((p.flags & 1u) != 0u) {
        u = p.beta1 * mom[e] + (1.0 - p.beta1) * u;
        mom[e] = u;
    }
    delta[e] = delta[e] * p.decay - p.lr * u;
    atomicMax(&acc_tmp[i], bitcast<u32>(v) + 1u);
    atomicMax(&acc_tmp[p.rows + j], bitcast<u32>(v) + 1u);
}

@compute @workgroup_size(256)
fn sm3_sparse_finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.y * nwg.x * WG + gid.x;
    if (t < p.rows) {
        let bits = atomicLoad(&acc_tmp[t]);
        if (bits != 0u) {
            r[t] = bitcast<f32>(bits - 1u);
        }
    }
    if (t < p.cols) {
        let bits = atomicLoad(&acc_tmp[p.rows + t]);
        if (bits != 0u) {
            c[t] = bitcast<f32>(bits - 1u);
        }
    }
}
