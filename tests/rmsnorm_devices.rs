//! RMSNorm forward and backward (alone, fused with the residual add before it, and per head
//! fused with the RoPE after it) on every device present, against the f64 CPU reference.
//! One test body; the device list comes from `Device::available()` (CI requires lavapipe).

mod common;

use proptest::prelude::*;
use tuna::testing::token_ops::RopeCase;
use tuna::{ops, DType, Device, Tensor};

fn check(dev: Device, dtype: DType, rows: usize, cols: usize, seed: u64) -> Result<(), String> {
    tuna::testing::check_rmsnorm(dev, dtype, rows, cols, seed)
}

fn dtypes(dev: Device) -> Vec<DType> {
    match dev {
        Device::Cuda(_) => vec![DType::F32, DType::BF16],
        d if common::has_f16(d) => vec![DType::F32, DType::F16],
        _ => vec![DType::F32],
    }
}

#[test]
fn rmsnorm_matches_reference_on_every_device() {
    // Shapes around the 256-wide workgroup: shorter, longer, not a multiple, one row, many rows.
    let shapes = [(1, 1), (3, 7), (5, 256), (4, 257), (2, 1000), (130, 64), (1, 4096)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(rows, cols)) in shapes.iter().enumerate() {
                check(dev, dtype, rows, cols, i as u64).unwrap_or_else(|e| panic!("{dtype} [{rows}, {cols}]: {e}"));
            }
        }
    }
}

#[test]
fn fused_add_rmsnorm_matches_reference_on_every_device() {
    // h's direct gradient present (the residual stream's case) or not (the last norm's).
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(rows, cols)) in [(1, 1), (3, 7), (4, 257), (130, 64), (2, 1000)].iter().enumerate() {
                for y_only in [false, true] {
                    tuna::testing::check_add_rmsnorm(dev, dtype, rows, cols, y_only, i as u64).unwrap_or_else(|e| panic!("{dtype} [{rows}, {cols}], y only {y_only}: {e}"));
                }
            }
        }
    }
}

fn rope_case(tokens: usize, heads: usize, head_dim: usize, dtype: DType, seed: u64) -> RopeCase {
    RopeCase { tokens, heads, head_dim, max_position: 4096, dtype, seed }
}

#[test]
fn rmsnorm_rope_matches_reference_on_every_device() {
    // Head dims the fused CUDA kernels take (64, 128, 256: one to four pairs per lane) and two
    // they leave to rmsnorm then rope (16, 96); one row, rows across several blocks and a
    // partial last one; w trained or frozen.
    let shapes = [(1, 1, 64), (37, 3, 64), (5, 2, 128), (70, 4, 128), (3, 2, 256), (4, 3, 16), (6, 2, 96)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(t, h, d)) in shapes.iter().enumerate() {
                for train_w in [true, false] {
                    tuna::testing::check_rmsnorm_rope(dev, rope_case(t, h, d, dtype, i as u64), train_w).unwrap_or_else(|e| panic!("w trained {train_w}: {e}"));
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn rmsnorm_rope_random_shapes_on_every_device(tokens in 1usize..24, heads in 1usize..5, pairs in 1usize..5, seed: u64) {
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                tuna::testing::check_rmsnorm_rope(dev, rope_case(tokens, heads, 64 * pairs, dtype, seed), true).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn rmsnorm_random_shapes_on_every_device(rows in 1usize..40, cols in 1usize..600, seed: u64) {
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                check(dev, dtype, rows, cols, seed).map_err(TestCaseError::fail)?;
            }
        }
    }
}

#[test]
fn rmsnorm_has_no_kernel_for_bf16_on_wgpu_yet_and_says_so() {
    let Some(dev) = common::devices().into_iter().find(|d| matches!(d, Device::Wgpu(_))) else { return };
    let x = Tensor::zeros([2, 4], DType::BF16, &dev).unwrap();
    let w = Tensor::zeros([4], DType::BF16, &dev).unwrap();
    let e = ops::rmsnorm_forward(&x, &w, 1e-5).err().expect("bf16 on wgpu is not supported").to_string();
    assert!(e.contains("bf16"), "{e}");
}

#[test]
fn rope_frequencies_of_the_wrong_shape_or_type_are_named() {
    let x = Tensor::zeros([2, 3, 8], DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros([8], DType::F32, &Device::Cpu).unwrap();
    let pos = Tensor::from_vec_i32(vec![0, 1], [2]).unwrap();
    let short = Tensor::zeros([3], DType::F32, &Device::Cpu).unwrap();
    let ints = Tensor::from_vec_i32(vec![1; 4], [4]).unwrap();
    for freq in [&short, &ints] {
        let e = ops::rope(&x, &pos, freq).expect_err("refused").to_string();
        assert!(e.contains("inv_freq"), "{e}");
        let e = ops::rmsnorm_rope(&x, &w, 1e-6, &pos, freq).expect_err("refused").to_string();
        assert!(e.contains("inv_freq"), "{e}");
    }
    let good = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ops::rmsnorm_rope(&x, &w, 1e-6, &pos, &good).unwrap().dims(), [2, 3, 8]);
}
