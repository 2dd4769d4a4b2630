// Flash attention (the FlashAttention-2 algorithm), forward and backward. Tensors are stored
// as T (the alias below: f32 as written; the launcher rewrites it to f16 and prepends
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

struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    // bit 0: causal, bit 1: sliding window, bit 2: packed (starts bound)
    flags: u32,
    window: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

alias T = f32;

const BR: u32 = 64u;
const BC: u32 = 8u;
const DMAX: u32 = 128u;
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;
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

var<workgroup> tile_a: array<f32, 1024>; // BC * DMAX
var<workgroup> tile_b: array<f32, 1024>;
var<workgroup> tile_s: array<f32, 16>;   // BC * 2 (stats of a query tile)

fn q_index(b: u32, t: u32, h: u32) -> u32 {
    return ((b * p.q_len + t) * p.heads + h) * p.head_dim;
}

fn kv_index(b: u32, j: u32, g: u32) -> u32 {
    return ((b * p.kv_len + j) * p.kv_heads + g) * p.head_dim;
}

// The visible keys [lo, hi) of query t of row b. The query sits at position S - T + t, which
// is negative for the first queries when T > S (allowed without causal), so signed.
fn visible(b: u32, t: u32) -> vec2<u32> {
    let end = i32(p.kv_len) - i32(p.q_len) + i32(t) + 1; // one past the query's position
    var hi = p.kv_len;
    if ((p.flags & 1u) != 0u) {
        hi = u32(clamp(end, 0, i32(p.kv_len)));
    }
    var lo = 0u;
    if ((p.flags & 2u) != 0u && end > 0 && u32(end) > p.window) {
        lo = min(u32(end) - p.window, p.kv_len);
    }
    if ((p.flags & 4u) != 0u) {
        lo = max(lo, starts[b * p.q_len + t]);
    }
    return vec2<u32>(min(lo, hi), hi);
}

