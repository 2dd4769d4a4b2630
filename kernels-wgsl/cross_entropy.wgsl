// Cross-entropy of logits z [M, V] against targets [M] (i32; rows whose target is the ignore
// index are skipped), f32, in three entry points (and a fourth, argmax_rows, at the end):
//
//   ce_rows: lse[m] = max_v z + log Σ_v exp(z[m, v] - max), row_loss[m] = lse[m] - z[m, t_m]
//            (0 on ignored rows)
//   ce_mean: loss[0] = Σ_m row_loss[m] / C, C = counted rows (given; loss 0 when C = 0)
//   ce_bwd:  dz[m, v] = dy / C * (exp(z[m, v] - lse[m]) - [v == t_m]), 0 on ignored rows
//
// Launch: ce_rows, ce_bwd and argmax_rows one workgroup of 256 per row over a grid of (min(M, 65535),
// ceil(M / 65535)), striding over V; ce_mean one workgroup. Reductions are trees in workgroup
// memory, so no subgroup size is assumed.

struct Params {
    rows: u32,
    vocab: u32,
    ignore: i32,
    count: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;   // ce_mean: loss [1]; ce_bwd: dz [M, V]
@group(0) @binding(6) var<storage, read> dy: array<f32>;          // ce_bwd: [1]
@group(0) @binding(7) var<storage, read_write> best: array<u32>;   // argmax_rows: [M]

var<workgroup> sh: array<f32, 256>;
// The row's target, loaded once and made workgroup-uniform (the barriers below need uniform
// control flow).
var<workgroup> row_target: i32;

fn row_of(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

// Tree reduction of sh[0..256] by max (op 0) or sum (op 1); every invocation gets the result.
fn reduce(lid: u32, v: f32, op: u32) -> f32 {
    sh[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            if op == 0u {
                sh[lid] = max(sh[lid], sh[lid + s]);
            } else {
                sh[lid] = sh[lid] + sh[lid + s];
            }
        }
        workgroupBarrier();
    }
    let r = sh[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn ce_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = row_of(wg, nwg);
    if m >= p.rows {
        return;
    }
    if lid == 0u {
        row_target = targets[m];
    }
    let t = workgroupUniformLoad(&row_target);
    if t == p.ignore {
        if lid == 0u {
            lse[m] = 0.0;
            row_loss[m] = 0.0;
        }
        return;
    }
    let base = m * p.vocab;
    var mx = -3.402823e38;
    for (var v = lid; v < p.vocab; v = v + WG) {
        mx = max(mx, z[base + v]);
    }
    mx = reduce(lid, mx, 0u);
    var s = 0.0;
    for (var v = lid; v < p.vocab; v = v + WG) {
        s = s + exp(z[base + v] - mx);
    }
    s = reduce(lid, s, 1u);
    if lid == 0u {
        let l = mx + log(s);
        lse[m] = l;
        row_loss[m] = l - z[base + u32(t)];
    }
}

@compute @workgroup_size(256)
fn ce_mean(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var m = lid; m < p.rows; m = m + WG) {
        s = s + row_loss[m];
    }
    s = reduce(lid, s, 1u);
    if lid == 0u {
        out[0] = select(0.0, s / f32(p.count), p.count > 0u);
    }
}

@compute @workgroup_size(256)
fn ce_bwd(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = row_of(wg, nwg);
    if m >= p.rows {
        return;
    }
    let t = targets[m];
    let base = m * p.vocab;
    if t == p.ignore || p.count == 0u {
        for (var v = lid; v < p.vocab; v = v + WG) {
            out[base + v] = 0.0;
        }
        return;
    }
    let scale = dy[0] / f32(p.count);
    let l = lse[m];
    for (var v = lid; v < p.vocab; v = v + WG) {
        out[base + v] = scale * (exp(z[base + v] - l) - select(0.0, 1.0, v == u32(t)));
    }
}

// argmax_rows: best[m] = the first v where z[m, v] is the row's largest number, NaNs skipped,
// and 0 when z[m, 0] is NaN or the row holds none (the CPU's greedy sampler's rule). NaN is
// told by its bits: WGSL lets a compiler assume that comparisons see no NaN.
const NONE: u32 = 0xffffffffu;
var<workgroup> best_i: array<u32, 256>;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

@compute @workgroup_size(256)
fn argmax_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = row_of(wg, nwg);
    // Rows past M (the grid's last line) join the barriers and write nothing.
    let live = m < p.rows;
    var bv = 0.0;
    var bi = NONE;
    if live {
        // This invocation's first largest number of its columns (visited in order).
        let base = m * p.vocab;
        for (var v = lid; v < p.vocab; v = v + WG) {
            let x = z[base + v];
            if !is_nan(x) && (bi == NONE || x > bv) {
                bv = x;
                bi = v;
            }
        }
    }
    sh[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    // A tree over the invocations: the larger number wins, a tie goes to the lower column.
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            let ov = sh[lid + s];
            let oi = best_i[lid + s];
            if oi != NONE && (best_i[lid] == NONE || ov > sh[lid] || (ov == sh[lid] && oi < best_i[lid])) {
                sh[lid] = ov;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    if live && lid == 0u {
        var r = best_i[0];
        if r == NONE || is_nan(z[m * p.vocab]) {
            r = 0u;
        }
        best[m] = r;
    }
}
