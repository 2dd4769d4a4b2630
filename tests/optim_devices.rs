//! Optimizer steps (dense SM3, sparse SM3, AdamW, the device sum of squares behind the clip
//! factor) on every device present, against the f64 reference in `kernels::optim::reference`.
//! The check bodies and their tolerances live in `tuna::testing::optim` (shared with
//! `tools/gpu-check`); the device list comes from `common::devices()`, which fails under
//! TUNA_REQUIRE_WGPU=1 when no wgpu adapter is found. Shapes stay small for lavapipe.

mod common;

use proptest::prelude::*;
use tuna::testing::optim::{check_adamw, check_adamw_multi, check_sm3, check_sm3_sparse, check_sum_squares, AdamWCase, Sm3Case};
use tuna::{DType, Device};

/// Parameter storages each device has kernels for: (dtype, with an f32 master copy).
fn storages(dev: Device) -> Vec<(DType, bool)> {
    match dev {
        Device::Cuda(_) => vec![(DType::F32, false), (DType::BF16, true), (DType::BF16, false)],
        _ => vec![(DType::F32, false)],
    }
}

fn sm3_case(rows: usize, cols: usize, momentum: bool, seed: u64) -> Sm3Case {
    Sm3Case {
        rows,
        cols,
        momentum,
        weight_decay: 0.0,
        grad_scale: 1.0,
        device_clip: None,
        steps: 3,
        dtype: DType::F32,
        master: false,
        seed,
    }
}

