// Gated linear units (the MLP of Llama and Gemma), fused, forward and backward (one entry point
// each), f32 math: the counterpart of kernels-cuda/elementwise.cu.
//
//   y = act(g) * u, with act(g) = g * σ(a(g)) and
//     p.act 0, SiLU (SwiGLU):               a(g) = g
//     p.act 1, GELU, tanh form (GeGLU):     a(g) = 2 k (g + 0.044715 g^3), k = sqrt(2 / pi)
//   backward: dg = dy * u * σ(a) * (1 + g * (1 - σ(a)) * a'(g))
//             du = dy * act(g)
//
// Shapes: y, dy [M, F] dense. g and u address row m, column f as g[m * ld + f] and
// u[u_off + m * ld + f]: separate [M, F] buffers (u_off = 0, ld = F), or the two halves of
// each row of one [M, 2F] buffer bound twice read-only (u_off = F, ld = 2F). glu_bwd
// writes dg and du in the layouts of g and u; glu_bwd_packed writes both halves of one
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
    act: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
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

// The gate's sigmoid argument a(g) (x) and its derivative a'(g) (y).
fn glu_arg(g: f32) -> vec2<f32> {
    if (p.act == 1u) {
        let k2 = 1.5957691216057308; // 2 sqrt(2 / pi)
        return vec2<f32>(k2 * (g + 0.044715 * g * g * g), k2 * (1.0 + 3.0 * 0.044715 * g * g));
    }
    return vec2<f32>(g, 1.0);
}

@compute @workgroup_size(256)
fn glu_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let f = gid.x;
    if (f >= p.cols) {
        return;
    }
    for (var m = gid.y; m < p.rows; m = m + nwg.y) {
        let g = f32(a[m * p.ld + f]);
        let u = f32(b[p.u_off + m * p.ld + f]);
        c[m * p.cols + f] = T(g * sigmoid(glu_arg(g).x) * u);
    }
}

@compute @workgroup_size(256)
fn glu_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
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
        let a = glu_arg(g);
        let s = sigmoid(a.x);
        d[gi] = T(dy * u * s * (1.0 + g * (1.0 - s) * a.y));
        e[ui] = T(dy * g * s);
    }
}

@compute @workgroup_size(256)
fn glu_bwd_packed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
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
        let a = glu_arg(g);
        let s = sigmoid(a.x);
        c[gi] = T(dy * u * s * (1.0 + g * (1.0 - s) * a.y));
        c[ui] = T(dy * g * s);
    }
}
