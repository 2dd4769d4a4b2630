// NF4 quantization on the device: the two passes over the weights of `nf4::wgsl::quantize`.
// The host does the rest (`nf4::finish_device_quantize`): each block's scale 1/absmax, the
// codes of a final partial block (the CPU divides there, and a shader's division need not
// round as the CPU's does), and the double quantization of the absmax values.
//
// nf4_absmax: absmax[b] = max |x[e]| over block b (64 elements; the last block may be short),
// one invocation per block.
// nf4_codes: word w of `packed` holds the codes of elements 8w .. 8w+7, two per byte, the
// first in the high nibble, bytes little end first (as `nf4_gemm.wgsl` reads them). The code
// of element e is the number of NF4 midpoints (`mids`, the host's f32 values) below
// clamp(x[e] * inv[e / 64], -1, 1): the nearest code, ties to the lower, with the CPU's f32
// arithmetic (one correctly rounded product, compares). Nibbles past `len` stay 0.
// x is f32 as written (TX; the launcher rewrites the alias to f16 for an f16 tensor).
// Grids: (x, y) with the linear workgroup index y * num_workgroups.x + x, 256 invocations each.

struct Params {
    len: u32,
    blocks: u32,
    _pad0: u32,
    _pad1: u32,
}

alias TX = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<TX>;
@group(0) @binding(2) var<storage, read_write> absmax: array<f32>;
@group(0) @binding(3) var<storage, read> inv: array<f32>;
@group(0) @binding(4) var<storage, read_write> packed: array<u32>;
@group(0) @binding(5) var<storage, read> mids: array<f32>;

@compute @workgroup_size(256)
fn nf4_absmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = (wid.y * groups.x + wid.x) * 256u + lid;
    if (b >= p.blocks) {
        return;
    }
    let end = min(p.len, b * 64u + 64u);
    var a = 0.0;
    for (var e = b * 64u; e < end; e++) {
        a = max(a, abs(f32(x[e])));
    }
    absmax[b] = a;
}

@compute @workgroup_size(256)
fn nf4_codes(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = (wid.y * groups.x + wid.x) * 256u + lid;
    if (w * 8u >= p.len) {
        return;
    }
    var word = 0u;
    for (var j = 0u; j < 8u; j++) {
        let e = w * 8u + j;
        if (e < p.len) {
            let s = clamp(f32(x[e]) * inv[e / 64u], -1.0, 1.0);
            var code = 0u;
            for (var i = 0u; i < 15u; i++) {
                code += select(0u, 1u, mids[i] < s);
            }
            word |= code << (8u * (j / 2u) + select(0u, 4u, j % 2u == 0u));
        }
    }
    packed[w] = word;
}
