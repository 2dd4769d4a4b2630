// LoRA dropout with the counter-based generator of `rng::uniform_at`, bit for bit: element i is
// kept when uniform_at(seed, i) >= p and then scaled by keep = 1 / (1 - p) (computed on the host
// in f32, as the CPU path does), so the mask is the same on every device for a given seed.
//
//   dropout:      y[i] = x[i] * keep           when kept, else 0
//   dropout_axpy: y[i] = base[i] + s * t[i] * keep   when kept, else base[i]
//                 (the dropped input's share of dX: dX = dY.W + s (dY.B.A) ∘ mask / (1 - p))
//
// uniform_at is splitmix64's finalizer over seed ^ i * 0x9e3779b97f4a7c15; WGSL has no 64-bit
// integers, so values are vec2<u32> (x: low word, y: high word) and the 64-bit products are
// built from 16-bit limbs. Launch: workgroups of 256 over a grid of (min(groups, 65535),
// ceil(groups / 65535)), one invocation per element (i < 2^32).

struct Params {
    len: u32,
    seed_lo: u32,
    seed_hi: u32,
    p: f32,
    keep: f32,
    s: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
// Storage types: TX for x and t, TY for y (f32 as written; the launcher makes f16 variants:
// both f16 for the dropped input of an f16 model, TY alone for dX from f32 products).
alias TX = f32;
alias TY = f32;

@group(0) @binding(1) var<storage, read> x: array<TX>;      // dropout: x | axpy: base
@group(0) @binding(2) var<storage, read> t: array<TX>;      // axpy: t
@group(0) @binding(3) var<storage, read_write> y: array<TY>;

// Full 64-bit product of two u32.
fn mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return vec2<u32>((p00 & 0xffffu) | (mid << 16u), p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u));
}

// Low 64 bits of a 64 x 64 product (wrapping, as Rust's wrapping_mul).
fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let p = mul32(a.x, b.x);
    return vec2<u32>(p.x, p.y + a.x * b.y + a.y * b.x);
}

// a >> s for 0 < s < 32.
fn shr64(a: vec2<u32>, s: u32) -> vec2<u32> {
    return vec2<u32>((a.x >> s) | (a.y << (32u - s)), a.y >> s);
}

fn uniform_at(i: u32) -> f32 {
    var z = vec2<u32>(prm.seed_lo, prm.seed_hi) ^ mul64(vec2<u32>(i, 0u), vec2<u32>(0x7f4a7c15u, 0x9e3779b9u));
    z = mul64(z ^ shr64(z, 30u), vec2<u32>(0x1ce4e5b9u, 0xbf58476du));
    z = mul64(z ^ shr64(z, 27u), vec2<u32>(0x133111ebu, 0x94d049bbu));
    z = z ^ shr64(z, 31u);
    // (z >> 40) as f32 / 2^24: the top 24 bits.
    return f32(z.y >> 8u) / 16777216.0;
}

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= prm.len {
        return;
    }
    y[i] = TY(select(0.0, f32(x[i]) * prm.keep, uniform_at(i) >= prm.p));
}

@compute @workgroup_size(256)
fn dropout_axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= prm.len {
        return;
    }
    let xi = f32(x[i]);
    y[i] = TY(select(xi, xi + prm.s * f32(t[i]) * prm.keep, uniform_at(i) >= prm.p));
}
