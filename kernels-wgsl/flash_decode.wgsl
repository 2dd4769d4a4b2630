// Split-KV attention for a few query rows over a long key/value cache (decoding): the WGSL
// counterpart of kernels-cuda/flash_decode.cu. Tensors are stored as T (f32 as written; the
// launcher rewrites it to f16); the chunk results, the statistics and all arithmetic are f32.
//
// Shapes, masks and stats as in flash_attention.wgsl, without packed rows: q, o [B, T, H, D];
// k, v [B, S, G, D]; query t sits at position S - T + t; causal: it sees keys j <= position;
// window W: also position - j < W. stats[2 * ((b*T + t)*H + h)] gets the log-sum-exp of the
// scaled scores.
//
// The rows of key/value head g are its group's query heads times the T queries, at most ROWS
// of them: row r is query t = r % T of query head g*(H/G) + r / T. The tiled forward gives one
// query row to one invocation, so a decoding step (T = 1) keeps one invocation of 64 busy per
// workgroup and reads the cache once per query head; here every invocation works and the
// cache is read once per key/value head.
//
// decode_part:  a workgroup per (b, g, chunk of CHUNK keys). The chunk goes through in tiles
//               of TILE keys: one key per invocation for the scores (every row against it),
//               then the online softmax per row (one invocation a row), then P.V with one
//               head-dim column per invocation. Writes the chunk's unnormalised O and its
//               (max, sum) per row: part = (b*G + g)*chunks + chunk, rows of that part at
//               part*rows.
// decode_merge: a workgroup per (b, g, row): rescales the chunks to their common max, writes
//               O and the log-sum-exp (NEG and a zero row when no key is visible, as attn_fwd).
// Head dim at most 128 (two columns per invocation). No subgroup operations.

#include "attention_common.wgsli"

const CHUNK: u32 = 256u;
const TILE: u32 = 64u;
const ROWS: u32 = 16u;
const DMAX: u32 = 128u;

@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
// [parts * rows, D]: each chunk's O before the division by its sum
@group(0) @binding(4) var<storage, read_write> part_o: array<f32>;
// [parts * rows, 2]: each chunk's (max, sum) per row
@group(0) @binding(5) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(6) var<storage, read_write> o: array<T>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;

var<workgroup> qs: array<f32, ROWS * DMAX>; // the query rows, scaled
var<workgroup> ps: array<f32, ROWS * TILE>; // a tile's scores, then its probabilities
var<workgroup> row_m: array<f32, ROWS>; // running max per row
var<workgroup> row_l: array<f32, ROWS>; // running sum per row
var<workgroup> row_c: array<f32, ROWS>; // the tile's rescale of each row's accumulator
var<workgroup> row_lo: array<u32, ROWS>;
var<workgroup> row_hi: array<u32, ROWS>;

fn chunks() -> u32 {
    return max((p.kv_len + CHUNK - 1u) / CHUNK, 1u);
}

