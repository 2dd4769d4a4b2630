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

/// `x[i] = exp(x[i] - shift)` over a slice, then their sum (in eight lanes, so the adds
/// pipeline and vectorise; the order is fixed, so results do not vary between runs).
#[inline]
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
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
