//! Scalar math for the CPU paths, written so loops over slices vectorise.
//!
//! `exp` here replaces `f32::exp` (a libm call per element, which no loop vectorises) in the
//! softmax, SiLU and cross-entropy paths. Method: `exp(x) = 2^n · exp(r)` with
//! `n = round(x / ln 2)` and `r = x - n·ln 2` in two parts (the first with few mantissa bits,
//! so `n·LN2_HI` is exact), `|r| <= ln(2)/2`; `exp(r)` by its Taylor series to degree 7, whose
//! truncation error `|r|^8 / 8! < 5e-9` is below f32's half ulp; `2^n` built from its bits.
//! Results for `x < -87.3` (below f32's normal range) are flushed to 0, and `x > 88.7` gives
//! infinity. Tested against f64 `exp` in `tests`, within 2 ulp.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split: `LN2_HI` has 9 significant bits, so `n · LN2_HI` is exact for |n| <= 2^15.
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds an f32 of magnitude below 2^22 to an integer (ties to even)
/// and leaves that integer in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series of exp(r) to degree 7, Horner form.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // n sits in the low bits of `shifted`; 2^n as an f32 is (n + 127) << 23.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = p * scale;
    // Outside the clamped range: 0 below, infinity above; NaN stays NaN through `p`.
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// Whether this CPU has AVX-512F (checked once), for the CPU paths that run wider code there.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Whether this CPU has AVX2 (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// `fn $name(args) -> ret` running `$inner` (an `#[inline(always)]` loop written to
/// vectorise) compiled for AVX-512F or AVX2 where the CPU has them, else for the crate's
/// baseline (SSE2 on x86-64): 16 or 8 lanes instead of 4, the same operations in the same
/// order, so the same bits on every CPU (Rust does not contract `a * b + c` into a fused
/// multiply-add).
macro_rules! wide {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $inner:path) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                if $crate::kernels::math::avx512() {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::kernels::math::avx2() {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use wide;

wide! {
    /// `x[i] = exp(x[i] - shift)` over a slice, then their sum (in eight lanes, so the adds
    /// pipeline and vectorise; the order is fixed, so results do not vary between runs), in
    /// the CPU's widest vectors (`wide!`).
    pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 = exp_shifted_sum_lanes
}

wide! {
    /// The largest element (`f32::max`'s: NaN only where every element is; negative infinity
    /// for none), in the CPU's widest vectors.
    pub fn max(x: &[f32]) -> f32 = max_lanes
}

wide! {
    /// `x[i] *= s`, in the CPU's widest vectors.
    pub fn scale(x: &mut [f32], s: f32) = scale_lanes
}

wide! {
    /// `Σ a[i]·b[i]` in sixteen lanes summed in order at the end: the same order (and bits) on
    /// every CPU, in its widest vectors.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 = dot_lanes
}

/// The first index of the largest element, NaNs skipped (0 when `x[0]` is NaN or `x` is
/// empty): `cross_entropy::reference::argmax`'s rule, whose loop carries a dependency through
/// the best value so far, found here in two passes that vectorise: the maximum, then its first
/// position. 22 µs against 86 over a row of 128,256 (`sampling/cpu/greedy`, a 2-core AVX-512
/// machine).
pub fn argmax(x: &[f32]) -> usize {
    let m = max(x);
    match x.first() {
        Some(first) if !first.is_nan() => x.iter().position(|&v| v == m).unwrap_or(0),
        _ => 0,
    }
}

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[inline(always)]
fn scale_lanes(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v *= s;
    }
}

#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn exp_shifted_sum_lanes(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    let mut lanes = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        ((a - b32).abs() / (b32.abs() * f32::EPSILON).max(f32::MIN_POSITIVE)) as f64
    }

    #[test]
    fn exp_within_two_ulp_of_f64_on_a_dense_sweep() {
        let mut worst = (0.0f64, 0.0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.0 + (88.0 + 87.0) * i as f32 / n as f32;
            let e = ulps(exp(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 2.0, "exp({}) is {} ulp from f64", worst.1, worst.0);
    }

    #[test]
    fn the_wide_exp_sum_is_the_baseline_one() {
        // exp_shifted_sum on AVX-512 or AVX2 (where this CPU has them) against the same loop
        // compiled for the crate's baseline: the same values and sum, bit for bit, over a
        // length with a remainder past every lane width and inputs across exp's range.
        let x: Vec<f32> = (0..1037).map(|i| -100.0 + 180.0 * ((i * 7919) % 1037) as f32 / 1037.0).collect();
        for shift in [0.0f32, 3.5, 60.0] {
            let (mut wide, mut base) = (x.clone(), x.clone());
            let (sw, sb) = (exp_shifted_sum(&mut wide, shift), exp_shifted_sum_lanes(&mut base, shift));
            assert!(sw.is_finite() && sw > 0.0, "shift {shift}: {sw}");
            assert_eq!(sw.to_bits(), sb.to_bits(), "sum, shift {shift}");
            assert_eq!(wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), base.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "values, shift {shift}");
        }
    }

    #[test]
    fn max_scale_and_dot_match_plain_loops() {
        let a: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1037) as f32 / 1037.0 - 0.5).collect();
        let b: Vec<f32> = (0..1037).map(|i| ((i * 31) % 1037) as f32 / 1037.0 - 0.25).collect();
        for len in [0, 1, 15, 16, 17, 1037] {
            let (a, b) = (&a[..len], &b[..len]);
            assert_eq!(max(a), a.iter().cloned().fold(f32::NEG_INFINITY, f32::max), "max of {len}");
            let want: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(a, b) as f64 - want).abs() <= 1e-5, "dot of {len}: {} vs {want}", dot(a, b));
            assert_eq!(dot(a, b).to_bits(), dot_lanes(a, b).to_bits(), "dot of {len}: wide vs baseline");
            let mut s = a.to_vec();
            scale(&mut s, 0.3);
            assert_eq!(s, a.iter().map(|v| v * 0.3).collect::<Vec<_>>());
        }
        assert_eq!(max(&[f32::NAN, 2.0, f32::NAN]), 2.0);
    }

    #[test]
    fn argmax_picks_as_the_reference_rule() {
        use crate::kernels::cross_entropy::reference::argmax as rule;
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let rows: [&[f32]; 10] = [
            &[],
            &[1.0, 3.0, 3.0, 2.0],
            &[nan, 5.0, 1.0],
            &[1.0, nan, 5.0, nan, 5.0],
            &[nan, nan],
            &[-inf, -inf, -inf],
            &[-0.0, 0.0, -1.0],
            &[0.0, -0.0],
            &[2.0, inf, 3.0, inf],
            &[-3.0, -2.5, -2.5],
        ];
        for row in rows {
            assert_eq!(argmax(row), rule(row), "{row:?}");
        }
        // Long rows, the maximum in the vector body, in the remainder and tied across both.
        let mut long: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1037) as f32 / 1037.0).collect();
        for (at, also) in [(3, None), (1030, None), (17, Some(1035)), (0, Some(500))] {
            long[at] = 2.0;
            if let Some(j) = also {
                long[j] = 2.0;
            }
            assert_eq!(argmax(&long), rule(&long), "maximum at {at} (and {also:?})");
            long[at] = 0.5;
            if let Some(j) = also {
                long[j] = 0.5;
            }
        }
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // Whole multiples of ln 2 land on powers of two.
        assert!(ulps(exp(10.0 * std::f32::consts::LN_2), 1024.0) <= 1.0);
    }
}
