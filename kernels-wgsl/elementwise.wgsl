// SwiGLU, fused, forward and backward (one entry point each), f32.
//
//   forward:  y  = silu(g) * u = g * σ(g) * u
//   backward: dg = dy * u * σ(g) * (1 + g * (1 - σ(g)))
//             du = dy * silu(g)
//
// Shapes: y, dy [M, F] dense. g and u address row m, column f as g[m * ld + f] and
// u[u_off + m * ld + f]: separate [M, F] buffers (u_off = 0, ld = F), or the two halves of
// each row of one [M, 2F] buffer bound twice read-only (u_off = F, ld = 2F). swiglu_bwd
// writes dg and du in the layouts of g and u; swiglu_bwd_packed writes both halves of one
// dgu [M, 2F] (a buffer may not be bound writable twice). σ(g) = 1/(1+e) or e/(1+e) with
// e = exp(-|g|): no overflow.
//
// Launch: workgroups of 256 over (ceil(F / 256), min(M, 65535)), one invocation per column;
// workgroups stride over rows by num_workgroups.y.

struct Params {
    rows: u32,
    cols: u32,
    u_off: u32,
    ld: u32,
}

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;        // fwd: g | bwd: g  | bwd_packed: gu
@group(0) @binding(2) var<storage, read> b: array<T>;        // fwd: u | bwd: u  | bwd_packed: dy
@group(0) @binding(3) var<storage, read_write> c: array<T>;  // fwd: y | bwd: dy | bwd_packed: dgu
@group(0) @binding(4) var<storage, read_write> d: array<T>;  //        | bwd: dg |
@group(0) @binding(5) var<storage, read_write> e: array<T>;  //        | bwd: du |

fn sigmoid(x: f32) -> f32 {
    let t = exp(-abs(x));
    let r = 1.0 / (1.0 + t);
    return select(t * r, r, x >= 0.0);
}

@compute @workgroup_size(256)
fn swiglu_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = gid.x;
    if (f >= p.cols) {
        return;
    }
    for (var m = gid.y; m < p.rows; m = m + nwg.y) {
        let g = f32(a[m * p.ld + f]);
        let u = f32(b[p.u_off + m * p.ld + f]);
        c[m * p.cols + f] = T(g * sigmoid(g) * u);
    }
}

@compute @workgroup_size(256)
fn swiglu_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = gid.x;
    if (f >= p.cols) {
        return;
    }
    for (var m = gid.y; m < p.rows; m = m + nwg.y) {
        let gi = m * p.ld + f;
        let ui = p.u_off + m * p.ld + f;
        let g = f32(a[gi]);
        let u = f32(b[ui]);
        let dy = f32(c[m * p.cols + f]);
        let s = sigmoid(g);
        d[gi] = T(dy * u * s * (1.0 + g * (1.0 - s)));
        e[ui] = T(dy * g * s);
    }
}

@compute @workgroup_size(256)
fn swiglu_bwd_packed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = gid.x;
    if (f >= p.cols) {
        return;
    }
    for (var m = gid.y; m < p.rows; m = m + nwg.y) {
        let gi = m * p.ld + f;
        let ui = p.u_off + m * p.ld + f;
        let g = f32(a[gi]);
        let u = f32(a[ui]);
        let dy = f32(b[m * p.cols + f]);
        let s = sigmoid(g);
        c[gi] = T(dy * u * s * (1.0 + g * (1.0 - s)));
        c[ui] = T(dy * g * s);
    }
}
