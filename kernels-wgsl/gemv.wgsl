// The LoRA forward for a few rows (M <= 16: decoding and tiny batches), the WGSL counterpart
// of the CUDA `gemv_*` kernels in `lora_gemm.cu`:
//
//   y[i, n] = sum_k x[i, k] W[n, k]  +  s2 * sum_r xa[i, r] B[n, r]  (+ bias[n])
//
// with W [N, K] dense (`gemv`) or NF4 (`nf4_gemv`, the bitsandbytes layout described in
// `nf4_gemm.wgsl`), xa [M, R], B [N, R] (R = p.k2, 0 for a plain linear). Where the 64x64 GEMM
// would compute 64 rows for these few and walk K with one workgroup per 64 columns, this takes
// 4 columns a workgroup and reads each weight once, multiplying it into every row.
//
// Launch: workgroup 64 = 4 output columns x 16 lanes. A lane strides over K so that the 16
// lanes of a column read neighbouring weights (dense: 4 weights a lane a step of 64, one from
// each quarter; NF4 with K % 8 == 0: one u32 of 8 codes a lane a step of 128, the 8 weights in
// one block of 64 and so under one scale; any other K, one weight at a time). Each lane keeps
// one f32 sum per row (MAXM of them, 16 or 1; rows past M stay 0), adds a step's 4 (8) products first
// and then into the row's sum (two-level, as the tiled attention does), then its share of the
// LoRA term (r = lane, lane + 16, ...). The 16 lanes' sums meet in workgroup memory after one
// barrier, and lane i of a column adds row i's 16 in lane order, the bias last, and stores it.
// Grid (x, y): column group (y * num_workgroups.x + x), so N may pass 65535 * 4 (an LM head).
// Element types as in `lora_gemm.wgsl` (TA: x and xa; TB: W, B and bias; TC: y); the launcher
// rewrites the aliases for f16. Sums are f32. No subgroup operations. Loops: K / 64 (NF4 with
// K % 8 == 0: K / 128) trips a lane, so lavapipe's limit of 65,535 per invocation is far off
// (right at K 1,048,576 and M 16 there).

#include "gemm_params.wgsli"

// Rows a lane keeps sums for (at most LANES: lane i finishes row i); the launcher rewrites it
// to 1 for a one-row instance (decoding), as the CUDA kernels have `gemv_m1_*`.
const MAXM: u32 = 16u;
const LANES: u32 = 16u;
const COLS: u32 = 4u;

@group(0) @binding(1) var<storage, read> x: array<TA>;
@group(0) @binding(2) var<storage, read> w: array<TB>;
@group(0) @binding(3) var<storage, read> xa: array<TA>;
@group(0) @binding(4) var<storage, read> bm: array<TB>;
@group(0) @binding(5) var<storage, read> bias: array<TB>;
@group(0) @binding(6) var<storage, read_write> y: array<TC>;
// NF4 W (`nf4_gemv` only): codes and absmax indices as bytes in u32 words (little end first),
// the second-level scales, the 256 dynamic-map values and then the 16 NF4 values.
@group(0) @binding(7) var<storage, read> packed: array<u32>;
@group(0) @binding(8) var<storage, read> absmax: array<u32>;
@group(0) @binding(9) var<storage, read> absmax2: array<f32>;
@group(0) @binding(10) var<storage, read> tables: array<f32>;

#include "nf4_decode.wgsli"

// part[t][i]: invocation t's sum for row i.
var<workgroup> part: array<array<f32, MAXM>, 64>;

// x[i, kk], 0 past K.
fn x_at(i: u32, kk: u32) -> f32 {
    return select(0.0, f32(x[i * p.k1 + kk]), kk < p.k1);
}

// x[i, kk .. kk + 4], all four inside K.
fn x4(i: u32, kk: u32) -> vec4<f32> {
    let e = i * p.k1 + kk;
    return vec4<f32>(f32(x[e]), f32(x[e + 1u]), f32(x[e + 2u]), f32(x[e + 3u]));
}