@compute @workgroup_size(64)
fn decode_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n_chunks = chunks();
    let gi = wid.y * nwg.x + wid.x;
    if (gi >= p.batch * p.kv_heads * n_chunks) {
        return;
    }
    let chunk = gi % n_chunks;
    let g = (gi / n_chunks) % p.kv_heads;
    let b = gi / (n_chunks * p.kv_heads);
    let per = p.heads / p.kv_heads;
    let rows = per * p.q_len;
    let d = p.head_dim;
    for (var i = lid; i < rows * d; i = i + TILE) {
        let r = i / d;
        qs[i] = f32(q[q_index(b, r % p.q_len, g * per + r / p.q_len) + i % d]) * p.scale;
    }
    if (lid < rows) {
        let range = visible_unpacked(lid % p.q_len);
        row_lo[lid] = range.x;
        row_hi[lid] = range.y;
        row_m[lid] = NEG;
        row_l[lid] = 0.0;
    }
    // (row r, column lid + TILE * i) at acc[2 * r + i]; zero-initialised.
    var acc: array<f32, 2 * ROWS>;
    workgroupBarrier();
    let j_begin = chunk * CHUNK;
    let j_end = min(j_begin + CHUNK, p.kv_len);
    for (var j0 = j_begin; j0 < j_end; j0 = j0 + TILE) {
        // Scores: key j0 + lid against every row.
        let j = j0 + lid;
        var s: array<f32, ROWS>;
        if (j < j_end) {
            let kb = kv_index(b, j, g);
            for (var e = 0u; e < d; e = e + 1u) {
                let kv = f32(k[kb + e]);
                for (var r = 0u; r < rows; r = r + 1u) {
                    s[r] = s[r] + qs[r * d + e] * kv;
                }
            }
        }
        for (var r = 0u; r < rows; r = r + 1u) {
            var x = NEG;
            if (j < j_end && j >= row_lo[r] && j < row_hi[r]) {
                x = s[r];
            }
            ps[r * TILE + lid] = x;
        }
        workgroupBarrier();
        // Online softmax, a row per invocation: the tile's probabilities at the new max.
        if (lid < rows) {
            var mx = NEG;
            for (var jj = 0u; jj < TILE; jj = jj + 1u) {
                mx = max(mx, ps[lid * TILE + jj]);
            }
            let m_old = row_m[lid];
            let m_new = max(m_old, mx);
            var corr = 1.0;
            var sum = 0.0;
            if (m_new > NEG) {
                corr = exp(m_old - m_new);
            }
            for (var jj = 0u; jj < TILE; jj = jj + 1u) {
                let x = ps[lid * TILE + jj];
                var e = 0.0;
                if (x > NEG) {
                    e = exp(x - m_new);
                }
                ps[lid * TILE + jj] = e;
                sum = sum + e;
            }
            row_m[lid] = m_new;
            row_l[lid] = row_l[lid] * corr + sum;
            row_c[lid] = corr;
        }
        workgroupBarrier();
        // P.V: head-dim columns lid and lid + TILE.
        let n = min(TILE, j_end - j0);
        for (var i = 0u; i < 2u; i = i + 1u) {
            let col = lid + i * TILE;
            if (col < d) {
                for (var r = 0u; r < rows; r = r + 1u) {
                    acc[2u * r + i] = acc[2u * r + i] * row_c[r];
                }
                for (var jj = 0u; jj < n; jj = jj + 1u) {
                    let vv = f32(v[kv_index(b, j0 + jj, g) + col]);
                    for (var r = 0u; r < rows; r = r + 1u) {
                        acc[2u * r + i] = acc[2u * r + i] + ps[r * TILE + jj] * vv;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    let base = gi * rows;
    for (var i = 0u; i < 2u; i = i + 1u) {
        let col = lid + i * TILE;
        if (col < d) {
            for (var r = 0u; r < rows; r = r + 1u) {
                part_o[(base + r) * d + col] = acc[2u * r + i];
            }
        }
    }
    if (lid < rows) {
        part_ml[2u * (base + lid)] = row_m[lid];
        part_ml[2u * (base + lid) + 1u] = row_l[lid];
    }
}

@compute @workgroup_size(64)
fn decode_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let per = p.heads / p.kv_heads;
    let rows = per * p.q_len;
    let gi = wid.y * nwg.x + wid.x;
    if (gi >= p.batch * p.kv_heads * rows) {
        return;
    }
    let r = gi % rows;
    let g = (gi / rows) % p.kv_heads;
    let b = gi / (rows * p.kv_heads);
    let n_chunks = chunks();
    let first = (b * p.kv_heads + g) * n_chunks; // the part of chunk 0
    var m = NEG;
    for (var c = 0u; c < n_chunks; c = c + 1u) {
        m = max(m, part_ml[2u * ((first + c) * rows + r)]);
    }
    var l = 0.0;
    for (var c = 0u; c < n_chunks; c = c + 1u) {
        let at = 2u * ((first + c) * rows + r);
        if (part_ml[at] > NEG) {
            l = l + part_ml[at + 1u] * exp(part_ml[at] - m);
        }
    }
    var inv = 0.0;
    if (l > 0.0) {
        inv = 1.0 / l;
    }
    let t = r % p.q_len;
    let h = g * per + r / p.q_len;
    let qi = q_index(b, t, h);
    let d = p.head_dim;
    for (var col = lid; col < d; col = col + TILE) {
        var x = 0.0;
        for (var c = 0u; c < n_chunks; c = c + 1u) {
            let at = (first + c) * rows + r;
            let mc = part_ml[2u * at];
            if (mc > NEG) {
                x = x + part_o[at * d + col] * exp(mc - m);
            }
        }
        o[qi + col] = T(x * inv);
    }
    if (lid == 0u) {
        let row = (b * p.q_len + t) * p.heads + h;
        if (l > 0.0) {
            stats[2u * row] = m + log(l);
        } else {
            stats[2u * row] = NEG;
        }
    }
}
