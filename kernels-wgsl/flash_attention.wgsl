// Flash attention (the FlashAttention-2 algorithm), forward and backward. Tensors are stored
// as T (the alias of attention_common.wgsli: f32 as written; the launcher rewrites it to f16 and prepends
// `enable f16;` for half-precision storage); the statistics and all arithmetic are f32.
//
// Shapes as in src/kernels/attention.rs: q, o, dO, dq [B, T, H, D]; k, v, dk, dv [B, S, G, D];
// query head h reads key/value head h / (H/G). Query t sits at position S - T + t; causal: it
// sees keys j <= position; window W: also position - j < W; packed: also j >= starts[b*T + t].
// stats [B*T*H, 2]: (log-sum-exp of the scaled scores, D = rowsum(dO * O)) per query row.
//
// attn_fwd:     a workgroup per (b, h, block of 64 queries), one query per invocation; keys and
//               values stream through workgroup memory in tiles of 8; online softmax; writes O
//               and the log-sum-exp. Causal blocks stop after the block's last visible key.
// attn_bwd_dot: one invocation per query row: D = rowsum(dO * O).
// attn_bwd_dkdv: a workgroup per (b, g, block of 64 keys), one key per invocation; the queries
//               of every head of the group stream through workgroup memory in tiles of 8;
//               P is recomputed from the log-sum-exp; dK and dV are summed over the heads.
// attn_bwd_dq:  like attn_fwd: per query, over the key tiles, dq = scale * sum_j dS_j k_j.
// Head dim at most 128 (private arrays). No subgroup operations.
//
// Per tile, an invocation makes two passes over the head dim, held as vec4s (rounded up to a
// multiple of 4, zero past it) in registers and in the tiles: one for the 8 scores (and the 8
// dO.v products), one that updates each accumulator once with the tile's 8 terms summed first.
// That is fewer instructions and private-memory updates than a pass per key, sums long
// sequences in two levels (a key's dV over 1500 queries one term at a time lost the 2x-naive
// bound), and keeps an invocation's loop count under lavapipe's limit (65,535 iterations in
// all, then it silently stops looping) to about 27x longer sequences than a scalar pass per
// key did (S 13,000 against 480 at D 64).

#include "attention_common.wgsli"

const BR: u32 = 64u;
const BC: u32 = 8u;
const DMAX4: u32 = 32u; // the largest head dim, 128, in vec4s

@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
@group(0) @binding(4) var<storage, read> starts: array<u32>;
// attn_fwd: o | attn_bwd_dot: o | attn_bwd_dkdv: dO | attn_bwd_dq: dO
@group(0) @binding(5) var<storage, read_write> x5: array<T>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
// attn_bwd_dot: dO | attn_bwd_dkdv: dk | attn_bwd_dq: dq
@group(0) @binding(7) var<storage, read_write> x7: array<T>;
// attn_bwd_dkdv: dv
@group(0) @binding(8) var<storage, read_write> x8: array<T>;

var<workgroup> tile_a: array<vec4<f32>, 256>; // BC * DMAX4
var<workgroup> tile_b: array<vec4<f32>, 256>;
var<workgroup> tile_s: array<f32, 16>;   // BC * 2 (stats of a query tile)

// The head dim in vec4s.
fn dim4() -> u32 {
    return (p.head_dim + 3u) / 4u;
}

// Elements c..c+3 of the head vector at `at` of one tensor, zero past the head dim (storage
// buffers cannot be passed to a function, hence one loader per binding). Written out, not
// looped: on lavapipe every loop iteration counts against its limit.
fn ld_q(at: u32, c: u32) -> vec4<f32> {
    let d = p.head_dim;
    var r = vec4<f32>(0.0);
    if (c < d) { r.x = f32(q[at + c]); }
    if (c + 1u < d) { r.y = f32(q[at + c + 1u]); }
    if (c + 2u < d) { r.z = f32(q[at + c + 2u]); }
    if (c + 3u < d) { r.w = f32(q[at + c + 3u]); }
    return r;
}

fn ld_k(at: u32, c: u32) -> vec4<f32> {
    let d = p.head_dim;
    var r = vec4<f32>(0.0);
    if (c < d) { r.x = f32(k[at + c]); }
    if (c + 1u < d) { r.y = f32(k[at + c + 1u]); }
    if (c + 2u < d) { r.z = f32(k[at + c + 2u]); }
    if (c + 3u < d) { r.w = f32(k[at + c + 3u]); }
    return r;
}

