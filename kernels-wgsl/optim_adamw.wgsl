// Fused AdamW step, f32, in torch.optim.AdamW's order, with g = s * grad (s as in
// optim_sm3.wgsl: the host scale, times the clip factor when the device sum of squares is
// bound):
//
//   w <- w*decay;  m <- m + (1-b1)*(g-m);  v <- b2*v + (1-b2)*g^2
//   w <- w - step_size * m / (sqrt(v)/bc2_sqrt + eps)
//
// decay = 1 - lr*wd, step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t) come from the host.
// Launch: one invocation per element, 256 per workgroup, index wid.y * num_workgroups.x * 256 +
// gid.x (a 2-D grid past 65535 workgroups).

struct Params {
    n: u32,
    // bit 1: device sum of squares bound.
    flags: u32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    scale: f32,
    max_norm: f32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> sumsq: array<f32>;

#include "grad_scale.wgsli"

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.y * nwg.x * WG + gid.x;
    if (e >= p.n) {
        return;
    }
    let g = grad[e] * grad_scale();
    let wd = w[e] * p.decay;
    let me = m[e] + (1.0 - p.beta1) * (g - m[e]);
    let ve = p.beta2 * v[e] + (1.0 - p.beta2) * g * g;
    m[e] = me;
    v[e] = ve;
    w[e] = wd - p.step_size * me / (sqrt(ve) / p.bc2_sqrt + p.eps);
}
