// Broadcast add, f32: y[i] = a[i] + b[i % nb], a and y [len], b [nb] with nb dividing len (b
// broadcasts over a's leading dims: a bias [N] onto [M, N], or nb == len for a plain sum);
// scale, y[i] = s * a[i] (b bound but unread); and scale_by, y[i] = b[0] * a[i].
//
// Launch: workgroups of 256 over a grid of (min(groups, 65535), ceil(groups / 65535)), one
// invocation per element.

struct Params {
    len: u32,
    nb: u32,
    // scale: the factor's f32 bits.
    _pad0: u32,
    _pad1: u32,
}

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

@compute @workgroup_size(256)
fn add_bcast(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.len {
        return;
    }
    y[i] = T(f32(a[i]) + f32(b[i % p.nb]));
}

// Scale, f32: y[i] = s * a[i] over len elements (nb unused; s is the uniform's third word).
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.len {
        return;
    }
    y[i] = T(bitcast<f32>(p._pad0) * f32(a[i]));
}

// Scale by a device scalar, f32: y[i] = b[0] * a[i] over len elements (a loss's gradient dy
// scaling what a fused backward computed for dy = 1, without reading dy back to the host).
@compute @workgroup_size(256)
fn scale_by(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.len {
        return;
    }
    y[i] = T(f32(b[0]) * f32(a[i]));
}