// Workgroup index from a possibly 2-D grid.
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Loads rows [r0, r0 + BC) of a [rows, stride]-strided tensor (row r at base(r)) into a tile;
// rows past `rows` are zero.
fn load_kv_tile(which: u32, b: u32, j0: u32, g: u32, lid: u32) {
    let d = p.head_dim;
    for (var i = lid; i < BC * d; i = i + BR) {
        let j = j0 + i / d;
        var val = 0.0;
        if (j < p.kv_len) {
            let at = kv_index(b, j, g) + i % d;
            if (which == 0u) { val = f32(k[at]); } else { val = f32(v[at]); }
        }
        if (which == 0u) { tile_a[i] = val; } else { tile_b[i] = val; }
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
    let d = p.head_dim;
    let t = blk * BR + lid;
    let valid = t < p.q_len;
    var qv: array<f32, 128>;
    var acc: array<f32, 128>;
    var range = vec2<u32>(0u, 0u);
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d; c = c + 1u) {
            qv[c] = f32(q[qi + c]) * p.scale;
            acc[c] = 0.0;
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
        load_kv_tile(0u, b, j0, g, lid);
        load_kv_tile(1u, b, j0, g, lid);
        workgroupBarrier();
        if (valid) {
            var s: array<f32, 8>;
            var m_tile = NEG;
            for (var jj = 0u; jj < BC; jj = jj + 1u) {
                let j = j0 + jj;
                s[jj] = NEG;
                if (j >= range.x && j < range.y) {
                    var dot = 0.0;
                    for (var c = 0u; c < d; c = c + 1u) {
                        dot = dot + qv[c] * tile_a[jj * d + c];
                    }
                    s[jj] = dot;
                    m_tile = max(m_tile, dot);
                }
            }
            if (m_tile > NEG) {
                let m_new = max(m, m_tile);
                let corr = exp(m - m_new);
                l = l * corr;
                for (var c = 0u; c < d; c = c + 1u) {
                    acc[c] = acc[c] * corr;
                }
                for (var jj = 0u; jj < BC; jj = jj + 1u) {
                    if (s[jj] > NEG) {
                        let e = exp(s[jj] - m_new);
                        l = l + e;
                        for (var c = 0u; c < d; c = c + 1u) {
                            acc[c] = acc[c] + e * tile_b[jj * d + c];
                        }
                    }
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
        for (var c = 0u; c < d; c = c + 1u) {
            x5[qi + c] = T(acc[c] * inv);
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
    let d = p.head_dim;
    let group = p.heads / p.kv_heads;
    let j = blk * BR + lid;
    let valid = j < p.kv_len;
    var kv: array<f32, 128>;
    var vv: array<f32, 128>;
    var dk: array<f32, 128>;
    var dv: array<f32, 128>;
    if (valid) {
        let ki = kv_index(b, j, g);
        for (var c = 0u; c < d; c = c + 1u) {
            kv[c] = f32(k[ki + c]);
            vv[c] = f32(v[ki + c]);
            dk[c] = 0.0;
            dv[c] = 0.0;
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
            for (var i = lid; i < BC * d; i = i + BR) {
                let t = t0 + i / d;
                var qa = 0.0;
                var ob = 0.0;
                if (t < p.q_len) {
                    let at = q_index(b, t, h) + i % d;
                    qa = f32(q[at]);
                    ob = f32(x5[at]);
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
                for (var tt = 0u; tt < BC; tt = tt + 1u) {
                    let t = t0 + tt;
                    if (t >= p.q_len) {
                        break;
                    }
                    let r = visible(b, t);
                    if (j < r.x || j >= r.y) {
                        continue;
                    }
                    var s = 0.0;
                    var dp = 0.0;
                    for (var c = 0u; c < d; c = c + 1u) {
                        s = s + tile_a[tt * d + c] * kv[c];
                        dp = dp + tile_b[tt * d + c] * vv[c];
                    }
                    let pr = exp(s * p.scale - tile_s[2u * tt]);
                    let ds = pr * (dp - tile_s[2u * tt + 1u]) * p.scale;
                    for (var c = 0u; c < d; c = c + 1u) {
                        dv[c] = dv[c] + pr * tile_b[tt * d + c];
                        dk[c] = dk[c] + ds * tile_a[tt * d + c];
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (valid) {
        let ki = kv_index(b, j, g);
        for (var c = 0u; c < d; c = c + 1u) {
            x7[ki + c] = T(dk[c]);
            x8[ki + c] = T(dv[c]);
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
    let d = p.head_dim;
    let t = blk * BR + lid;
    let valid = t < p.q_len;
    var qv: array<f32, 128>;
    var dov: array<f32, 128>;
    var dq: array<f32, 128>;
    var range = vec2<u32>(0u, 0u);
    var lse = 0.0;
    var dsum = 0.0;
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d; c = c + 1u) {
            qv[c] = f32(q[qi + c]) * p.scale;
            dov[c] = f32(x5[qi + c]);
            dq[c] = 0.0;
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
        load_kv_tile(0u, b, j0, g, lid);
        load_kv_tile(1u, b, j0, g, lid);
        workgroupBarrier();
        if (valid) {
            for (var jj = 0u; jj < BC; jj = jj + 1u) {
                let j = j0 + jj;
                if (j < range.x || j >= range.y) {
                    continue;
                }
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < d; c = c + 1u) {
                    s = s + qv[c] * tile_a[jj * d + c];
                    dp = dp + dov[c] * tile_b[jj * d + c];
                }
                let ds = exp(s - lse) * (dp - dsum) * p.scale;
                for (var c = 0u; c < d; c = c + 1u) {
                    dq[c] = dq[c] + ds * tile_a[jj * d + c];
                }
            }
        }
        workgroupBarrier();
    }
    if (valid) {
        let qi = q_index(b, t, h);
        for (var c = 0u; c < d; c = c + 1u) {
            x7[qi + c] = T(dq[c]);
        }
    }
}
