//! Sampling rules: greedy ties, top-k, top-p, temperature and seeds.

use tuna::nn::{GenerateOptions, Sampler};

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
