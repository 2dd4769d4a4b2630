// Casts between f32, f16 and bf16 storage, bit-exact with round to nearest even (the `half`
// crate's conversions; NaN stays a quiet NaN). Conversions are integer arithmetic on the bit
// patterns, so the result does not depend on how a driver rounds or flushes; no f16 shader
// feature is needed. Buffers are words: f32 one element per word, f16 / bf16 two per word
// (element 2i in the low half).
//
// Launch: one invocation per pair of elements (2i, 2i + 1), workgroups of 256 over a grid of
// (min(groups, 65535), ceil(groups / 65535)). A 16-bit output word is written whole, so no two
// invocations share a word; an f32 output is written only below n.

struct Params {
    n: u32,
    // 0: f32, 1: f16, 2: bf16
    src_type: u32,
    dst_type: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if e == 0u {
        // Zero or subnormal: m * 2^-24, exact in f32.
        let v = f32(m) * bitcast<f32>(0x33800000u);
        return select(v, -v, sign != 0u);
    }
    if e == 31u {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn f32_to_f16(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let a = x & 0x7fffffffu;
    if a > 0x7f800000u {
        return sign | 0x7e00u | ((a >> 13u) & 0x3ffu); // NaN, quiet
    }
    if a >= 0x477ff000u {
        return sign | 0x7c00u; // 65520 and up (and infinity) round to infinity
    }
    if a >= 0x38800000u {
        // Normal in f16: rebias the exponent (127 -> 15), round 23 mantissa bits to 10; a carry
        // out of the mantissa moves into the exponent, as it should.
        let r = a - 0x38000000u;
        return sign | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
    }
    if a <= 0x33000000u {
        return sign; // at most 2^-25: rounds to zero (2^-25 is a tie, to even)
    }
    // Subnormal in f16: the value in units of 2^-24, rounded to nearest even.
    let e = a >> 23u;
    let m = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - e;
    var h = m >> shift;
    let rem = m & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if rem > half || (rem == half && (h & 1u) == 1u) {
        h = h + 1u;
    }
    return sign | h;
}

fn f32_to_bf16(x: u32) -> u32 {
    if (x & 0x7fffffffu) > 0x7f800000u {
        return (x >> 16u) | 0x40u; // NaN, quiet
    }
    return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
}

// Element e of the source as f32 bits (0 past n).
fn load(e: u32) -> u32 {
    if e >= p.n {
        return 0u;
    }
    if p.src_type == 0u {
        return src[e];
    }
    let h = (src[e / 2u] >> (16u * (e % 2u))) & 0xffffu;
    if p.src_type == 1u {
        return bitcast<u32>(f16_to_f32(h));
    }
    return h << 16u;
}

fn narrow(x: u32) -> u32 {
    if p.dst_type == 1u {
        return f32_to_f16(x);
    }
    return f32_to_bf16(x);
}

@compute @workgroup_size(256)
fn convert(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 2u * i;
    if e >= p.n {
        return;
    }
    let lo = load(e);
    let hi = load(e + 1u);
    if p.dst_type == 0u {
        dst[e] = lo;
        if e + 1u < p.n {
            dst[e + 1u] = hi;
        }
    } else {
        dst[i] = narrow(lo) | (narrow(hi) << 16u);
    }
}
