//! Cross-entropy (forward and the logits' gradient) on every device present, against the f64
//! reference: ragged vocabularies (not multiples of the 256-wide workgroup), ignored rows, a
//! batch with every row ignored.

mod common;

use proptest::prelude::*;
use tuna::kernels::cross_entropy::reference;
use tuna::testing::{compare, Rng, Tolerance};
use tuna::{ops, Device, Tape, Tensor};

const IGNORE: i32 = -100;

/// f64 gradient of the mean loss: `(softmax(z) - onehot(t)) / C` on counted rows.
fn reference_grad(z: &[f64], t: &[i32], v: usize) -> Vec<f64> {
    let count = t.iter().filter(|&&x| x != IGNORE).count();
    let mut dz = vec![0.0; z.len()];
    for (m, &tm) in t.iter().enumerate() {
        if tm == IGNORE {
            continue;
        }
        let row = &z[m * v..(m + 1) * v];
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|x| (x - mx).exp()).sum();
        for j in 0..v {
            dz[m * v + j] = ((row[j] - mx).exp() / s - if j as i32 == tm { 1.0 } else { 0.0 }) / count as f64;
        }
    }
    dz
}

fn check(dev: Device, m: usize, v: usize, ignore_every: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let z = rng.vec(m * v, -8.0, 8.0);
    let t: Vec<i32> = (0..m).map(|i| if ignore_every > 0 && i % ignore_every == 0 { IGNORE } else { rng.below(v) as i32 }).collect();
    let z64: Vec<f64> = z.iter().map(|&x| x as f64).collect();
    let tape = Tape::new();
    let logits = tape.param(&Tensor::from_slice(&z, [m, v], &dev).map_err(|e| e.to_string())?);
    let targets = Tensor::from_vec_i32(t.clone(), [m]).and_then(|x| x.to_device(&dev)).map_err(|e| e.to_string())?;
    let loss = ops::cross_entropy(&logits, &targets, IGNORE).map_err(|e| e.to_string())?;
    if loss.device() != dev {
        return Err(format!("loss on {} for logits on {dev}", loss.device()));
    }
    let want = reference::cross_entropy(&z64, &t, v, IGNORE);
    compare(&format!("loss on {dev}"), &[loss.to_scalar().map_err(|e| e.to_string())?], &[want], Tolerance::F32)?;
    let grads = tape.backward(&loss).map_err(|e| e.to_string())?;
    let dz = grads.get(&logits).ok_or("no gradient for the logits")?.to_vec_f32().map_err(|e| e.to_string())?;
    compare(&format!("dz on {dev}"), &dz, &reference_grad(&z64, &t, v), Tolerance { atol: 1e-7, rtol: 1e-4 })
}

#[test]
fn cross_entropy_matches_reference_on_every_device() {
    // (M, V, every k-th row ignored): one row, ragged vocabularies, a large one, all ignored.
    let cases = [(1, 1, 0), (3, 7, 0), (5, 256, 2), (4, 257, 3), (17, 1000, 4), (2, 5000, 0), (6, 33, 1)];
    for dev in common::devices() {
        for (i, &(m, v, ig)) in cases.iter().enumerate() {
            check(dev, m, v, ig, i as u64).unwrap_or_else(|e| panic!("[{m}, {v}] ignore every {ig}: {e}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn cross_entropy_random_shapes_on_every_device(m in 1usize..40, v in 1usize..700, ig in 0usize..5, seed: u64) {
        for dev in common::devices() {
            check(dev, m, v, ig, seed).map_err(TestCaseError::fail)?;
        }
    }
}