fn ld_v(at: u32, c: u32) -> vec4<f32> {
    let d = p.head_dim;
    var r = vec4<f32>(0.0);
    if (c < d) { r.x = f32(v[at + c]); }
    if (c + 1u < d) { r.y = f32(v[at + c + 1u]); }
    if (c + 2u < d) { r.z = f32(v[at + c + 2u]); }
    if (c + 3u < d) { r.w = f32(v[at + c + 3u]); }
    return r;
}

fn ld_x5(at: u32, c: u32) -> vec4<f32> {
    let d = p.head_dim;
    var r = vec4<f32>(0.0);
    if (c < d) { r.x = f32(x5[at + c]); }
    if (c + 1u < d) { r.y = f32(x5[at + c + 1u]); }
    if (c + 2u < d) { r.z = f32(x5[at + c + 2u]); }
    if (c + 3u < d) { r.w = f32(x5[at + c + 3u]); }
    return r;
}

// Stores the elements of `val` that lie inside the head dim at elements c..c+3 of `at`.
fn st_x5(at: u32, c: u32, val: vec4<f32>) {
    let d = p.head_dim;
    if (c < d) { x5[at + c] = T(val.x); }
    if (c + 1u < d) { x5[at + c + 1u] = T(val.y); }
    if (c + 2u < d) { x5[at + c + 2u] = T(val.z); }
    if (c + 3u < d) { x5[at + c + 3u] = T(val.w); }
}

fn st_x7(at: u32, c: u32, val: vec4<f32>) {
    let d = p.head_dim;
    if (c < d) { x7[at + c] = T(val.x); }
    if (c + 1u < d) { x7[at + c + 1u] = T(val.y); }
    if (c + 2u < d) { x7[at + c + 2u] = T(val.z); }
    if (c + 3u < d) { x7[at + c + 3u] = T(val.w); }
}

fn st_x8(at: u32, c: u32, val: vec4<f32>) {
    let d = p.head_dim;
    if (c < d) { x8[at + c] = T(val.x); }
    if (c + 1u < d) { x8[at + c + 1u] = T(val.y); }
    if (c + 2u < d) { x8[at + c + 2u] = T(val.z); }
    if (c + 3u < d) { x8[at + c + 3u] = T(val.w); }
}

// The visible keys [lo, hi) of query t of row b: the masks, and with packed rows the start of
// the query's sequence.
fn visible(b: u32, t: u32) -> vec2<u32> {
    let r = visible_unpacked(t);
    if ((p.flags & 4u) != 0u) {
        return vec2<u32>(min(max(r.x, starts[b * p.q_len + t]), r.y), r.y);
    }
    return r;
}

// Workgroup index from a possibly 2-D grid.
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// A tile's 8 rows in two vec4s (rows 0-3, rows 4-7): `x` dotted with rows r0..r0+3 of tile_a
// (tile_b) at vec4 column c, and the sum of the rows at column c weighted by (wa, wb). Written
// out rather than looped over the 8 rows: a head-dim loop does all 8 rows in one pass.
fn dot_a(x: vec4<f32>, r0: u32, c: u32, d4: u32) -> vec4<f32> {
    return vec4<f32>(dot(x, tile_a[r0 * d4 + c]), dot(x, tile_a[(r0 + 1u) * d4 + c]), dot(x, tile_a[(r0 + 2u) * d4 + c]), dot(x, tile_a[(r0 + 3u) * d4 + c]));
}

fn dot_b(x: vec4<f32>, r0: u32, c: u32, d4: u32) -> vec4<f32> {
    return vec4<f32>(dot(x, tile_b[r0 * d4 + c]), dot(x, tile_b[(r0 + 1u) * d4 + c]), dot(x, tile_b[(r0 + 2u) * d4 + c]), dot(x, tile_b[(r0 + 3u) * d4 + c]));
}

fn mix_a(wa: vec4<f32>, wb: vec4<f32>, c: u32, d4: u32) -> vec4<f32> {
    let lo = wa.x * tile_a[c] + wa.y * tile_a[d4 + c] + wa.z * tile_a[2u * d4 + c] + wa.w * tile_a[3u * d4 + c];
    let hi = wb.x * tile_a[4u * d4 + c] + wb.y * tile_a[5u * d4 + c] + wb.z * tile_a[6u * d4 + c] + wb.w * tile_a[7u * d4 + c];
    return lo + hi;
}

