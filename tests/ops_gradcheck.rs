//! Every op: forward against its f64 reference and tape gradients against central finite
//! differences of that reference (`tuna::testing::gradcheck`), over random shapes.

use proptest::prelude::*;
use tuna::kernels::{attention, cross_entropy, elementwise, embedding, lora, matmul, reduce, rmsnorm, rope};
use tuna::testing::{gradcheck, Rng, Tolerance};
use tuna::{ops, Tensor};

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.vec(n, -1.5, 1.5), shape.to_vec()).unwrap()
}

fn cfg() -> ProptestConfig {
    ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn matmul_grad(m in 1usize..7, n in 1usize..7, k in 1usize..7, ta: bool, tb: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = randn(&mut rng, &if ta { [k, m] } else { [m, k] });
        let b = randn(&mut rng, &if tb { [n, k] } else { [k, n] });
        let p = matmul::MatmulParams { m, n, k, trans_a: ta, trans_b: tb };
        gradcheck(&[a, b], |t| ops::matmul(&t[0], &t[1], ta, tb),
                  |v| matmul::reference::matmul(&v[0], &v[1], p), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn add_grad(rows in 1usize..5, n in 1usize..6, broadcast: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = randn(&mut rng, &[rows, n]);
        let b = if broadcast { randn(&mut rng, &[n]) } else { randn(&mut rng, &[rows, n]) };
        gradcheck(&[a, b], |t| ops::add(&t[0], &t[1]),
                  |v| elementwise::reference::add(&v[0], &v[1]), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn mul_grad(rows in 1usize..5, n in 1usize..6, broadcast: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let a = randn(&mut rng, &[rows, n]);
        let b = if broadcast { randn(&mut rng, &[n]) } else { randn(&mut rng, &[rows, n]) };
        gradcheck(&[a, b], |t| ops::mul(&t[0], &t[1]),
                  |v| elementwise::reference::mul(&v[0], &v[1]), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn scale_grad(n in 1usize..20, s in -3.0f32..3.0, seed: u64) {
        let mut rng = Rng::new(seed);
        gradcheck(&[randn(&mut rng, &[n])], |t| ops::scale(&t[0], s),
                  |v| elementwise::reference::scale(&v[0], s as f64), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn silu_grad(n in 1usize..40, seed: u64) {
        let mut rng = Rng::new(seed);
        gradcheck(&[randn(&mut rng, &[n])], |t| ops::silu(&t[0]),
                  |v| elementwise::reference::silu(&v[0]), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn sum_and_mean_grad(rows in 1usize..5, n in 1usize..9, seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[rows, n]);
        gradcheck(std::slice::from_ref(&x), |t| ops::sum(&t[0]),
                  |v| vec![reduce::reference::sum(&v[0])], Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
        let count = (rows * n) as f64;
        gradcheck(&[x], |t| ops::mean(&t[0]),
                  |v| vec![reduce::reference::sum(&v[0]) / count], Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn softmax_grad(rows in 1usize..5, n in 1usize..9, seed: u64) {
        let mut rng = Rng::new(seed);
        gradcheck(&[randn(&mut rng, &[rows, n])], |t| ops::softmax(&t[0]),
                  |v| reduce::reference::softmax(&v[0], n), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn embedding_grad(vocab in 1usize..8, e in 1usize..6, t in 1usize..10, seed: u64) {
        let mut rng = Rng::new(seed);
        let ids: Vec<i32> = (0..t).map(|_| rng.below(vocab) as i32).collect();
        let ids = Tensor::from_vec_i32(ids, [t]).unwrap();
        let table = randn(&mut rng, &[vocab, e]);
        gradcheck(&[ids, table], |x| ops::embedding(&x[0], &x[1]),
                  |v| embedding::reference::gather(&v[1], &v[0].iter().map(|&i| i as i32).collect::<Vec<_>>(), e),
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn rmsnorm_grad(rows in 1usize..5, n in 1usize..12, seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[rows, n]);
        let w = randn(&mut rng, &[n]);
        let p = rmsnorm::RmsNormParams { rows, cols: n, eps: 1e-5 };
        gradcheck(&[x, w], |t| ops::rmsnorm(&t[0], &t[1], 1e-5),
                  |v| rmsnorm::reference::forward(&v[0], &v[1], p).0, Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn cross_entropy_grad(rows in 1usize..6, vocab in 1usize..9, seed: u64) {
        let mut rng = Rng::new(seed);
        let logits = randn(&mut rng, &[rows, vocab]);
        // About one row in four is ignored, so the count differs from the row count.
        let targets: Vec<i32> = (0..rows).map(|_| if rng.below(4) == 0 { -100 } else { rng.below(vocab) as i32 }).collect();
        let tt = Tensor::from_vec_i32(targets.clone(), [rows]).unwrap();
        gradcheck(&[logits, tt], |t| ops::cross_entropy(&t[0], &t[1], -100),
                  |v| vec![cross_entropy::reference::cross_entropy(&v[0], &targets, vocab, -100)],
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    /// The fused head + loss, in chunks that split the rows unevenly, through central
    /// differences of the f64 loss of `x·Wᵀ` (x and W both get gradients).
    #[test]
    fn linear_cross_entropy_grad(rows in 1usize..6, hidden in 1usize..5, vocab in 1usize..7, chunk in 1usize..4, seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[rows, hidden]);
        let w = randn(&mut rng, &[vocab, hidden]);
        let targets: Vec<i32> = (0..rows).map(|_| if rng.below(4) == 0 { -100 } else { rng.below(vocab) as i32 }).collect();
        let tt = Tensor::from_vec_i32(targets.clone(), [rows]).unwrap();
        let mp = matmul::MatmulParams { m: rows, n: vocab, k: hidden, trans_a: false, trans_b: true };
        gradcheck(&[x, w, tt], |t| ops::linear_cross_entropy(&t[0], &t[1], &t[2], -100, Some(chunk)),
                  |v| vec![cross_entropy::reference::cross_entropy(&matmul::reference::matmul(&v[0], &v[1], mp), &targets, vocab, -100)],
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn reshape_grad(a in 1usize..5, b in 1usize..5, seed: u64) {
        let mut rng = Rng::new(seed);
        gradcheck(&[randn(&mut rng, &[a, b])], |t| ops::silu(&ops::reshape(&t[0], [b, a])?),
                  |v| elementwise::reference::silu(&v[0]), Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    /// A small composite (RMSNorm -> matmul -> SiLU -> cross-entropy) checks that gradients flow
    /// through chains and accumulate where a tensor is used twice.
    #[test]
    fn composite_grad(rows in 1usize..4, n in 2usize..6, vocab in 2usize..6, seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[rows, n]);
        let w = randn(&mut rng, &[n]);
        let proj = randn(&mut rng, &[vocab, n]);
        let targets: Vec<i32> = (0..rows).map(|_| rng.below(vocab) as i32).collect();
        let tt = Tensor::from_vec_i32(targets.clone(), [rows]).unwrap();
        let p = rmsnorm::RmsNormParams { rows, cols: n, eps: 1e-6 };
        let mp = matmul::MatmulParams { m: rows, n: vocab, k: n, trans_a: false, trans_b: true };
        gradcheck(&[x, w, proj, tt], |t| {
            let h = ops::rmsnorm(&t[0], &t[1], 1e-6)?;
            let h = ops::add(&h, &t[0])?; // x used twice: its gradient accumulates
            let z = ops::silu(&ops::matmul(&h, &t[2], false, true)?)?;
            ops::cross_entropy(&z, &t[3], -100)
        }, |v| {
            let h = rmsnorm::reference::forward(&v[0], &v[1], p).0;
            let h = elementwise::reference::add(&h, &v[0]);
            let z = elementwise::reference::silu(&matmul::reference::matmul(&h, &v[2], mp));
            vec![cross_entropy::reference::cross_entropy(&z, &targets, vocab, -100)]
        }, Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }
}

/// The fast CPU matmul (the `gemm` crate, threaded above ~1 MFLOP) against the reference at a
/// size where threads and blocking are in play.
#[test]
fn matmul_fast_path_large() {
    let (m, n, k) = (67, 129, 95);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut rng = Rng::new(7);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let p = matmul::MatmulParams { m, n, k, trans_a: ta, trans_b: tb };
        let mut c = vec![0.0; m * n];
        matmul::cpu::matmul(&a, &b, &mut c, p).unwrap();
        let f64v = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let want = matmul::reference::matmul(&f64v(&a), &f64v(&b), p);
        tuna::testing::compare(&format!("matmul ta={ta} tb={tb}"), &c, &want, Tolerance::F32).unwrap();
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn rope_grad(tokens in 1usize..5, heads in 1usize..3, half in 1usize..4, seed: u64) {
        let mut rng = Rng::new(seed);
        let d = 2 * half;
        let x = randn(&mut rng, &[tokens, heads, d]);
        let positions: Vec<i32> = (0..tokens).map(|_| rng.below(50) as i32).collect();
        let pos = Tensor::from_vec_i32(positions.clone(), [tokens]).unwrap();
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
        let f2 = Tensor::from_vec(inv_freq.clone(), [half]).unwrap();
        gradcheck(&[x, pos], move |t| ops::rope(&t[0], &t[1], &f2),
                  |v| rope::reference::rope(&v[0], &positions, &inv_freq, heads, rope::Direction::Forward),
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn attention_grad(b in 1usize..3, t in 1usize..5, extra in 0usize..3, g in 1usize..3, group in 1usize..3,
                      d in 1usize..5, causal: bool, window in proptest::option::of(1usize..4), seed: u64) {
        let mut rng = Rng::new(seed);
        let (h, s) = (g * group, t + extra);
        let q = randn(&mut rng, &[b, t, h, d]);
        let k = randn(&mut rng, &[b, s, g, d]);
        let v = randn(&mut rng, &[b, s, g, d]);
        let scale = 1.0 / (d as f32).sqrt();
        let mask = ops::AttentionMask { causal, window, segment_starts: None };
        let p = attention::AttentionParams { batch: b, q_len: t, kv_len: s, heads: h, kv_heads: g, head_dim: d, causal, window, scale };
        gradcheck(&[q, k, v], |x| ops::attention(&x[0], &x[1], &x[2], mask.clone(), scale),
                  |vals| attention::reference::forward(&vals[0], &vals[1], &vals[2], &p, None),
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }

    /// Packed rows: random example boundaries per row; no attention across them.
    #[test]
    fn attention_packed_grad(b in 1usize..3, t in 1usize..8, g in 1usize..3, group in 1usize..3, d in 1usize..4, seed: u64) {
        let mut rng = Rng::new(seed);
        let h = g * group;
        let q = randn(&mut rng, &[b, t, h, d]);
        let k = randn(&mut rng, &[b, t, g, d]);
        let v = randn(&mut rng, &[b, t, g, d]);
        let mut starts = Vec::with_capacity(b * t);
        for _ in 0..b {
            let mut start = 0u32;
            for pos in 0..t {
                if pos > 0 && rng.below(3) == 0 {
                    start = pos as u32;
                }
                starts.push(start);
            }
        }
        let scale = 0.8;
        let mask = ops::AttentionMask { causal: true, window: None, segment_starts: Some(std::sync::Arc::new(starts.clone())) };
        let p = attention::AttentionParams { batch: b, q_len: t, kv_len: t, heads: h, kv_heads: g, head_dim: d, causal: true, window: None, scale };
        gradcheck(&[q, k, v], |x| ops::attention(&x[0], &x[1], &x[2], mask.clone(), scale),
                  |vals| attention::reference::forward(&vals[0], &vals[1], &vals[2], &p, Some(&starts)),
                  Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }
}

/// The reference backward of attention against finite differences of its forward, so the
/// hand-derived formulas are checked in f64 too (the CPU fast path is checked by `attention_grad`).
#[test]
fn attention_reference_backward_is_the_derivative() {
    let mut rng = Rng::new(3);
    let (b, t, s, h, g, d) = (1, 3, 4, 4, 2, 3);
    let mut f = |n| rng.vec(n, -1.0, 1.0).into_iter().map(f64::from).collect::<Vec<_>>();
    let (q, k, v, dout) = (f(b * t * h * d), f(b * s * g * d), f(b * s * g * d), f(b * t * h * d));
    let p = attention::AttentionParams { batch: b, q_len: t, kv_len: s, heads: h, kv_heads: g, head_dim: d, causal: true, window: None, scale: 0.7 };
    let (dq, dk, _dv) = attention::reference::backward(&q, &k, &v, &dout, &p, None);
    let loss = |q: &[f64], k: &[f64]| attention::reference::forward(q, k, &v, &p, None).iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>();
    let h_ = 1e-6;
    for i in 0..q.len() {
        let (mut qp, mut qm) = (q.clone(), q.clone());
        qp[i] += h_;
        qm[i] -= h_;
        let num = (loss(&qp, &k) - loss(&qm, &k)) / (2.0 * h_);
        assert!((num - dq[i]).abs() < 1e-6, "dq[{i}]: {num} vs {}", dq[i]);
    }
    for i in 0..k.len() {
        let (mut kp, mut km) = (k.clone(), k.clone());
        kp[i] += h_;
        km[i] -= h_;
        let num = (loss(&q, &kp) - loss(&q, &km)) / (2.0 * h_);
        assert!((num - dk[i]).abs() < 1e-6, "dk[{i}]: {num} vs {}", dk[i]);
    }
}

proptest! {
    #![proptest_config(cfg())]

    /// The fused LoRA linear, with and without bias and dropout: forward against the f64
    /// reference, gradients of x, A and B against finite differences (W and bias are frozen).
    #[test]
    fn lora_linear_grad(m in 1usize..5, n in 1usize..6, k in 1usize..6, r in 1usize..4, with_bias: bool,
                        drop in proptest::option::of(0.1f32..0.6), seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[m, k]);
        let a = randn(&mut rng, &[r, k]);
        let b = randn(&mut rng, &[n, r]);
        let w = randn(&mut rng, &[n, k]);
        let bias = with_bias.then(|| randn(&mut rng, &[n]));
        let scale = 2.0 / r as f32;
        let dropout = drop.map(|p| ops::Dropout { p, seed: seed ^ 7 });
        let p = lora::LoraParams { m, n, k, r, scale };
        let wv: Vec<f64> = w.to_vec_f32().unwrap().into_iter().map(f64::from).collect();
        let bv: Option<Vec<f64>> = bias.as_ref().map(|t| t.to_vec_f32().unwrap().into_iter().map(f64::from).collect());
        let mask: Vec<f64> = (0..m * k).map(|i| match dropout {
            Some(d) if tuna::rng::uniform_at(d.seed, i as u64) < d.p => 0.0,
            Some(d) => 1.0 / (1.0 - d.p as f64),
            None => 1.0,
        }).collect();
        let (w2, b2) = (w.clone(), bias.clone());
        gradcheck(&[x, a, b], move |t| ops::lora_linear(&t[0], &w2, b2.as_ref(), &t[1], &t[2], scale, dropout),
                  |v| {
                      let xl: Vec<f64> = v[0].iter().zip(&mask).map(|(x, s)| x * s).collect();
                      lora::reference::forward(&v[0], &xl, &wv, bv.as_deref(), &v[1], &v[2], p).0
                  }, Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn lora_linear_frozen_weight_gets_no_gradient() {
    let tape = tuna::Tape::new();
    let mut rng = Rng::new(1);
    let w = tape.param(&randn(&mut rng, &[3, 4])); // even a tracked W is not an input of the op
    let a = tape.param(&randn(&mut rng, &[2, 4]));
    let b = tape.param(&randn(&mut rng, &[3, 2]));
    let x = randn(&mut rng, &[5, 4]);
    let y = ops::lora_linear(&x, &w, None, &a, &b, 0.5, None).unwrap();
    let grads = tape.backward(&ops::sum(&y).unwrap()).unwrap();
    assert!(grads.get(&w).is_none());
    assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..cfg() })]

    /// A group of linears on one input (a plain one, LoRA ones with and without dropout): each
    /// output against its reference, and the gradient of x (summed over the parts) and of every
    /// A and B against finite differences.
    #[test]
    fn linear_group_grad(m in 1usize..4, k in 1usize..5, seed: u64) {
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[m, k]);
        let (n0, n1, n2, r) = (3, 2, 4, 2);
        let w: Vec<Tensor> = [n0, n1, n2].iter().map(|&n| randn(&mut rng, &[n, k])).collect();
        let bias0 = randn(&mut rng, &[n0]);
        let (a1, b1, a2, b2) = (randn(&mut rng, &[r, k]), randn(&mut rng, &[n1, r]), randn(&mut rng, &[r, k]), randn(&mut rng, &[n2, r]));
        let drop = ops::Dropout { p: 0.3, seed: seed ^ 11 };
        let f64v = |t: &Tensor| t.to_vec_f32().unwrap().into_iter().map(f64::from).collect::<Vec<_>>();
        let (wv, biasv) = (w.iter().map(f64v).collect::<Vec<_>>(), f64v(&bias0));
        let mask: Vec<f64> = (0..m * k).map(|i| if tuna::rng::uniform_at(drop.seed, i as u64) < drop.p { 0.0 } else { 1.0 / 0.7 }).collect();
        let w2 = w.clone();
        let bias2 = bias0.clone();
        gradcheck(&[x, a1, b1, a2, b2], move |t| {
            let parts = [
                ops::LinearPart { weight: &w2[0], bias: Some(&bias2), lora: None, dropout: None },
                ops::LinearPart { weight: &w2[1], bias: None, lora: Some((&t[1], &t[2], 1.5)), dropout: None },
                ops::LinearPart { weight: &w2[2], bias: None, lora: Some((&t[3], &t[4], 0.5)), dropout: Some(drop) },
            ];
            let outs = ops::linear_group(&t[0], &parts)?;
            // Combine the three outputs into one [m, n0] tensor through different linear maps
            // (y0 + 2·rowsum(y1) - 0.5·rowsum(y2)), so each part's values and gradients count.
            let ones = |n: usize, v: f32| Tensor::full(v, [n, n0], &tuna::Device::Cpu);
            let y1 = ops::matmul(&outs[1], &ones(n1, 2.0)?, false, false)?;
            let y2 = ops::matmul(&outs[2], &ones(n2, -0.5)?, false, false)?;
            ops::add(&ops::add(&outs[0], &y1)?, &y2)
        }, move |v| {
            let p = |n, r, scale| lora::LoraParams { m, n, k, r, scale };
            let (y0, _) = lora::reference::forward(&v[0], &v[0], &wv[0], Some(&biasv), &vec![0.0; k], &vec![0.0; n0], p(n0, 1, 0.0));
            let (y1, _) = lora::reference::forward(&v[0], &v[0], &wv[1], None, &v[1], &v[2], p(n1, r, 1.5));
            let xl: Vec<f64> = v[0].iter().zip(&mask).map(|(a, b)| a * b).collect();
            let (y2, _) = lora::reference::forward(&v[0], &xl, &wv[2], None, &v[3], &v[4], p(n2, r, 0.5));
            (0..m * n0).map(|i| {
                let row = i / n0;
                y0[i] + (0..n1).map(|j| 2.0 * y1[row * n1 + j]).sum::<f64>() - (0..n2).map(|j| 0.5 * y2[row * n2 + j]).sum::<f64>()
            }).collect()
        }, Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(cfg())]

    /// The sparse fine-tuning linear `x·(W + scatter(δ))ᵀ (+ bias)`: forward against a dense
    /// f64 reference, gradients of x, W and δ against finite differences.
    #[test]
    fn sparse_linear_grad(m in 1usize..5, n in 1usize..6, k in 1usize..6, frac in 0.0f64..1.0, with_bias: bool, seed: u64) {
        use tuna::kernels::sparse::{self, SparseParams};
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[m, k]);
        let w = randn(&mut rng, &[n, k]);
        let nnz = ((frac * (n * k) as f64) as usize).max(1);
        let indices = std::sync::Arc::new(sparse::SparseIndices::new(tuna::peft::sparse::random_indices(n * k, nnz, &mut rng)));
        let delta = randn(&mut rng, &[nnz]);
        let bias = with_bias.then(|| randn(&mut rng, &[n]));
        let bv: Option<Vec<f64>> = bias.as_ref().map(|t| t.to_vec_f32().unwrap().into_iter().map(f64::from).collect());
        let (idx, b2) = (indices.clone(), bias.clone());
        let p = SparseParams { m, n, k };
        gradcheck(&[x, w, delta], move |t| ops::sparse_linear(&t[0], &t[1], b2.as_ref(), &idx, &t[2]),
                  |v| {
                      let s = sparse::reference::scatter(&indices, &v[2], p);
                      let weff: Vec<f64> = v[1].iter().zip(&s).map(|(a, b)| a + b).collect();
                      let mut y = matmul::reference::matmul(&v[0], &weff, matmul::MatmulParams { m, n, k, trans_a: false, trans_b: true });
                      if let Some(b) = &bv {
                          y.iter_mut().enumerate().for_each(|(i, v)| *v += b[i % n]);
                      }
                      y
                  }, Tolerance::GRAD_F32).map_err(TestCaseError::fail)?;
    }
}

/// The SDDMM gradient of the deltas equals the dense gradient `dyᵀ·x` read at the indices.
#[test]
fn sparse_delta_gradient_is_the_dense_gradient_at_the_indices() {
    use tuna::kernels::sparse::{cpu, reference, SparseParams};
    let mut rng = Rng::new(3);
    let (m, n, k) = (37, 19, 23);
    let p = SparseParams { m, n, k };
    let dy = rng.vec(m * n, -1.0, 1.0);
    let x = rng.vec(m * k, -1.0, 1.0);
    let idx = tuna::peft::sparse::random_indices(n * k, 60, &mut rng);
    let dense = matmul::reference::matmul(
        &dy.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        matmul::MatmulParams { m: n, n: k, k: m, trans_a: true, trans_b: false },
    );
    let fast = cpu::sddmm(&dy, &x, &idx, p);
    let refr = reference::sddmm(&dy.iter().map(|&v| v as f64).collect::<Vec<_>>(), &x.iter().map(|&v| v as f64).collect::<Vec<_>>(), &idx, p);
    for ((e, f), r) in idx.iter().zip(&fast).zip(&refr) {
        assert!((dense[*e as usize] - r).abs() < 1e-12);
        assert!((*f as f64 - r).abs() < 1e-5 * (1.0 + r.abs()), "entry {e}: {f} vs {r}");
    }
}

/// Both CPU paths of the sparse delta (scalar SpMM beside the GEMM, and δ folded into a copy
/// of W) give the dense f64 result, forward and for dx.
#[test]
fn sparse_delta_spmm_and_folded_paths_agree() {
    use tuna::kernels::sparse::{cpu, reference, SparseParams};
    let mut rng = Rng::new(11);
    let (n, k) = (29, 41);
    for m in [1, 3, 64] {
        let p = SparseParams { m, n, k };
        let x = rng.vec(m * k, -1.0, 1.0);
        let dy = rng.vec(m * n, -1.0, 1.0);
        let idx = tuna::peft::sparse::random_indices(n * k, 30, &mut rng);
        let d = rng.vec(30, -1.0, 1.0);
        let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let s = reference::scatter(&idx, &f64v(&d), p);
        let want_y = matmul::reference::matmul(&f64v(&x), &s, matmul::MatmulParams { m, n, k, trans_a: false, trans_b: true });
        let want_dx = matmul::reference::matmul(&f64v(&dy), &s, matmul::MatmulParams { m, n: k, k: n, trans_a: false, trans_b: false });
        let mut y = vec![0.0f32; m * n];
        cpu::spmm_add(&x, &idx, &d, &mut y, p);
        let mut dx = vec![0.0f32; m * k];
        cpu::spmm_t_add(&dy, &idx, &d, &mut dx, p);
        let folded = cpu::with_delta(&vec![0.0; n * k], &idx, &d);
        let yf = matmul::cpu::matmul_new(&x, &folded, matmul::MatmulParams { m, n, k, trans_a: false, trans_b: true }).unwrap();
        for (got, want) in [(&y, &want_y), (&yf, &want_y), (&dx, &want_dx)] {
            for (a, b) in got.iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-5, "m={m}: {a} vs {b}");
            }
        }
    }
}

/// The blocked CPU attention (64 queries at a time over the keys each block sees) against the
/// f64 reference, forward and backward, at lengths spanning several blocks: causal and not,
/// GQA, a KV-cache offset (S > T), a sliding window, and packed examples.
#[test]
fn attention_cpu_blocks_match_the_reference() {
    use attention::{cpu, reference, AttentionParams};
    let mut rng = Rng::new(21);
    let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let cases: [(usize, usize, bool, Option<usize>, bool); 5] =
        [(150, 150, true, None, false), (150, 150, false, None, false), (70, 200, true, None, false), (150, 150, true, Some(50), false), (150, 150, true, None, true)];
    for (t, s, causal, window, packed) in cases {
        let (b, h, g, d) = (2, 4, 2, 8);
        let p = AttentionParams { batch: b, q_len: t, kv_len: s, heads: h, kv_heads: g, head_dim: d, causal, window, scale: 0.35 };
        let q = rng.vec(b * t * h * d, -1.0, 1.0);
        let k = rng.vec(b * s * g * d, -1.0, 1.0);
        let v = rng.vec(b * s * g * d, -1.0, 1.0);
        let dout = rng.vec(b * t * h * d, -1.0, 1.0);
        // Packed rows: examples start at 0, 40 and 97 (row 0) and 0 and 130 (row 1).
        let starts: Vec<u32> = (0..b * t)
            .map(|i| {
                let (row, pos) = (i / t, (i % t) as u32);
                let bounds: &[u32] = if row == 0 { &[0, 40, 97] } else { &[0, 130] };
                *bounds.iter().rev().find(|&&x| x <= pos).unwrap()
            })
            .collect();
        let st = packed.then_some(starts.as_slice());
        let mut o = vec![0.0f32; q.len()];
        cpu::forward(&q, &k, &v, &mut o, &p, st);
        let want = reference::forward(&f64v(&q), &f64v(&k), &f64v(&v), &p, st);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
        cpu::backward(&q, &k, &v, &dout, &mut dq, &mut dk, &mut dv, &p, st);
        let (wq, wk, wv) = reference::backward(&f64v(&q), &f64v(&k), &f64v(&v), &f64v(&dout), &p, st);
        for (name, got, want) in [("o", &o, &want), ("dq", &dq, &wq), ("dk", &dk, &wk), ("dv", &dv, &wv)] {
            for (i, (a, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!((*a as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "T={t} S={s} causal={causal} window={window:?} packed={packed}: {name}[{i}] {a} vs {w}");
            }
        }
    }
}

/// The CPU attention's few-row path (up to 4 queries: decoding against a KV cache), whose keys
/// go in chunks of 64 positions combined afterwards, against the f64 reference: several chunks and a
/// ragged last one, causal with the cache offset, windows inside one chunk and across two,
/// GQA, no visible key for a query (T > S with a window), packed rows.
#[test]
fn attention_cpu_few_queries_match_the_reference() {
    use attention::{cpu, reference, AttentionParams};
    let mut rng = Rng::new(22);
    let f64v = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let cases: [(usize, usize, usize, bool, Option<usize>, bool); 9] = [
        (1, 700, 3, true, None, false),
        (4, 700, 3, true, None, false),
        (2, 600, 1, false, None, false),
        (1, 513, 3, true, Some(100), false),
        (3, 530, 3, true, Some(40), false),
        (1, 1, 2, true, None, false),
        (4, 2, 1, false, Some(1), false),
        (4, 4, 3, true, None, true),
        (3, 300, 2, true, Some(256), false),
    ];
    for (t, s, group, causal, window, packed) in cases {
        let (b, g, d) = (2, 2, 16);
        let h = g * group;
        let p = AttentionParams { batch: b, q_len: t, kv_len: s, heads: h, kv_heads: g, head_dim: d, causal, window, scale: 0.3 };
        let q = rng.vec(b * t * h * d, -2.0, 2.0);
        let k = rng.vec(b * s * g * d, -2.0, 2.0);
        let v = rng.vec(b * s * g * d, -1.0, 1.0);
        // Packed (T == S): row 0 starts a second example at position 2, row 1 at 3.
        let starts: Vec<u32> = (0..b * t).map(|i| if (i % t) >= 2 + i / t { (2 + i / t) as u32 } else { 0 }).collect();
        let st = packed.then_some(starts.as_slice());
        let mut o = vec![f32::NAN; q.len()];
        cpu::forward(&q, &k, &v, &mut o, &p, st);
        let want = reference::forward(&f64v(&q), &f64v(&k), &f64v(&v), &p, st);
        for (i, (a, w)) in o.iter().zip(&want).enumerate() {
            assert!((*a as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "T={t} S={s} group={group} causal={causal} window={window:?} packed={packed}: o[{i}] {a} vs {w}");
        }
    }
}

/// A sliding window of zero keys is refused (every device would otherwise answer differently:
/// the CPU with empty rows, the GPU kernels by reading 0 as "no window").
#[test]
fn attention_refuses_a_window_of_zero_keys() {
    let x = Tensor::zeros([1, 2, 1, 4], tuna::DType::F32, &tuna::Device::Cpu).unwrap();
    let mask = ops::AttentionMask { causal: true, window: Some(0), segment_starts: None };
    let e = ops::attention(&x, &x, &x, mask, 0.5).unwrap_err().to_string();
    assert!(e.contains("window") && e.contains('0'), "{e}");
}
