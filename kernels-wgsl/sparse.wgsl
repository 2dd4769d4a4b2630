// The sparse deltas of sparse fine-tuning (SpIEL): δ holds the values at sorted, distinct flat
// indices e = n·K + k of an [N, K] weight (see src/kernels/sparse.rs).
//
//   sparse_apply:  w[idx[i]] = T(f32(w[idx[i]]) + delta[i])   (in place, on a copy of W)
//   sparse_gather: out[i] = f32(g[idx[i]])                    (dδ from the dense dW)
//
// T (the weight's or gradient's storage) is f32, or f16 in the f16 variant; δ and the
// gathered values are f32. The indices are distinct, so no two invocations write one element.
// An index at or past `len` is skipped (the host checks them first).
//
// Launch: workgroups of 256 over a grid of (min(groups, 65535), ceil(groups / 65535)), one
// invocation per index.

struct Params {
    n: u32,
    len: u32,
    _pad0: u32,
    _pad1: u32,
}

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> w: array<T>;
@group(0) @binding(3) var<storage, read_write> vals: array<f32>;

@compute @workgroup_size(256)
fn sparse_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n {
        return;
    }
    let e = idx[i];
    if e < p.len {
        w[e] = T(f32(w[e]) + vals[i]);
    }
}

// Here `w` is the dense gradient (read only) and `vals` the output.
@compute @workgroup_size(256)
fn sparse_gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= p.n {
        return;
    }
    let e = idx[i];
    vals[i] = select(0.0, f32(w[e]), e < p.len);
}