fn mix_b(wa: vec4<f32>, wb: vec4<f32>, c: u32, d4: u32) -> vec4<f32> {
    let lo = wa.x * tile_b[c] + wa.y * tile_b[d4 + c] + wa.z * tile_b[2u * d4 + c] + wa.w * tile_b[3u * d4 + c];
    let hi = wb.x * tile_b[4u * d4 + c] + wb.y * tile_b[5u * d4 + c] + wb.z * tile_b[6u * d4 + c] + wb.w * tile_b[7u * d4 + c];
    return lo + hi;
}

// Whether each of the keys j0 + r0 .. j0 + r0 + 3 lies in [range.x, range.y).
fn keys_in(j0: u32, r0: u32, range: vec2<u32>) -> vec4<bool> {
    let j = vec4<u32>(j0 + r0) + vec4<u32>(0u, 1u, 2u, 3u);
    return (j >= vec4<u32>(range.x)) & (j < vec4<u32>(range.y));
}

fn max4(x: vec4<f32>) -> f32 {
    return max(max(x.x, x.y), max(x.z, x.w));
}

// Loads keys [j0, j0 + BC) of key/value head g into tile_a and their values into tile_b;
// keys past the cache are zero.
fn load_kv_tiles(b: u32, j0: u32, g: u32, lid: u32) {
    let d4 = dim4();
    for (var i = lid; i < BC * d4; i = i + BR) {
        let j = j0 + i / d4;
        var kk = vec4<f32>(0.0);
        var vv = vec4<f32>(0.0);
        if (j < p.kv_len) {
            let at = kv_index(b, j, g);
            kk = ld_k(at, 4u * (i % d4));
            vv = ld_v(at, 4u * (i % d4));
        }
        tile_a[i] = kk;
        tile_b[i] = vv;
    }
}

