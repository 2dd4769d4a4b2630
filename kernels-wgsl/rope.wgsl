// Rotary position embedding (Hugging Face rotate_half: element i of a head pairs with i + D/2),
// forward and backward in one entry point, f32.
//
//   f_i = p_t * inv_freq[i]  (an f32 product, as the CPU path and transformers compute it)
//   s   = +1 forward, -1 backward (the backward is the transposed rotation)
//   y[i]       = x[i] * cos f_i - x[i + D/2] * s * sin f_i
//   y[i + D/2] = x[i + D/2] * cos f_i + x[i] * s * sin f_i
//
// Shapes: x, y [T, H, D] row-major; positions [T] i32; inv_freq [D/2] f32.
// Launch: one workgroup of 256 per token; the token index is wid.y * num_workgroups.x + wid.x
// (a 2-D grid when T > 65535). Invocations stride over the token's H * D/2 pairs.
// cos/sin come from `rope_sincos` (the same code as rope.cu), not the builtins: WGSL only
// bounds sin/cos to 2^-11 absolute on [-pi, pi] and not at all outside it, and RoPE angles
// reach the sequence length in radians.

struct Params {
    tokens: u32,
    heads: u32,
    half: u32,
    sign: f32,
}

const WG: u32 = 256u;

alias T = f32;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<T>;

// (sin a, cos a) within 1.3e-7 absolute for |a| <= 2^20. Cody-Waite reduction by pi/2 with
// pi/2 in three 8-bit pieces and an f32 remainder, k split into kh (a multiple of 256, k
// truncated) and kl so each product is exact; cephes polynomials on |r| <= pi/4; the quadrant
// k mod 4 picks and signs them. See rope.cu for the derivation.
fn rope_sincos(a: f32) -> vec2<f32> {
    let P1 = 1.5703125;
    let P2 = 4.825592041015625e-4;
    let P3 = 1.2665987014770508e-6;
    let P4 = 9.920935184482005e-10;
    let k = round(a * 0.636619772367581343);
    let kh = trunc(k * (1.0 / 256.0)) * 256.0;
    let kl = k - kh;
    var r = a;
    r = r - kh * P1;
    r = r - kl * P1;
    r = r - kh * P2;
    r = r - kl * P2;
    r = r - kh * P3;
    r = r - kl * P3;
    r = r - k * P4;
    let z = r * r;
    let s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
    let c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
    switch (i32(k) & 3) {
        case 0: { return vec2<f32>(s, c); }
        case 1: { return vec2<f32>(c, -s); }
        case 2: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = wid.y * nwg.x + wid.x;
    if (t >= p.tokens) {
        return;
    }
    let pos = f32(positions[t]);
    let base = t * p.heads * 2u * p.half;
    for (var j = lid; j < p.heads * p.half; j = j + WG) {
        let h = j / p.half;
        let i = j - h * p.half;
        let sc = rope_sincos(pos * inv_freq[i]);
        let s = p.sign * sc.x;
        let c = sc.y;
        let o = base + h * 2u * p.half + i;
        let a = f32(x[o]);
        let b = f32(x[o + p.half]);
        y[o] = T(a * c - b * s);
        y[o + p.half] = T(b * c + a * s);
    }
}
