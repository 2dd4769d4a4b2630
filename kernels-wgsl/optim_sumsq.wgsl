// Sum of squares of gradient buffers, for the global-norm clip factor, without a host round
// trip. f32 throughout (WGSL has no f64 in core): the rounding is that of a sum of n squares in
// pairwise-ish order, relative ~1e-6 for the sizes tests use.
//
// sumsq_partial: a fixed number of workgroups (the launcher picks it from n only), each
// striding over the buffer and tree-reducing in workgroup memory; workgroup k writes
// partials[p.offset + k]. Several buffers write disjoint ranges of `partials`.
// sumsq_partial_f16: the same over an f16 gradient (an f16 model's trained weights), read as
// words of two elements (unpack2x16float: no f16 shader feature needed; where a driver flushes
// f16 subnormals, each lost square is below 2^-28, nothing beside a norm worth clipping).
// sumsq_finish: one workgroup sums partials[0..p.count) in a fixed order into out[0], so the
// result is the same run to run. No subgroup operations.

struct Params {
    n: u32,
    offset: u32,
    count: u32,
    _pad: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> grad16: array<u32>;

var<workgroup> part: array<f32, WG>;

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            part[lid] = part[lid] + part[lid + stride];
        }
        workgroupBarrier();
    }
    return part[0];
}

@compute @workgroup_size(256)
fn sumsq_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var e = wid.x * WG + lid; e < p.n; e = e + nwg.x * WG) {
        let x = grad[e];
        acc = acc + x * x;
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        partials[p.offset + wid.x] = total;
    }
}

@compute @workgroup_size(256)
fn sumsq_partial_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var e = wid.x * WG + lid; e < p.n; e = e + nwg.x * WG) {
        let x = unpack2x16float(grad16[e / 2u])[e % 2u];
        acc = acc + x * x;
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        partials[p.offset + wid.x] = total;
    }
}

@compute @workgroup_size(256)
fn sumsq_finish(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var k = lid; k < p.count; k = k + WG) {
        acc = acc + partials[k];
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        out[0] = total;
    }
}
