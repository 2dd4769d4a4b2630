// Dense SM3 step, f32, on an [R, C] row-major matrix (a vector is [L, 1]). With
// g = s * grad (s below):
//
//   v = min(r_old[i], c_old[j]) + g^2,  u = g / (sqrt(v) + eps)
//   u <- m <- b1*m + (1-b1)*u          (when momentum is on)
//   w <- w*decay - lr*u                 (decay = 1 - lr*wd, computed on the host)
//   r_new[i] = max_j v,  c_new[j] = max_i v
//
// r_new and c_new hold f32 bit patterns and are zeroed by the launcher: v >= 0, and the order
// of non-negative floats is the order of their bits as u32, so the maxima are atomicMax on u32.
// The old accumulators are only read (double buffering; the caller swaps).
//
// Clip factor: s = scale, times max_norm / (norm + 1e-6) when the device sum of squares is
// bound (flags bit 1), norm = sqrt(sumsq[0]) and norm > max_norm > 0 (`grad_scale.wgsli`).
//
// Launch: workgroups of 16x16 own a 16x16 tile; the tile index is wid.y * num_workgroups.x +
// wid.x (a 2-D grid past 65535 tiles), tiles numbered row-major over ceil(C/16) tile columns.
// Each tile reduces its maxima in workgroup memory and issues one atomic per row and column.
// No subgroup operations.

struct Params {
    rows: u32,
    cols: u32,
    tiles_c: u32,
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

const T: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read> r_old: array<f32>;
@group(0) @binding(4) var<storage, read> c_old: array<f32>;
@group(0) @binding(5) var<storage, read_write> r_new: array<atomic<u32>>;
@group(0) @binding(6) var<storage, read_write> c_new: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> mom: array<f32>;
@group(0) @binding(8) var<storage, read> sumsq: array<f32>;

var<workgroup> vals: array<array<f32, 16>, 16>;

#include "grad_scale.wgsli"

@compute @workgroup_size(16, 16)
fn sm3_dense(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let tile = wid.y * nwg.x + wid.x;
    let tiles_r = (p.rows + T - 1u) / T;
    // Uniform across the workgroup, so the barrier below stays in uniform control flow.
    if (tile >= tiles_r * p.tiles_c) {
        return;
    }
    let i0 = (tile / p.tiles_c) * T;
    let j0 = (tile % p.tiles_c) * T;
    let i = i0 + lid.y;
    let j = j0 + lid.x;
    var v = 0.0;
    if (i < p.rows && j < p.cols) {
        let e = i * p.cols + j;
        let g = grad[e] * grad_scale();
        v = min(r_old[i], c_old[j]) + g * g;
        var u = g / (sqrt(v) + p.eps);
        if ((p.flags & 1u) != 0u) {
            u = p.beta1 * mom[e] + (1.0 - p.beta1) * u;
            mom[e] = u;
        }
        w[e] = w[e] * p.decay - p.lr * u;
    }
    vals[lid.y][lid.x] = v;
    workgroupBarrier();
    // Row y of the tile is reduced by invocation (x = y, row 0); column x by (x, row 1).
    if (lid.y == 0u && i0 + lid.x < p.rows) {
        var m = 0.0;
        for (var k = 0u; k < T; k = k + 1u) {
            m = max(m, vals[lid.x][k]);
        }
        if (m > 0.0) {
            atomicMax(&r_new[i0 + lid.x], bitcast<u32>(m));
        }
    }
    if (lid.y == 1u && j < p.cols) {
        var m = 0.0;
        for (var k = 0u; k < T; k = k + 1u) {
            m = max(m, vals[k][lid.x]);
        }
        if (m > 0.0) {
            atomicMax(&c_new[j], bitcast<u32>(m));
        }
    }
}
