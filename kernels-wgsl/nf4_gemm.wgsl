// NF4 weights on wgpu (the WGSL half of `src/kernels/nf4.rs`): dequantization, and the LoRA
// GEMM of `lora_gemm.wgsl` with the frozen weight W [N,K] stored as NF4 and dequantized while
// its tile is loaded (never written out in full).
//
// NF4 layout (bitsandbytes): flat element e of W has its 4-bit code in byte e/2 of `packed`
// (high nibble for even e), block b = e/64 has an 8-bit index q_b into the dynamic map, and
//   a_b = map[q_b] * absmax2[b/256] + offset,   w_e = NF4[code_e] * a_b      (f32, in this
// order, as `nf4::cpu::dequantize` computes it). Bytes are read out of u32 words (little end
// first). `tables` holds the 256 dynamic-map values followed by the 16 NF4 values, uploaded
// from the crate's own tables so the shader and the CPU use the same f32 numbers.
//
// nf4_dequant: one invocation per element, 256 per workgroup, grid (x, y) with the linear
// workgroup index y * num_workgroups.x + x (past 65535 workgroups).
// nf4_lora_gemm: `lora_gemm`'s tile loop (`gemm_tile.wgsli`: 64x64 tile, 16x16 invocations, 4x4
// each in vec4s, K step 16) with op(B1)[l, j] = W_flat[l * b1_rs + j * b1_cs]: b1_rs = 1,
// b1_cs = K for the forward (Y = X.W^T + s.XA.B^T), b1_rs = K, b1_cs = 1 for dX = dY.W + s.G.A.
// The forward's tile loads take neighbouring k of W's rows, so neighbouring invocations decode
// neighbouring codes of one byte and one block.
//
// Element types as in `lora_gemm.wgsl`: TA for A1 and A2, TB for B2 and the bias, TC for C
// (f32 as written; the launcher rewrites the aliases and prepends `enable f16;` for an f16
// model). W is dequantized in f32 and the tiles and accumulators stay f32 whatever the aliases.

#include "gemm_tile.wgsli"

@group(0) @binding(1) var<storage, read> a1: array<TA>;
@group(0) @binding(2) var<storage, read> packed: array<u32>;
@group(0) @binding(3) var<storage, read> absmax: array<u32>;
@group(0) @binding(4) var<storage, read> absmax2: array<f32>;
@group(0) @binding(5) var<storage, read> tables: array<f32>;
@group(0) @binding(6) var<storage, read> a2: array<TA>;
@group(0) @binding(7) var<storage, read> b2: array<TB>;
@group(0) @binding(8) var<storage, read> bias: array<TB>;
@group(0) @binding(9) var<storage, read_write> c: array<TC>;

#include "nf4_decode.wgsli"

@compute @workgroup_size(256)
fn nf4_dequant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = (wid.y * groups.x + wid.x) * 256u + lid;
    if (e < p.len) {
        c[e] = TC(nf4_at(e));
    }
}

fn load_b(l: u32, j: u32, second: bool) -> f32 {
    if (j >= p.n) {
        return 0.0;
    }
    if (second) {
        return select(0.0, f32(b2[l * p.b2_rs + j * p.b2_cs]), l < p.k2);
    }
    if (l >= p.k1) {
        return 0.0;
    }
    return nf4_at(l * p.b1_rs + j * p.b1_cs);
}

// Both products into one accumulator (forward Y, backward dX), W in NF4.
@compute @workgroup_size(16, 16)
fn nf4_lora_gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    gemm_tile(wid, lid, p.k2);
}