// Every row's sum gains its dot with the step's weights at k (4 per lane, one from each
// quarter of the step: kk, kk + 16, kk + 32, kk + 48).
fn add_quarters(acc: ptr<function, array<f32, MAXM>>, kk: u32, wv: vec4<f32>) {
    for (var i = 0u; i < MAXM; i++) {
        if (i < p.m) {
            let xv = vec4<f32>(x_at(i, kk), x_at(i, kk + LANES), x_at(i, kk + 2u * LANES), x_at(i, kk + 3u * LANES));
            (*acc)[i] += dot(xv, wv);
        }
    }
}

// The LoRA term's share of lane `lane` for column `col`: s2 * xa[i, r] * B[col, r].
fn add_lora(acc: ptr<function, array<f32, MAXM>>, col: u32, lane: u32) {
    for (var r0 = 0u; r0 < p.k2; r0 += LANES) {
        let r = r0 + lane;
        if (r < p.k2) {
            let bv = p.s2 * f32(bm[col * p.k2 + r]);
            for (var i = 0u; i < MAXM; i++) {
                if (i < p.m) {
                    (*acc)[i] += f32(xa[i * p.k2 + r]) * bv;
                }
            }
        }
    }
}

// The lanes' sums meet; lane i of each column stores row i. Called by every invocation.
fn finish(acc: ptr<function, array<f32, MAXM>>, col: u32, t: u32) {
    for (var i = 0u; i < MAXM; i++) {
        part[t][i] = (*acc)[i];
    }
    workgroupBarrier();
    let i = t % LANES;
    if (col < p.n && i < p.m) {
        let first = t - i;
        var v = 0.0;
        for (var l = 0u; l < LANES; l++) {
            v += part[first + l][i];
        }
        if ((p.flags & 1u) != 0u) {
            v += f32(bias[col]);
        }
        y[i * p.n + col] = TC(v);
    }
}

fn column(wid: vec3<u32>, groups: vec3<u32>, t: u32) -> u32 {
    return (wid.y * groups.x + wid.x) * COLS + t / LANES;
}

// x against a dense W.
@compute @workgroup_size(64)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let col = column(wid, groups, t);
    let lane = t % LANES;
    var acc: array<f32, MAXM>;
    if (col < p.n) {
        let row = col * p.k1;
        for (var k0 = 0u; k0 < p.k1; k0 += 4u * LANES) {
            let kk = k0 + lane;
            var wv = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j++) {
                let kj = kk + j * LANES;
                if (kj < p.k1) {
                    wv[j] = f32(w[row + kj]);
                }
            }
            add_quarters(&acc, kk, wv);
        }
        add_lora(&acc, col, lane);
    }
    finish(&acc, col, t);
}

// x against an NF4 W.
@compute @workgroup_size(64)
fn nf4_gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let col = column(wid, groups, t);
    let lane = t % LANES;
    var acc: array<f32, MAXM>;
    if (col < p.n) {
        let row = col * p.k1;
        if (p.k1 % 8u == 0u) {
            // Rows start on a word: a lane decodes 8 weights of one block from one u32.
            for (var k0 = 0u; k0 < p.k1; k0 += 8u * LANES) {
                let kk = k0 + 8u * lane;
                if (kk < p.k1) {
                    let word = packed[(row + kk) / 8u];
                    let a = block_scale((row + kk) / 64u);
                    let lo = vec4<f32>(code_value(word, 0u), code_value(word, 1u), code_value(word, 2u), code_value(word, 3u)) * a;
                    let hi = vec4<f32>(code_value(word, 4u), code_value(word, 5u), code_value(word, 6u), code_value(word, 7u)) * a;
                    for (var i = 0u; i < MAXM; i++) {
                        if (i < p.m) {
                            acc[i] += dot(x4(i, kk), lo) + dot(x4(i, kk + 4u), hi);
                        }
                    }
                }
            }
        } else {
            for (var k0 = 0u; k0 < p.k1; k0 += 4u * LANES) {
                let kk = k0 + lane;
                var wv = vec4<f32>(0.0);
                for (var j = 0u; j < 4u; j++) {
                    let kj = kk + j * LANES;
                    if (kj < p.k1) {
                        wv[j] = nf4_at(row + kj);
                    }
                }
                add_quarters(&acc, kk, wv);
            }
        }
        add_lora(&acc, col, lane);
    }
    finish(&acc, col, t);
}