#[test]
fn sm3_matches_reference_on_every_device() {
    // 1x1, vectors as [L, 1] and [1, L], shapes around the 16-wide WGSL tile and the
    // 128x64 CUDA tile, none of them multiples of either.
    let shapes = [(1, 1), (7, 1), (300, 1), (1, 300), (3, 5), (17, 33), (65, 129), (40, 257)];
    for dev in common::devices() {
        for (dtype, master) in storages(dev) {
            for (k, &(rows, cols)) in shapes.iter().enumerate() {
                for momentum in [false, true] {
                    let case = Sm3Case { dtype, master, weight_decay: 0.1, grad_scale: 0.5, ..sm3_case(rows, cols, momentum, k as u64) };
                    check_sm3(dev, case).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

#[test]
fn sm3_device_clip_matches_reference_on_every_device() {
    // Gradients in [-1, 1] over 600 elements have norm ~14: max_norm 2 clips, 100 does not.
    for dev in common::devices() {
        for max_norm in [2.0, 100.0] {
            let case = Sm3Case { device_clip: Some(max_norm), grad_scale: 0.5, ..sm3_case(20, 30, true, 7) };
            check_sm3(dev, case).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn sm3_sparse_matches_reference_on_every_device() {
    // (rows, cols, active entries): some rows and columns untouched, all touched, one entry.
    let cases = [(1, 1, 1), (10, 12, 5), (10, 12, 60), (33, 17, 561), (64, 300, 900)];
    for dev in common::devices() {
        for (k, &(rows, cols, nnz)) in cases.iter().enumerate() {
            for momentum in [false, true] {
                check_sm3_sparse(dev, rows, cols, nnz, momentum, 3, k as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn adamw_matches_reference_on_every_device() {
    for dev in common::devices() {
        for (dtype, master) in storages(dev) {
            for (k, &n) in [1usize, 255, 257, 5000].iter().enumerate() {
                for device_clip in [None, Some(1.0)] {
                    let case = AdamWCase { n, weight_decay: 0.01, grad_scale: 0.8, device_clip, steps: 3, dtype, master, seed: k as u64 };
                    check_adamw(dev, case).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

#[test]
fn sum_of_squares_and_clip_factor_match_on_every_device() {
    // Several buffers, one of them larger than a full first-pass grid, one empty; those at odd
    // positions hold f16 values (read as f16 on wgpu).
    for dev in common::devices() {
        check_sum_squares(dev, &[1, 300, 0, 70_000], 1.0, 3).unwrap_or_else(|e| panic!("{e}"));
        check_sum_squares(dev, &[5], 1e6, 4).unwrap_or_else(|e| panic!("{e}"));
        // f16 buffers (odd positions) of odd lengths: the last word holds one element.
        check_sum_squares(dev, &[3, 301, 2, 65_537], 1.0, 5).unwrap_or_else(|e| panic!("{e}"));
        // More buffers than one CUDA launch takes (40), empty ones among them.
        let many: Vec<usize> = (0..93).map(|k| if k % 11 == 5 { 0 } else { 1 + k * 37 % 2000 }).collect();
        check_sum_squares(dev, &many, 1.0, 6).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// CUDA's many-tensors-per-launch AdamW gives the one-tensor kernel's bits for every tensor,
/// over launches of 40 tensors, with empty tensors and lengths off the block size, in each
/// storage, f32 with a master included (the trainer's new-parameter-without-a-copy path).
#[test]
fn adamw_over_many_tensors_in_one_launch_matches_one_at_a_time() {
    let sizes: Vec<usize> = (0..87).map(|k| match k % 9 { 4 => 0, 7 => 2048 * 16 + 3, _ => 1 + k * 53 % 700 }).collect();
    for dev in common::devices().into_iter().filter(|d| matches!(d, Device::Cuda(_))) {
        for (dtype, master) in [(DType::F32, false), (DType::F32, true), (DType::BF16, true), (DType::BF16, false)] {
            check_adamw_multi(dev, &sizes, dtype, master, 3, 7).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn launchers_name_the_wrong_length() {
    // The CPU path's checks are the ones the GPU launchers share (`check_dense`).
    let p = tuna::kernels::optim::Sm3Params { lr: 0.1, eps: 1e-8, beta1: 0.0, weight_decay: 0.0, grad_scale: 1.0 };
    let (mut w, g, mut r, mut c) = (vec![0.0f32; 6], vec![0.0f32; 6], vec![0.0f32; 1], vec![0.0f32; 3]);
    let e = tuna::kernels::optim::cpu::sm3(&mut w, &g, &mut r, &mut c, None, 2, 3, p).unwrap_err().to_string();
    assert!(e.contains("sm3") && e.contains("`r`"), "{e}");
    for dev in common::devices() {
        if let Device::Wgpu(i) = dev {
            let rt = tuna::device::wgpu::runtime(i).unwrap();
            // Pool buffers round up (to 64 floats at least): 64 < 100 columns, 2048 >= 20·100.
            let small = rt.alloc(4);
            let big = rt.alloc(8000);
            let (b, s) = (big.buffer(), small.buffer());
            let e = tuna::kernels::optim::wgsl::sm3(&rt.device, &rt.queue, &rt.kernels, b, b, b, s, b, b, None, 20, 100, p, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("sm3") && e.contains("`c`"), "{e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn sm3_random_shapes_on_every_device(
        rows in 1usize..70,
        cols in 1usize..150,
        momentum: bool,
        weight_decay in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        grad_scale in prop_oneof![Just(1.0f32), 0.1f32..2.0],
        steps in 1usize..4,
        seed: u64,
    ) {
        for dev in common::devices() {
            for (dtype, master) in storages(dev) {
                let case = Sm3Case { weight_decay, grad_scale, steps, dtype, master, ..sm3_case(rows, cols, momentum, seed) };
                check_sm3(dev, case).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn adamw_random_sizes_on_every_device(n in 1usize..3000, weight_decay in 0.0f32..0.2, grad_scale in 0.1f32..2.0, steps in 1usize..4, seed: u64) {
        for dev in common::devices() {
            for (dtype, master) in storages(dev) {
                let case = AdamWCase { n, weight_decay, grad_scale, device_clip: None, steps, dtype, master, seed };
                check_adamw(dev, case).map_err(TestCaseError::fail)?;
            }
        }
    }
}
