//! The fused LoRA linear (forward and backward) and its NF4 (QLoRA) form on every device
//! present, against the f64 reference in `kernels::lora::reference`; NF4 dequantization against
//! `nf4::cpu::dequantize` bit for bit. The check bodies and the tolerance rule live in
//! `tuna::testing::lora` (shared with `tools/gpu-check`); devices come from
//! `common::devices()` (TUNA_REQUIRE_WGPU=1 makes a missing adapter a failure). Shapes are
//! small for lavapipe and never multiples of the WGSL 64x64x16 tile or the CUDA tiles.

mod common;

use proptest::prelude::*;
use tuna::testing::lora::{check_dropout, check_lora, check_nf4_dequant, check_nf4_lora, check_nf4_quantize, LoraCase};
use tuna::{DType, Device};

/// Storage types each device has LoRA kernels for (dense and NF4 weights alike).
fn dtypes(dev: Device) -> Vec<DType> {
    match dev {
        Device::Cuda(_) => vec![DType::BF16, DType::F16],
        d if common::has_f16(d) => vec![DType::F32, DType::F16],
        _ => vec![DType::F32],
    }
}

fn run(case: LoraCase, nf4: bool) {
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            let case = LoraCase { dtype, ..case };
            let res = if nf4 { check_nf4_lora(dev, case) } else { check_lora(dev, case) };
            res.unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

fn case(m: usize, n: usize, k: usize, r: usize, bias: bool, seed: u64) -> LoraCase {
    LoraCase { m, n, k, r, bias, scale: 16.0 / r as f32, dtype: DType::F32, seed, dropout: None }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn lora_matches_reference(m in 1usize..70, n in 1usize..70, k in 1usize..70, r in 1usize..=32, bias: bool, seed: u64) {
        run(case(m, n, k, r, bias, seed), false);
    }

    #[test]
    fn nf4_lora_matches_reference(m in 1usize..70, n in 1usize..70, k in 1usize..70, r in 1usize..=32, bias: bool, seed: u64) {
        run(case(m, n, k, r, bias, seed), true);
    }
}

#[test]
fn f16_rounding_is_within_the_floor() {
    // Proptest cases whose naive f16 errors all stayed below one f16 rounding of the largest
    // value (dX stored in f16; dA from G stored in f16), so the bound without that floor was
    // smaller than the kernel's (correct) rounding.
    run(LoraCase { scale: 1.6, ..case(15, 23, 5, 10, true, 863_649_336_544_947_683) }, false);
    run(case(57, 33, 1, 9, false, 16_179_619_907_013_339_254), false);
    run(case(57, 33, 1, 9, false, 16_116_418_266_751_568_398), false);
    // One output whose naive error stayed small because its two roundings of s·XA cancelled,
    // while the WGSL f16 kernel (XA rounded, s applied in f32) was 1.34 f16 ulps off: the
    // rounding of XA carried through B (`carried_rounding`).
    run(case(1, 1, 53, 6, false, 15_639_489_763_250_451_270), false);
    // The same in f32 on the CPU: dA's one element, G rounded to f32 (NF4 weights).
    run(case(59, 29, 1, 1, true, 5_530_719_070_125_329_114), true);
}

#[test]
fn lora_ranks_up_to_128() {
    // R past one K tile (16) and up to the largest rank, with ragged M, N, K.
    for (i, &(m, n, k, r)) in [(3, 65, 33, 128), (67, 5, 70, 100), (17, 17, 130, 127), (1, 1, 1, 128)].iter().enumerate() {
        run(case(m, n, k, r, i % 2 == 0, i as u64), false);
        run(case(m, n, k, r, i % 2 == 1, i as u64 + 10), true);
    }
}

#[test]
fn gemv_paths_match_reference() {
    // CUDA's GEMV kernels: an NF4 W (M <= 16) read 32 codes a lane a step where K % 32 == 0, 8
    // where K % 8 == 0, else one; a dense W (M <= 4) 16 weights where K % 16 == 0, 8 where
    // K % 8 == 0, else one; M = 1 has its own instances. Each path with one row and with
    // several, over several steps of a warp (K 2048) and over part of one (K 40); rows past
    // the dense limit go to the GEMM. WGSL's (`gemv.wgsl`, M <= 16, dense or NF4 W): a one-row
    // instance and a 16-row one; NF4 a word of 8 codes a lane a step where K % 8 == 0, else one
    // weight; steps of 64 (128) weights a column, whole (K 2048) and cut short (K 33, 35).
    let shapes = [(1, 13, 2048, 16), (1, 9, 40, 4), (1, 5, 33, 3), (3, 17, 264, 8), (4, 6, 512, 4), (5, 20, 96, 16), (16, 11, 1024, 8), (16, 3, 72, 2), (7, 4, 35, 1)];
    for (i, &(m, n, k, r)) in shapes.iter().enumerate() {
        run(case(m, n, k, r, i % 2 == 0, 900 + i as u64), true);
        run(case(m, n, k, r, i % 2 == 1, 950 + i as u64), false);
    }
}

#[test]
fn lora_with_many_tokens_matches_reference() {
    // Enough rows that CUDA splits the thin products along K (`lora::cuda::split_k`, at the
    // emulator's 132 multiprocessors): at 2100 × 40 × 520, R 8, XA and Y (no bias) in 2
    // slices, dA and dB over the 2100 tokens in 8; the last block of each tile sums them.
    run(case(2100, 40, 520, 8, false, 41), false);
    run(case(2100, 40, 520, 8, false, 42), true);
    run(case(1100, 24, 1000, 16, true, 43), false);
}

#[test]
fn lora_with_dropout_matches_reference() {
    // dX = dY·W + s·(dY·B·A) ∘ mask / (1 - p) and dA from the dropped input, on every device
    // (f32 on the CPU and wgpu, f16 too where wgpu has it, bf16 on CUDA).
    for (i, &(m, n, k, r, p)) in [(1, 1, 1, 1, 0.5f32), (7, 65, 33, 8, 0.1), (67, 20, 70, 16, 0.3), (130, 9, 64, 128, 0.05)].iter().enumerate() {
        for dev in common::devices() {
            let dtype = if matches!(dev, Device::Cuda(_)) { DType::BF16 } else { DType::F32 };
            let case = LoraCase { dtype, dropout: Some((p, 0x5eed + i as u64)), ..case(m, n, k, r, i % 2 == 0, i as u64) };
            check_lora(dev, case).unwrap_or_else(|e| panic!("{e}"));
            check_nf4_lora(dev, case).unwrap_or_else(|e| panic!("{e}"));
            // f16 on wgpu: the dropped input in f16, dX's two products in f32 summed under the
            // mask into f16.
            if common::has_f16(dev) {
                check_lora(dev, LoraCase { dtype: DType::F16, ..case }).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn nf4_quantize_on_the_device_is_the_cpus_byte_for_byte() {
    // Lengths as for dequantization; wgpu in f32 and (with SHADER_F16) f16, CUDA in f32 and bf16.
    for (i, &len) in [1usize, 63, 64, 65, 1001, 64 * 256 + 7, 64 * 600 + 33].iter().enumerate() {
        for dev in common::devices() {
            let dtypes = match dev {
                Device::Cuda(_) => vec![DType::F32, DType::BF16],
                d if common::has_f16(d) => vec![DType::F32, DType::F16],
                _ => vec![DType::F32],
            };
            for dt in dtypes {
                check_nf4_quantize(dev, dt, len, i as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn nf4_dequantize_is_exact() {
    // One element, odd lengths (a half-used last byte), partial 64-blocks, more than one
    // 256-block of absmax values.
    for (i, &len) in [1usize, 63, 64, 65, 1001, 64 * 256 + 7, 64 * 600 + 33].iter().enumerate() {
        for dev in common::devices() {
            check_nf4_dequant(dev, len, i as u64).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn dropout_mask_on_gpus_is_the_cpus_bit_for_bit() {
    // rng::uniform_at emulated with 32-bit words in WGSL: every element's keep/drop decision and
    // value (plain and the axpy form of dX) must equal the CPU's, across seeds whose high words
    // are set and indices past 2^16.
    for dev in common::devices().into_iter().filter(|d| *d != Device::Cpu) {
        for (seed, p) in [(0u64, 0.1f32), (0x9e37_79b9_7f4a_7c15, 0.5), (u64::MAX, 0.05)] {
            check_dropout(dev, 70_000, p, seed).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn a_remade_input_gives_the_kept_inputs_gradients() {
    // `linear_group_remade` drops x after the forward and asks the remake for it in the
    // backward (the model's down projection: SwiGLU's product made again). Gradients must be
    // bit for bit those of the group that kept x, on every device, with and without adapters
    // and dropout; a remake of another shape is an error naming it.
    use std::sync::Arc;
    use tuna::ops::{self, Dropout, LinearPart, Remake};
    use tuna::testing::Rng;
    use tuna::{Tape, Tensor};
    for dev in common::devices() {
        let mut rng = Rng::new(5);
        let (m, k, n, r) = (9, 24, 13, 4);
        // The CUDA linears run in bf16 (the model's type there).
        let dt = if matches!(dev, Device::Cuda(_)) { DType::BF16 } else { DType::F32 };
        let on = |v: Vec<f32>, shape: [usize; 2]| Tensor::from_vec(v, shape).and_then(|t| t.to_device(&dev)).and_then(|t| t.to_dtype(dt)).unwrap();
        let x0 = on(rng.vec(m * k, -1.0, 1.0), [m, k]);
        let (w1, w2) = (on(rng.vec(n * k, -0.3, 0.3), [n, k]), on(rng.vec(n * k, -0.3, 0.3), [n, k]));
        let (a, b) = (on(rng.vec(r * k, -0.3, 0.3), [r, k]), on(rng.vec(n * r, -0.3, 0.3), [n, r]));
        let seed = on(rng.vec(m * n, -1.0, 1.0), [m, n]);
        for (lora, dropout) in [(true, None), (true, Some(Dropout { p: 0.25, seed: 3 })), (false, None)] {
            let grads = |remade: bool| {
                let tape = Tape::new();
                let (xp, ap, bp) = (tape.param(&x0), tape.param(&a), tape.param(&b));
                // x is tracked through an op, so the group's entry records its input.
                let x = ops::scale(&xp, 1.0).unwrap();
                let adapter = lora.then_some((&ap, &bp, 2.0));
                let parts = [LinearPart { weight: &w1, bias: None, lora: adapter, dropout }, LinearPart { weight: &w2, bias: None, lora: None, dropout: None }];
                let x_again = x0.clone();
                let remake: Remake = Arc::new(move || Ok(x_again.clone()));
                let ys = ops::linear_group_remade(&x, &parts, remade.then_some(remake)).unwrap();
                let out = ops::swiglu(&ys[0], &ys[1]).unwrap();
                let g = tape.backward_from(&out, &seed).unwrap();
                [&xp, &ap, &bp].map(|p| g.get(p).map(|t| t.to_vec_f32().unwrap()))
            };
            assert_eq!(grads(true), grads(false), "{dev}, adapter {lora}, dropout {dropout:?}");
        }
        let tape = Tape::new();
        let ap = tape.param(&a);
        let x = ops::scale(&tape.param(&x0), 1.0).unwrap();
        let wrong = on(vec![0.0; 2 * k], [2, k]);
        let remake: Remake = Arc::new(move || Ok(wrong.clone()));
        let y = ops::linear_group_remade(&x, &[LinearPart { weight: &w1, bias: None, lora: Some((&ap, &b, 1.0)), dropout: None }], Some(remake)).unwrap();
        let err = tape.backward_from(&y[0], &seed).unwrap_err().to_string();
        assert!(err.contains("made again"), "{dev}: {err}");
    }
}

#[test]
fn a_group_of_frozen_linears_makes_its_input_again_once() {
    // The model's q/k/v (and gate/up) run as one group on every device, so the backward makes
    // the normed input again once, not once per linear; the gradients are those of the
    // linears run one at a time.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tuna::nn::Linear;
    use tuna::ops::{self, Remake};
    use tuna::peft::LoraAdapter;
    use tuna::testing::Rng;
    use tuna::{Tape, Tensor};
    for dev in common::devices() {
        let mut rng = Rng::new(6);
        let (m, k, n, r) = (7, 16, 12, 2);
        let dt = if matches!(dev, Device::Cuda(_)) { DType::BF16 } else { DType::F32 };
        let mut on = |len: usize, shape: [usize; 2]| Tensor::from_vec(rng.vec(len, -0.5, 0.5), shape).and_then(|t| t.to_device(&dev)).and_then(|t| t.to_dtype(dt)).unwrap();
        let x0 = on(m * k, [m, k]);
        let linears: Vec<Linear> = (0..3)
            .map(|_| {
                let mut l = Linear::new(on(n * k, [n, k]), None);
                l.lora = Some(LoraAdapter { a: on(r * k, [r, k]), b: on(n * r, [n, r]), scale: 0.5, dropout: 0.0 });
                l
            })
            .collect();
        let seed = on(m * n, [m, n]);
        let grads = |grouped: bool| {
            let calls = Arc::new(AtomicUsize::new(0));
            let tape = Tape::new();
            let mut ls = linears.clone();
            for l in &mut ls {
                let ad = l.lora.as_mut().unwrap();
                (ad.a, ad.b) = (tape.param(&ad.a), tape.param(&ad.b));
            }
            let xp = tape.param(&x0);
            let x = ops::scale(&xp, 1.0).unwrap();
            let (c, x_again) = (calls.clone(), x0.clone());
            let remake: Remake = Arc::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(x_again.clone())
            });
            let ys = if grouped {
                Linear::forward_group_remade(&[(&ls[0], None), (&ls[1], None), (&ls[2], None)], &x, Some(remake)).unwrap()
            } else {
                ls.iter().map(|l| l.forward_remade(&x, None, Some(remake.clone())).unwrap()).collect()
            };
            let out = ops::add(&ops::add(&ys[0], &ys[1]).unwrap(), &ys[2]).unwrap();
            let g = tape.backward_from(&out, &seed).unwrap();
            let dab: Vec<Vec<f32>> = ls.iter().flat_map(|l| [&l.lora.as_ref().unwrap().a, &l.lora.as_ref().unwrap().b]).map(|t| g.get(t).unwrap().to_vec_f32().unwrap()).collect();
            (dab, g.get(&xp).unwrap().to_vec_f32().unwrap(), calls.load(Ordering::SeqCst))
        };
        let ((grouped, dx_grouped, once), (single, dx_single, thrice)) = (grads(true), grads(false));
        assert_eq!((once, thrice), (1, 3), "{dev}: remakes grouped vs one at a time");
        assert_eq!(grouped, single, "{dev}: dA and dB of each adapter");
        // dX sums the three linears' parts in another order (the group's part order, the tape's
        // reverse order): equal within that rounding (bf16's on CUDA).
        let scale = dx_single.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let tol = if dt == DType::BF16 { 1e-2 } else { 1e-5 } * scale;
        for (i, (a, b)) in dx_grouped.iter().zip(&dx_single).enumerate() {
            assert!((a - b).abs() <= tol, "{dev}: dx[{i}] grouped {a} vs one at a time {b}");
        }
    }
}
