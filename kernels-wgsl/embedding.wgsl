// Embedding gather (forward) and its scatter-add (backward), f32.
//
//   forward:  y[t, :] = table[ids[t], :]
//   backward: dtable[v, :] += sum over t with ids[t] == v of dy[t, :]   (ids get no gradient)
//
// Shapes: table, dtable [V, E]; ids [T] i32; y, dy [T, E]. An id outside [0, V) reads as a
// zero row and scatters nothing (the host checks ids first: kernels::embedding::check_ids).
//
// Launch: one workgroup of 256 per token for both entry points; the token index is
// wid.y * num_workgroups.x + wid.x (a 2-D grid when T > 65535).
//
// Backward without float atomics (WGSL has none), deterministic: the first token t of each
// distinct id (its "head") owns dtable row ids[t] and adds the rows of dy of every token with
// that id in token order, so sums and rounding are the same on every run and match the CPU
// path's. A workgroup first scans ids[0..t) in chunks of 256 and returns at the first chunk
// holding its id (not a head). The head then scans ids[t..T) in chunks; each chunk's matches
// are compacted in order into a workgroup list by a prefix sum, and each invocation adds the
// listed rows of dy into its columns of dtable[v, :]. Cost: O(T^2 / 256) id reads per
// workgroup at worst and one read of each dy row.

struct Params {
    tokens: u32,
    vocab: u32,
    dim: u32,
    _pad: u32,
}

const WG: u32 = 256u;

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<T>;        // fwd: table | bwd: dy
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> dst: array<T>;  // fwd: y     | bwd: dtable

var<workgroup> scan: array<u32, WG>;
var<workgroup> list: array<u32, WG>;
var<workgroup> hits: u32;

@compute @workgroup_size(256)
fn embedding_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = wid.y * nwg.x + wid.x;
    if (t >= p.tokens) {
        return;
    }
    let v = ids[t];
    let ok = v >= 0 && u32(v) < p.vocab;
    let row = select(0u, u32(v) * p.dim, ok);
    for (var e = lid; e < p.dim; e = e + WG) {
        dst[t * p.dim + e] = T(select(0.0, f32(src[row + e]), ok));
    }
}

// Inclusive prefix sum of `hit` over the workgroup (Hillis-Steele in `scan`); writes the j of
// every hit into list[0..count) in invocation order and returns count, uniformly.
fn compact(lid: u32, hit: bool, j: u32) -> u32 {
    scan[lid] = select(0u, 1u, hit);
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off * 2u) {
        var add = 0u;
        if (lid >= off) {
            add = scan[lid - off];
        }
        workgroupBarrier();
        scan[lid] = scan[lid] + add;
        workgroupBarrier();
    }
    if (hit) {
        list[scan[lid] - 1u] = j;
    }
    if (lid == WG - 1u) {
        hits = scan[lid];
    }
    return workgroupUniformLoad(&hits);
}

@compute @workgroup_size(256)
fn embedding_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = wid.y * nwg.x + wid.x;
    if (t >= p.tokens) {
        return;
    }
    let v = ids[t];
    if (v < 0 || u32(v) >= p.vocab) {
        return;
    }
    // 1. Not the first token with this id: that token's workgroup owns the row.
    for (var base = 0u; base < t; base = base + WG) {
        let j = base + lid;
        if (compact(lid, j < t && ids[min(j, p.tokens - 1u)] == v, j) > 0u) {
            return;
        }
    }
    // 2. The head: add the matching rows of dy, chunk by chunk, in token order.
    let row = u32(v) * p.dim;
    for (var base = t; base < p.tokens; base = base + WG) {
        let j = base + lid;
        let count = compact(lid, j < p.tokens && ids[min(j, p.tokens - 1u)] == v, j);
        if (count > 0u) {
            for (var e = lid; e < p.dim; e = e + WG) {
                var acc = f32(dst[row + e]);
                for (var k = 0u; k < count; k = k + 1u) {
                    acc = acc + f32(src[list[k] * p.dim + e]);
                }
                dst[row + e] = T(acc);
            }
            workgroupBarrier();  // the list is rewritten by the next chunk
        }
    }
}
