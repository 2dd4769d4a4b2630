// Tiled f32 GEMM with the LoRA term fused into the output tile (the WGSL half of
// `src/kernels/lora.rs`):
//
//   C[M,N] = s1 * op(A1)[M,K1] . op(B1)[K1,N]  +  s2 * op(A2)[M,K2] . op(B2)[K2,N]  (+ bias[N])
//
// Every operand is addressed through (row stride, column stride), op(A1)[i,l] =
// a1[i*a1_rs + l*a1_cs], so one body serves each product of the LoRA linear:
//   forward  Y  = X.W^T + s.XA.B^T (+ bias): A1 = X, B1 = W^T, A2 = XA, B2 = B^T   (lora_gemm)
//            XA = X~.A^T                                                          (gemm)
//   backward G  = dY.B;  dA = s.G^T.X~;  dB = s.dY^T.XA                           (gemm)
//            dX = dY.W + s.G.A: A1 = dY, B1 = W, A2 = G, B2 = A                  (lora_gemm)
// The K loop runs over K1 and then K2 tiles into the same accumulators, so C is written once
// and W is read once per output tile.
//
// Element types: TA for A1 and A2, TB for B1, B2 and the bias, TC for C, declared by the
// aliases below (f32 as written; the launcher rewrites them and prepends `enable f16;`: all
// three f16 for the activations in half precision; TA, TB f16 with TC f32 for dA and dB of f32
// master weights and f32 logits; TB alone f16 for f32 gradients against an f16 weight).
// Accumulation is always f32.
//
// Launch: workgroup 16x16 owns a 64x64 tile of C, each invocation the 4x4 block at rows
// 4*ty .. 4*ty + 4, cols 4*tx .. 4*tx + 4, held as 4 vec4 accumulators (a row each). K steps of
// 16 staged in workgroup memory as vec4s (2 x 4 KiB): per step of K an invocation reads one vec4
// of A (4 rows, the same for the 16 invocations of a row of the workgroup) and one of B (its 4
// columns; neighbours read neighbouring 16 bytes), then makes 4 vec4 multiply-adds. (Before:
// strided 4x4 blocks of scalars, 8 reads for 16 multiply-adds: 1.9-2.3x slower on lavapipe.) Each
// output sums its K terms in the same order either way. grid = (ceil(N/64), ceil(M/64)). Any
// M, N, K: loads past an edge read 0, stores past an edge are skipped. No subgroup operations.

struct Params {
    m: u32,
    n: u32,
    k1: u32,
    k2: u32,
    a1_rs: u32,
    a1_cs: u32,
    b1_rs: u32,
    b1_cs: u32,
    a2_rs: u32,
    a2_cs: u32,
    b2_rs: u32,
    b2_cs: u32,
    s1: f32,
    s2: f32,
    // bit 0: add bias[N]; bit 1: accumulate, C += (the sum above) instead of C = .
    flags: u32,
    _pad: u32,
}

alias TA = f32;
alias TB = f32;
alias TC = f32;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a1: array<TA>;
@group(0) @binding(2) var<storage, read> b1: array<TB>;
@group(0) @binding(3) var<storage, read> a2: array<TA>;
@group(0) @binding(4) var<storage, read> b2: array<TB>;
@group(0) @binding(5) var<storage, read> bias: array<TB>;
@group(0) @binding(6) var<storage, read_write> c: array<TC>;

// a_tile[l][q][c] = op(A)[row0 + 4q + c, k0 + l]; b_tile[l][q][c] = op(B)[k0 + l, col0 + 4q + c].
var<workgroup> a_tile: array<array<vec4<f32>, 16>, 16>;
var<workgroup> b_tile: array<array<vec4<f32>, 16>, 16>;

fn load_a(i: u32, l: u32, second: bool) -> f32 {
    if (i >= p.m) {
        return 0.0;
    }
    if (second) {
        return select(0.0, p.s2 * f32(a2[i * p.a2_rs + l * p.a2_cs]), l < p.k2);
    }
    return select(0.0, p.s1 * f32(a1[i * p.a1_rs + l * p.a1_cs]), l < p.k1);
}

fn load_b(l: u32, j: u32, second: bool) -> f32 {
    if (j >= p.n) {
        return 0.0;
    }
    if (second) {
        return select(0.0, f32(b2[l * p.b2_rs + j * p.b2_cs]), l < p.k2);
    }
    return select(0.0, f32(b1[l * p.b1_rs + j * p.b1_cs]), l < p.k1);
}

fn body(wid: vec3<u32>, lid: vec3<u32>, k2: u32) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let tx = lid.x;
    let ty = lid.y;
    let t = ty * 16u + tx;
    var acc: array<vec4<f32>, 4>;
    let tiles1 = (p.k1 + TK - 1u) / TK;
    let tiles = tiles1 + (k2 + TK - 1u) / TK;
    for (var kt = 0u; kt < tiles; kt++) {
        let second = kt >= tiles1;
        let k0 = select(kt * TK, (kt - tiles1) * TK, second);
        // 1024 elements per tile, 4 per invocation: element e = t + 256*q is (l = e / 64,
        // i = e % 64), so neighbouring invocations read neighbouring rows / columns.
        for (var q = 0u; q < 4u; q++) {
            let e = t + 256u * q;
            let l = e / 64u;
            let x = e % 64u;
            a_tile[l][x / 4u][x % 4u] = load_a(row0 + x, k0 + l, second);
            b_tile[l][x / 4u][x % 4u] = load_b(k0 + l, col0 + x, second);
        }
        workgroupBarrier();
        for (var l = 0u; l < TK; l++) {
            let av = a_tile[l][ty];
            let bv = b_tile[l][tx];
            for (var i = 0u; i < 4u; i++) {
                acc[i] += av[i] * bv;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + 4u * ty + i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + 4u * tx + j;
            if (r < p.m && col < p.n) {
                var v = acc[i][j];
                if ((p.flags & 1u) != 0u) {
                    v += f32(bias[col]);
                }
                if ((p.flags & 2u) != 0u) {
                    v += f32(c[r * p.n + col]);
                }
                c[r * p.n + col] = TC(v);
            }
        }
    }
}

// Both products into one accumulator (forward Y, backward dX).
@compute @workgroup_size(16, 16)
fn lora_gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    body(wid, lid, p.k2);
}

// The first product only (XA, G, dA, dB); a2 and b2 must still be bound.
@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    body(wid, lid, 0u);
}
