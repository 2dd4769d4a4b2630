// RMSNorm, forward and backward, f32.
//
//   forward:  r_m = 1 / sqrt(mean_n(x[m,n]^2) + eps),   y[m,n] = w[n] * x[m,n] * r_m
//   backward: c_m = (1/N) * sum_n dy[m,n] * w[n] * x[m,n]
//             dx[m,n] = r_m * (dy[m,n] * w[n] - x[m,n] * r_m^2 * c_m)
//             dw[n]   = sum_m dy[m,n] * x[m,n] * r_m
//
// Shapes: x, y, dy, dx [M, N] row-major; w, dw [N]; rstd [M].
// Launch: rmsnorm_fwd and rmsnorm_bwd_dx take one workgroup of 256 per row; the row index is
// wid.y * num_workgroups.x + wid.x (a 2-D grid when M > 65535). rmsnorm_bwd_dw takes one
// invocation per column, 256 per workgroup, summing its column over the rows in order.
// No subgroup operations: the reduction is a tree in workgroup memory.

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad: u32,
}

const WG: u32 = 256u;

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;        // fwd: x    | bwd_dx: x    | bwd_dw: x
@group(0) @binding(2) var<storage, read> b: array<T>;        // fwd: w    | bwd_dx: w    | bwd_dw: dy
@group(0) @binding(3) var<storage, read_write> c: array<T>;  // fwd: y    | bwd_dx: dy   | bwd_dw: dw
@group(0) @binding(4) var<storage, read_write> d: array<f32>;  // fwd: rstd | bwd_dx: rstd | bwd_dw: rstd
@group(0) @binding(5) var<storage, read_write> e: array<T>;  //           | bwd_dx: dx   |

var<workgroup> partial: array<f32, WG>;

// Sum of `v` over the workgroup; every invocation gets the total.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn rmsnorm_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var ss = 0.0;
    for (var n = lid; n < p.cols; n = n + WG) {
        let v = f32(a[base + n]);
        ss = ss + v * v;
    }
    let total = workgroup_sum(lid, ss);
    let r = inverseSqrt(total / f32(p.cols) + p.eps);
    if (lid == 0u) {
        d[row] = r;
    }
    for (var n = lid; n < p.cols; n = n + WG) {
        c[base + n] = T(f32(b[n]) * f32(a[base + n]) * r);
    }
}

@compute @workgroup_size(256)
fn rmsnorm_bwd_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var dot = 0.0;
    for (var n = lid; n < p.cols; n = n + WG) {
        dot = dot + f32(c[base + n]) * f32(b[n]) * f32(a[base + n]);
    }
    let cm = workgroup_sum(lid, dot) / f32(p.cols);
    let r = d[row];
    for (var n = lid; n < p.cols; n = n + WG) {
        let g = f32(c[base + n]) * f32(b[n]);
        e[base + n] = T(r * (g - f32(a[base + n]) * r * r * cm));
    }
}

@compute @workgroup_size(256)
fn rmsnorm_bwd_dw(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.cols) {
        return;
    }
    var acc = 0.0;
    for (var m = 0u; m < p.rows; m = m + 1u) {
        acc = acc + f32(b[m * p.cols + n]) * f32(a[m * p.cols + n]) * d[m];
    }
    c[n] = T(acc);
}
