//! Sampling rules: greedy ties, top-k, top-p, temperature and seeds.

use tuna::nn::{GenerateOptions, Sampler};
use tuna::testing::sampling::nucleus;

fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
    Sampler::new(GenerateOptions { temperature, top_k, top_p, seed, ..Default::default() }).unwrap()
}

#[test]
fn greedy_takes_the_first_maximum() {
    let mut s = sampler(0.0, 0, 1.0, 0);
    assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0]), 1);
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    let logits = [0.3, 1.5, 1.2, -0.7, 1.49];
    for seed in 0..50 {
        assert_eq!(sampler(1.0, 1, 1.0, seed).sample(&logits), 1);
        assert_eq!(sampler(1.0, 0, 1e-6, seed).sample(&logits), 1);
    }
}

#[test]
fn top_k_never_leaves_the_k_best() {
    let logits = [3.0, 2.9, -5.0, 2.8, 0.0, 2.95];
    let mut s = sampler(5.0, 3, 1.0, 42);
    for _ in 0..500 {
        let t = s.sample(&logits);
        assert!([0, 5, 1].contains(&t), "{t} is not among the 3 best");
    }
}

#[test]
fn sampling_follows_the_softmax_and_the_seed() {
    // Two tokens with p = 0.8 / 0.2 at temperature 1: frequencies over many draws.
    let logits = [0.0, -(4.0f32).ln()];
    let mut s = sampler(1.0, 0, 1.0, 7);
    let n = 20_000;
    let ones = (0..n).filter(|_| s.sample(&logits) == 1).count() as f64 / n as f64;
    assert!((ones - 0.2).abs() < 0.015, "frequency of the 0.2 token: {ones}");
    let draw = |seed| {
        let mut s = sampler(1.0, 0, 1.0, seed);
        (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3), "same seed, same draws");
    assert_ne!(draw(3), draw(4));
}

#[test]
fn bad_options_are_errors() {
    assert!(Sampler::new(GenerateOptions { temperature: -1.0, ..Default::default() }).is_err());
    assert!(Sampler::new(GenerateOptions { top_p: 0.0, ..Default::default() }).is_err());
}

/// The sampling rule in f64, as it reads (`testing::sampling::nucleus`: every token sorted,
/// the k best kept, then the shortest head that weighs top_p of them), with the softmax at the
/// temperature. Returns (token, probability) pairs.
fn reference(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<(u32, f64)> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let kept = nucleus(logits, |i| ((logits[i] as f64 - max) / temperature).exp(), top_k, top_p);
    let z: f64 = kept.iter().map(|&(_, w)| w).sum();
    kept.into_iter().map(|(i, w)| (i, w / z)).collect()
}

/// Logits spread over [-2, 2] from a fixed sequence (no two equal).
fn spread(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as u64 * 2_654_435_761 % 1_000_003) as f64 / 1_000_003.0 * 4.0 - 2.0) as f32).collect()
}

#[test]
fn draws_follow_the_reference_distribution_for_every_rule() {
    let logits = spread(12);
    let n = 40_000;
    for (t, k, p) in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.8, 7, 0.75), (2.0, 12, 0.95)] {
        let want = reference(&logits, t as f64, k, p as f64);
        let mut s = sampler(t, k, p, 99);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let mut expected = vec![0.0; logits.len()];
        for &(i, q) in &want {
            expected[i as usize] = q;
        }
        for (i, (&c, &q)) in counts.iter().zip(&expected).enumerate() {
            let f = c as f64 / n as f64;
            // Five binomial standard deviations (and none at all outside the reference's set).
            let sd = (q * (1.0 - q) / n as f64).sqrt();
            assert!((f - q).abs() <= 5.0 * sd, "t={t} k={k} p={p}: token {i} drawn at {f:.4}, the reference gives {q:.4}");
        }
    }
}

#[test]
fn top_p_over_a_large_vocabulary_draws_exactly_the_nucleus() {
    // A flat distribution over 1000 tokens: the 0.9 nucleus holds hundreds of them, so the
    // sampler's block-by-block sort runs through several blocks.
    let logits: Vec<f32> = spread(1000).iter().map(|l| l / 8.0).collect();
    let nucleus: std::collections::BTreeSet<u32> = reference(&logits, 1.0, 0, 0.9).into_iter().map(|(i, _)| i).collect();
    assert!(nucleus.len() > 500, "a nucleus of {} tokens does not cross the blocks", nucleus.len());
    let mut s = sampler(1.0, 0, 0.9, 5);
    let drawn: std::collections::BTreeSet<u32> = (0..40_000).map(|_| s.sample(&logits)).collect();
    assert_eq!(drawn, nucleus, "drawn tokens vs the reference nucleus");
}

#[test]
fn ties_at_the_cut_keep_the_lower_ids() {
    let logits = [1.0, 0.0, 1.0, 1.0, 1.0];
    let (mut k2, mut p) = (sampler(1.0, 2, 1.0, 3), sampler(1.0, 0, 0.5, 3));
    for _ in 0..500 {
        assert!([0, 2].contains(&k2.sample(&logits)), "top-2 of four equal logits left ids 0 and 2");
        // Four equal tokens hold ~0.95 of the mass: half of it is reached at the third.
        assert!([0, 2, 3].contains(&p.sample(&logits)), "top-p 0.5 left ids 0, 2 and 3");
    }
}

#[test]
fn tiny_temperatures_are_greedy_and_close_logits_stay_distinct() {
    let logits = [0.3, 30.0, 29.5, -4.0];
    for (t, seed) in [(1e-6, 1), (1e-30, 2), (1e-45, 3)] {
        assert_eq!(sampler(t, 0, 1.0, seed).sample(&logits), 1, "temperature {t}");
    }
    // Large logits one f32 step apart (6.1e-5 at 1000), at two thirds of that temperature: the
    // two weigh 1 and e^-1.5. Scaling before subtracting (l/t - max/t, products near 2.5e7 in
    // steps of 2) would make the gap 2, and the second token's share 0.12 instead of 0.18.
    let logits = [1000.0f32, 999.99994, -3.0];
    let t = (logits[0] - logits[1]) * 2.0 / 3.0;
    let mut s = sampler(t, 0, 1.0, 4);
    let n = 20_000;
    let second = (0..n).filter(|_| s.sample(&logits) == 1).count() as f64 / n as f64;
    let w = (-((logits[0] - logits[1]) as f64) / t as f64).exp();
    let q = w / (1.0 + w);
    assert!((second - q).abs() < 5.0 * (q * (1.0 - q) / n as f64).sqrt(), "second token drawn at {second:.4}, want {q:.4}");
}
