//! Optimizers: SM3 steps worked out by hand, the state sizes the trainer reports, and the
//! SpIEL reselection rule.

use std::sync::Arc;

use tuna::kernels::optim::{cpu, reference, Sm3Params};
use tuna::optim::{Layout, Optimizer, OptimizerConfig, Sm3Config};
use tuna::peft::sparse::{random_indices, reselect};
use tuna::rng::Rng;

/// A 2×2 SM3 step with numbers chosen so every square root is exact:
///   r = [7, 0], c = [3, 16], g = [[1, 3], [2, 4]], w = 1, lr = 0.1, eps = 0, no momentum
///   v00 = min(7, 3) + 1 = 4    u = 1/2     w = 1 - 0.1·0.5  = 0.95
///   v01 = min(7, 16) + 9 = 16  u = 3/4     w = 1 - 0.1·0.75 = 0.925
///   v10 = min(0, 3) + 4 = 4    u = 1       w = 0.9
///   v11 = min(0, 16) + 16 = 16 u = 1       w = 0.9
///   r' = [max(4, 16), max(4, 16)] = [16, 16], c' = [max(4, 4), max(16, 16)] = [4, 16]
#[test]
fn sm3_step_matches_the_hand_computation() {
    let p = Sm3Params { lr: 0.1, eps: 0.0, beta1: 0.0, weight_decay: 0.0, grad_scale: 1.0 };
    let mut w = vec![1.0f32; 4];
    let (mut r, mut c) = (vec![7.0f32, 0.0], vec![3.0f32, 16.0]);
    cpu::sm3(&mut w, &[1.0, 3.0, 2.0, 4.0], &mut r, &mut c, None, 2, 2, p).unwrap();
    assert_eq!(w, [0.95, 0.925, 0.9, 0.9]);
    assert_eq!((r, c), (vec![16.0, 16.0], vec![4.0, 16.0]));

    // The f64 reference agrees (up to lr = 0.1 being an f32).
    let mut w64 = vec![1.0f64; 4];
    let (mut r64, mut c64) = (vec![7.0, 0.0], vec![3.0, 16.0]);
    reference::sm3(&mut w64, &[1.0, 3.0, 2.0, 4.0], &mut r64, &mut c64, None, 2, 2, p);
    for (a, b) in w64.iter().zip([0.95, 0.925, 0.9, 0.9]) {
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }
    assert_eq!((r64, c64), (vec![16.0, 16.0], vec![4.0, 16.0]));
}

/// With momentum β1 = 0.5, weight decay 0.5 and clip scale 0.5 on one element:
///   g = 0.5·4 = 2, v = min(5, 5) + 4 = 9, u = 2/3, m = 0.5·0 + 0.5·(2/3) = 1/3,
///   w = 2·(1 - 0.1·0.5) - 0.1·(1/3) = 1.9 - 1/30.
#[test]
fn sm3_momentum_decay_and_scale_by_hand() {
    let p = Sm3Params { lr: 0.1, eps: 0.0, beta1: 0.5, weight_decay: 0.5, grad_scale: 0.5 };
    let (mut w, mut r, mut c, mut m) = (vec![2.0f32], vec![5.0f32], vec![5.0f32], vec![0.0f32]);
    cpu::sm3(&mut w, &[4.0], &mut r, &mut c, Some(&mut m), 1, 1, p).unwrap();
    assert!((m[0] - 1.0 / 3.0).abs() < 1e-7);
    assert!((w[0] - (1.9 - 1.0 / 30.0)).abs() < 1e-6, "{}", w[0]);
    assert_eq!((r[0], c[0]), (9.0, 9.0));
}

