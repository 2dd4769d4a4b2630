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
// Element types: TA for A1 and A2, TB for B1, B2 and the bias, TC for C, declared by the
// aliases of `gemm_params.wgsli` (f32 as written; the launcher rewrites them and prepends `enable
// f16;`: all three f16 for the activations in half precision; TA, TB f16 with TC f32 for dA and
// dB of f32 master weights and f32 logits; TB alone f16 for f32 gradients against an f16
// weight). Accumulation is always f32.
//
// The tile loop, its launch and its loads are `gemm_tile.wgsli`'s.

#include "gemm_tile.wgsli"

@group(0) @binding(1) var<storage, read> a1: array<TA>;
@group(0) @binding(2) var<storage, read> b1: array<TB>;
@group(0) @binding(3) var<storage, read> a2: array<TA>;
@group(0) @binding(4) var<storage, read> b2: array<TB>;
@group(0) @binding(5) var<storage, read> bias: array<TB>;
@group(0) @binding(6) var<storage, read_write> c: array<TC>;

fn load_b(l: u32, j: u32, second: bool) -> f32 {
    if (j >= p.n) {
        return 0.0;
    }
    if (second) {
        return select(0.0, f32(b2[l * p.b2_rs + j * p.b2_cs]), l < p.k2);
    }
    return select(0.0, f32(b1[l * p.b1_rs + j * p.b1_cs]), l < p.k1);
}

// Both products into one accumulator (forward Y, backward dX).
@compute @workgroup_size(16, 16)
fn lora_gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    gemm_tile(wid, lid, p.k2);
}

// The first product only (XA, G, dA, dB); a2 and b2 must still be bound.
@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    gemm_tile(wid, lid, 0u);
}