@compute @workgroup_size(64)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blocks = (p.q_len + BR - 1u) / BR;
    let gi = group_index(wid, nwg);
    if (gi >= p.batch * p.heads * blocks) {
        return;
    }
    let blk = gi % blocks;
    let h = (gi / blocks) % p.heads;
    let b = gi / (blocks * p.heads);
    let g = h / (p.heads / p.kv_heads);
    let d4 = dim4();
    let t = blk * BR + lid;
    let valid = t < p.q_len;
    var qv: array<vec4<f32>, 32>;
    var acc: array<vec4<f32>, 32>;
    var range = vec2<u32>(0u, 0u);
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d4; c = c + 1u) {
            qv[c] = ld_q(qi, 4u * c) * p.scale;
            acc[c] = vec4<f32>(0.0);
        }
        range = visible(b, t);
    }
    // Keys past the block's last query are masked for all of it when causal.
    let t_last = min(blk * BR + BR, p.q_len) - 1u;
    var k_end = p.kv_len;
    if ((p.flags & 1u) != 0u) {
        k_end = min(p.kv_len - p.q_len + t_last + 1u, p.kv_len);
    }
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < k_end; j0 = j0 + BC) {
        load_kv_tiles(b, j0, g, lid);
        workgroupBarrier();
        if (valid) {
            // The scores of the tile's 8 keys in one pass over the head dim.
            var sa = vec4<f32>(0.0);
            var sb = vec4<f32>(0.0);
            for (var c = 0u; c < d4; c = c + 1u) {
                sa = sa + dot_a(qv[c], 0u, c, d4);
                sb = sb + dot_a(qv[c], 4u, c, d4);
            }
            let va = keys_in(j0, 0u, range);
            let vb = keys_in(j0, 4u, range);
            sa = select(vec4<f32>(NEG), sa, va);
            sb = select(vec4<f32>(NEG), sb, vb);
            let m_tile = max(max4(sa), max4(sb));
            if (m_tile > NEG) {
                let m_new = max(m, m_tile);
                let corr = exp(m - m_new);
                let wa = select(vec4<f32>(0.0), exp(sa - vec4<f32>(m_new)), va);
                let wb = select(vec4<f32>(0.0), exp(sb - vec4<f32>(m_new)), vb);
                l = l * corr + dot(wa + wb, vec4<f32>(1.0));
                // The rescale and the tile's P.V in one pass: each accumulator is updated once
                // a tile, with the tile's 8 terms summed first.
                for (var c = 0u; c < d4; c = c + 1u) {
                    acc[c] = acc[c] * corr + mix_b(wa, wb, c, d4);
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let qi = q_index(b, t, h);
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        for (var c = 0u; c < d4; c = c + 1u) {
            st_x5(qi, 4u * c, acc[c] * inv);
        }
        let row = (b * p.q_len + t) * p.heads + h;
        if (l > 0.0) {
            stats[2u * row] = m + log(l);
        } else {
            stats[2u * row] = NEG;
        }
    }
}

@compute @workgroup_size(64)
fn attn_bwd_dot(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg) * BR + lid;
    if (row >= p.batch * p.q_len * p.heads) {
        return;
    }
    let base = row * p.head_dim;
    var s = 0.0;
    for (var c = 0u; c < p.head_dim; c = c + 1u) {
        s = s + f32(x5[base + c]) * f32(x7[base + c]);
    }
    stats[2u * row + 1u] = s;
}

@compute @workgroup_size(64)
fn attn_bwd_dkdv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blocks = (p.kv_len + BR - 1u) / BR;
    let gi = group_index(wid, nwg);
    if (gi >= p.batch * p.kv_heads * blocks) {
        return;
    }
    let blk = gi % blocks;
    let g = (gi / blocks) % p.kv_heads;
    let b = gi / (blocks * p.kv_heads);
    let d4 = dim4();
    let group = p.heads / p.kv_heads;
    let j = blk * BR + lid;
    let valid = j < p.kv_len;
    var kv: array<vec4<f32>, 32>;
    var vv: array<vec4<f32>, 32>;
    var dk: array<vec4<f32>, 32>;
    var dv: array<vec4<f32>, 32>;
    if (valid) {
        let ki = kv_index(b, j, g);
        for (var c = 0u; c < d4; c = c + 1u) {
            kv[c] = ld_k(ki, 4u * c);
            vv[c] = ld_v(ki, 4u * c);
            dk[c] = vec4<f32>(0.0);
            dv[c] = vec4<f32>(0.0);
        }
    }
    // Causal: queries before the one at the block's first key see none of it.
    var t_begin = 0u;
    if ((p.flags & 1u) != 0u) {
        let first_key = blk * BR;
        let offset = p.kv_len - p.q_len;
        if (first_key > offset) {
            t_begin = first_key - offset;
        }
    }
    t_begin = t_begin - t_begin % BC;
    for (var h = g * group; h < (g + 1u) * group; h = h + 1u) {
        for (var t0 = t_begin; t0 < p.q_len; t0 = t0 + BC) {
            // Tiles: q (scaled later) in tile_a, dO in tile_b, (lse, D) in tile_s.
            for (var i = lid; i < BC * d4; i = i + BR) {
                let t = t0 + i / d4;
                var qa = vec4<f32>(0.0);
                var ob = vec4<f32>(0.0);
                if (t < p.q_len) {
                    let at = q_index(b, t, h);
                    qa = ld_q(at, 4u * (i % d4));
                    ob = ld_x5(at, 4u * (i % d4));
                }
                tile_a[i] = qa;
                tile_b[i] = ob;
            }
            if (lid < 2u * BC) {
                let t = t0 + lid / 2u;
                var sv = 0.0;
                if (t < p.q_len) {
                    sv = stats[2u * ((b * p.q_len + t) * p.heads + h) + lid % 2u];
                }
                tile_s[lid] = sv;
            }
            workgroupBarrier();
            if (valid) {
                // The tile's 8 queries against this key: q.k and dO.v in one pass.
                var sa = vec4<f32>(0.0);
                var sb = vec4<f32>(0.0);
                var pa = vec4<f32>(0.0);
                var pb = vec4<f32>(0.0);
                for (var c = 0u; c < d4; c = c + 1u) {
                    sa = sa + dot_a(kv[c], 0u, c, d4);
                    sb = sb + dot_a(kv[c], 4u, c, d4);
                    pa = pa + dot_b(vv[c], 0u, c, d4);
                    pb = pb + dot_b(vv[c], 4u, c, d4);
                }
                // Which of the 8 queries see key j (queries past T see none).
                var va = vec4<bool>(false);
                var vb = vec4<bool>(false);
                for (var tt = 0u; tt < 4u; tt = tt + 1u) {
                    if (t0 + tt < p.q_len) {
                        let r = visible(b, t0 + tt);
                        va[tt] = j >= r.x && j < r.y;
                    }
                    if (t0 + 4u + tt < p.q_len) {
                        let r = visible(b, t0 + 4u + tt);
                        vb[tt] = j >= r.x && j < r.y;
                    }
                }
                if (any(va) || any(vb)) {
                    let lse_a = vec4<f32>(tile_s[0], tile_s[2], tile_s[4], tile_s[6]);
                    let lse_b = vec4<f32>(tile_s[8], tile_s[10], tile_s[12], tile_s[14]);
                    let dd_a = vec4<f32>(tile_s[1], tile_s[3], tile_s[5], tile_s[7]);
                    let dd_b = vec4<f32>(tile_s[9], tile_s[11], tile_s[13], tile_s[15]);
                    let pr_a = select(vec4<f32>(0.0), exp(sa * p.scale - lse_a), va);
                    let pr_b = select(vec4<f32>(0.0), exp(sb * p.scale - lse_b), vb);
                    let ds_a = pr_a * (pa - dd_a) * p.scale;
                    let ds_b = pr_b * (pb - dd_b) * p.scale;
                    // Each accumulator once a tile, the tile's 8 terms summed first.
                    for (var c = 0u; c < d4; c = c + 1u) {
                        dv[c] = dv[c] + mix_b(pr_a, pr_b, c, d4);
                        dk[c] = dk[c] + mix_a(ds_a, ds_b, c, d4);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (valid) {
        let ki = kv_index(b, j, g);
        for (var c = 0u; c < d4; c = c + 1u) {
            st_x7(ki, 4u * c, dk[c]);
            st_x8(ki, 4u * c, dv[c]);
        }
    }
}

@compute @workgroup_size(64)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blocks = (p.q_len + BR - 1u) / BR;
    let gi = group_index(wid, nwg);
    if (gi >= p.batch * p.heads * blocks) {
        return;
    }
    let blk = gi % blocks;
    let h = (gi / blocks) % p.heads;
    let b = gi / (blocks * p.heads);
    let g = h / (p.heads / p.kv_heads);
    let d4 = dim4();
    let t = blk * BR + lid;
    let valid = t < p.q_len;
    var qv: array<vec4<f32>, 32>;
    var dov: array<vec4<f32>, 32>;
    var dq: array<vec4<f32>, 32>;
    var range = vec2<u32>(0u, 0u);
    var lse = 0.0;
    var dsum = 0.0;
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d4; c = c + 1u) {
            qv[c] = ld_q(qi, 4u * c) * p.scale;
            dov[c] = ld_x5(qi, 4u * c);
            dq[c] = vec4<f32>(0.0);
        }
        range = visible(b, t);
        let row = (b * p.q_len + t) * p.heads + h;
        lse = stats[2u * row];
        dsum = stats[2u * row + 1u];
    }
    let t_last = min(blk * BR + BR, p.q_len) - 1u;
    var k_end = p.kv_len;
    if ((p.flags & 1u) != 0u) {
        k_end = min(p.kv_len - p.q_len + t_last + 1u, p.kv_len);
    }
    for (var j0 = 0u; j0 < k_end; j0 = j0 + BC) {
        load_kv_tiles(b, j0, g, lid);
        workgroupBarrier();
        if (valid) {
            // The tile's 8 keys: q.k and dO.v in one pass over the head dim.
            var sa = vec4<f32>(0.0);
            var sb = vec4<f32>(0.0);
            var pa = vec4<f32>(0.0);
            var pb = vec4<f32>(0.0);
            for (var c = 0u; c < d4; c = c + 1u) {
                sa = sa + dot_a(qv[c], 0u, c, d4);
                sb = sb + dot_a(qv[c], 4u, c, d4);
                pa = pa + dot_b(dov[c], 0u, c, d4);
                pb = pb + dot_b(dov[c], 4u, c, d4);
            }
            let va = keys_in(j0, 0u, range);
            let vb = keys_in(j0, 4u, range);
            if (any(va) || any(vb)) {
                let ds_a = select(vec4<f32>(0.0), exp(sa - vec4<f32>(lse)) * (pa - vec4<f32>(dsum)) * p.scale, va);
                let ds_b = select(vec4<f32>(0.0), exp(sb - vec4<f32>(lse)) * (pb - vec4<f32>(dsum)) * p.scale, vb);
                for (var c = 0u; c < d4; c = c + 1u) {
                    dq[c] = dq[c] + mix_a(ds_a, ds_b, c, d4);
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d4; c = c + 1u) {
            st_x7(qi, 4u * c, dq[c]);
        }
    }
}