/// Sparse SM3 on a 3×3 matrix with active entries (0,1), (0,2), (2,1):
///   r = [1, 8, 0], c = [2, 4, 9], g = [3, 1, 2], lr = 1, eps = 0
///   (0,1): v = min(1, 4) + 9 = 10;  (0,2): v = min(1, 9) + 1 = 2;  (2,1): v = min(0, 4) + 4 = 4
///   r' = [max(10, 2), 8 (no active entry: kept), 4], c' = [2 (kept), max(10, 4), 2]
#[test]
fn sparse_sm3_updates_accumulators_only_where_entries_are_active() {
    let p = Sm3Params { lr: 1.0, eps: 0.0, beta1: 0.0, weight_decay: 0.0, grad_scale: 1.0 };
    let idx = [1u32, 2, 7];
    let mut d = vec![0.0f32; 3];
    let (mut r, mut c) = (vec![1.0f32, 8.0, 0.0], vec![2.0f32, 4.0, 9.0]);
    cpu::sm3_sparse(&idx, &mut d, &[3.0, 1.0, 2.0], &mut r, &mut c, None, 3, 3, p).unwrap();
    assert_eq!(r, [10.0, 8.0, 4.0]);
    assert_eq!(c, [2.0, 10.0, 2.0]);
    let want = [-3.0 / 10f32.sqrt(), -1.0 / 2f32.sqrt(), -1.0];
    for (a, b) in d.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Bad input is named.
    let err = cpu::sm3_sparse(&[2, 1], &mut [0.0, 0.0], &[1.0, 1.0], &mut r, &mut c, None, 3, 3, p).unwrap_err();
    assert!(err.to_string().contains("increase strictly"), "{err}");
    let err = cpu::sm3(&mut [0.0; 5], &[0.0; 6], &mut r, &mut c, None, 2, 3, p).unwrap_err();
    assert!(err.to_string().contains("[2, 3]"), "{err}");
}

/// A vector is the `[L, 1]` case and behaves as Adagrad: each element keeps its own sum of
/// squares.
#[test]
fn sm3_on_a_vector_is_adagrad() {
    let p = Sm3Params { lr: 0.1, eps: 1e-8, beta1: 0.0, weight_decay: 0.0, grad_scale: 1.0 };
    let mut rng = Rng::new(2);
    let n = 17;
    let (mut w, mut r, mut c) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; 1]);
    let (mut wa, mut acc) = (vec![0.0f64; n], vec![0.0f64; n]);
    for _ in 0..5 {
        let g = rng.vec(n, -1.0, 1.0);
        cpu::sm3(&mut w, &g, &mut r, &mut c, None, n, 1, p).unwrap();
        for i in 0..n {
            acc[i] += (g[i] as f64).powi(2);
            wa[i] -= 0.1 * g[i] as f64 / (acc[i].sqrt() + 1e-8);
        }
    }
    for i in 0..n {
        assert!((w[i] as f64 - wa[i]).abs() < 1e-5, "{i}: {} vs {}", w[i], wa[i]);
        assert!((r[i] as f64 - acc[i]).abs() < 1e-5);
    }
}

/// SM3's state for an m×n matrix is m + n floats (plus m·n with momentum); AdamW's is 2·m·n;
/// for a sparse delta the per-entry parts scale with the active entries.
#[test]
fn optimizer_state_sizes() {
    let sparse = Layout::Sparse { rows: 100, cols: 50, indices: Arc::new((0..40).collect()) };
    let layouts = [Layout::dense(&[30, 20]), Layout::dense(&[7]), sparse];
    let no_mom = Optimizer::new(OptimizerConfig::Sm3(Sm3Config { beta1: 0.0, ..Default::default() }), &layouts);
    assert_eq!(no_mom.state_len(), (30 + 20) + (7 + 1) + (100 + 50));
    let mom = Optimizer::new(OptimizerConfig::Sm3(Sm3Config::default()), &layouts);
    assert_eq!(mom.state_len(), (30 + 20 + 600) + (7 + 1 + 7) + (100 + 50 + 40));
    let adam = Optimizer::new(OptimizerConfig::AdamW(Default::default()), &layouts);
    assert_eq!(adam.state_len(), 2 * (600 + 7 + 40));
}

/// Reselection drops the smallest |δ|, grows the best-scoring inactive entries (never one
/// just dropped), keeps the count, and keeps the surviving values' positions straight.
#[test]
fn reselect_drops_smallest_and_grows_best() {
    let len = 20;
    let indices = vec![1u32, 4, 6, 9, 15];
    let values = [0.5f32, -0.01, 2.0, 0.02, -3.0];
    // Score: the index itself, so the best inactive entries are 19 and 18.
    let sel = reselect(&indices, &values, len, 2, |e| e as f32);
    assert_eq!(sel.indices, vec![1, 6, 15, 18, 19]);
    assert_eq!(sel.moves, vec![(0, 0), (2, 1), (4, 2)]);
    // Nothing to change.
    let same = reselect(&indices, &values, len, 0, |e| e as f32);
    assert_eq!(same.indices, indices);
    // Random selections are sorted, distinct and inside the matrix.
    let mut rng = Rng::new(9);
    for n in [1, 5, 19, 20] {
        let r = random_indices(20, n, &mut rng);
        assert_eq!(r.len(), n);
        assert!(r.windows(2).all(|w| w[0] < w[1]) && r.iter().all(|&i| i < 20));
    }
}
