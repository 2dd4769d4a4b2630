//! NF4 against bitsandbytes itself (`tools/fixtures/make_nf4_fixture.py`): the dynamic map, the
//! packed codes, the double-quantized absmax and the dequantized values.

use std::path::Path;

use tuna::io::safetensors::WeightFiles;
use tuna::kernels::nf4::{cpu, dynamic_map, Nf4Tensor, NF4};
use tuna::Device;

fn fixture() -> WeightFiles {
    WeightFiles::from_paths(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/nf4/nf4.safetensors")]).unwrap()
}

fn f32s(w: &WeightFiles, k: &str) -> Vec<f32> {
    w.load_raw(k, &Device::Cpu).unwrap().to_vec_f32().unwrap()
}

fn u8s(w: &WeightFiles, k: &str) -> Vec<u8> {
    w.load_raw(k, &Device::Cpu).unwrap().to_vec::<u8>().unwrap()
}

#[test]
fn tables_match_bitsandbytes() {
    let w = fixture();
    assert_eq!(f32s(&w, "nf4_code"), NF4);
    assert_eq!(f32s(&w, "code2"), dynamic_map());
}

#[test]
fn quantize_and_dequantize_match_bitsandbytes() {
    let w = fixture();
    for case in ["matrix", "ragged", "codes"] {
        let x = f32s(&w, &format!("{case}.weight"));
        let q = cpu::quantize(&x);
        assert_eq!(q.packed, u8s(&w, &format!("{case}.packed")), "{case}: packed codes");
        assert_eq!(q.absmax, u8s(&w, &format!("{case}.absmax")), "{case}: absmax indices");
        let offset = f32s(&w, &format!("{case}.offset"))[0];
        assert!((q.offset - offset).abs() <= 4.0 * f32::EPSILON * offset.abs(), "{case}: offset {} vs {offset}", q.offset);
        // The offset is a mean, which torch sums in its own order; it and the second-level
        // absmax values that depend on it agree to a few ulp (and both are stored, so each
        // side dequantizes its own file exactly).
        for (a, b) in q.absmax2.iter().zip(f32s(&w, &format!("{case}.absmax2"))) {
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * b.abs(), "{case}: second-level absmax {a} vs {b}");
        }
        // Dequantize bitsandbytes' own quantization (its stored offset) and compare exactly.
        let theirs = Nf4Tensor { offset, absmax2: f32s(&w, &format!("{case}.absmax2")), ..q.clone() };
        assert_eq!(cpu::dequantize(&theirs).unwrap(), f32s(&w, &format!("{case}.dequant")), "{case}: dequantized");
    }
}

#[test]
fn round_trip_error_and_size() {
    let mut rng = tuna::rng::Rng::new(5);
    let x = rng.vec(64 * 1024, -2.0, 2.0);
    let q = cpu::quantize(&x);
    let y = cpu::dequantize(&q).unwrap();
    let a = cpu::absmax(&q);
    for (i, (u, v)) in x.iter().zip(&y).enumerate() {
        // Half the widest gap between NF4 codes (-0.6962 - -1.0) times the block's absmax,
        // plus the double quantization's error on the absmax itself (under 1%).
        let bound = (0.5 * (1.0 - 0.696_192_8) + 0.01) * a[i / 64];
        assert!((u - v).abs() <= bound, "element {i}: {u} -> {v}");
    }
    assert!((q.bits_per_weight() - 4.127).abs() < 0.001, "{}", q.bits_per_weight());
    let bad = Nf4Tensor { packed: vec![0; 3], ..q };
    assert!(cpu::dequantize(&bad).unwrap_err().to_string().contains("packed bytes"));
    // NF4 tensors come only from quantized data, with clear errors otherwise.
    assert!(tuna::Tensor::zeros([4], tuna::DType::NF4, &Device::Cpu).unwrap_err().to_string().contains("from_nf4"));
    assert!(tuna::Tensor::from_bytes(&[0; 4], tuna::DType::NF4, [8], &Device::Cpu).unwrap_err().to_string().contains("from_nf4"));
    assert!(tuna::Tensor::from_nf4(cpu::quantize(&[1.0; 10]), [3, 3]).is_err());
}

#[test]
fn dequantize_transposed_is_the_transpose_of_dequantize() {
    // The one-pass transposed form the CPU's GEMM reads (cols a multiple of 64: tiles; else
    // the fallback), bit for bit, against dequantize then transpose.
    let mut rng = tuna::rng::Rng::new(9);
    for (rows, cols) in [(1, 64), (130, 192), (64, 4096), (7, 100), (3, 1)] {
        let q = cpu::quantize(&rng.vec(rows * cols, -3.0, 3.0));
        let d = cpu::dequantize(&q).unwrap();
        let want = tuna::kernels::matmul::cpu::transpose(&d, rows, cols);
        assert_eq!(cpu::dequantize_transposed(&q, rows, cols).unwrap(), want, "[{rows}, {cols}]");
    }
    let q = cpu::quantize(&[1.0; 128]);
    assert!(cpu::dequantize_transposed(&q, 3, 64).unwrap_err().to_string().contains("[3, 64] for 128 elements"));
}

#[test]
fn nf4_products_match_the_dequantized_weights() {
    // x·Wᵀ and dy·W with W in NF4, decoded a tile at a time for few rows (m <= 64, K a multiple
    // of 64), a panel of 512 rows of W at a time for more, whole where K is not a multiple of
    // 64, against the same products on the dequantized W (f64 sums). On
    // an AVX-512 CPU, W is decoded in registers for x·Wᵀ with m <= 16 (K 512 at a time) and for
    // dy·W with m <= 32 (6 rows of dy, 4 blocks of 64 columns and 1024 rows of W at a time):
    // shapes past each of those steps, with ragged ends.
    let mut rng = tuna::rng::Rng::new(11);
    // Past 64 rows W is decoded 512 rows at a time (one panel, two, a ragged last one).
    let shapes = [(1, 70, 64), (5, 130, 192), (16, 77, 1088), (9, 130, 576), (17, 20, 128), (64, 3, 128), (65, 33, 64), (3, 20, 100), (7, 2100, 320), (32, 1030, 64), (33, 40, 128), (70, 1100, 128), (66, 512, 192), (65, 30, 100)];
    for (m, n, k) in shapes {
        let q = cpu::quantize(&rng.vec(n * k, -1.0, 1.0));
        let w = cpu::dequantize(&q).unwrap();
        let (x, dy) = (rng.vec(m * k, -1.0, 1.0), rng.vec(m * n, -1.0, 1.0));
        let y = cpu::matmul_xwt(&q, &x, m, n, k).unwrap();
        let dx = cpu::matmul_dyw(&q, &dy, m, n, k).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|e| x[i * k + e] as f64 * w[j * k + e] as f64).sum();
                assert!((y[i * n + j] as f64 - want).abs() <= 1e-5 * (k as f64).sqrt() * 4.0, "x·Wᵀ [{m}, {n}, {k}] at ({i}, {j}): {} vs {want}", y[i * n + j]);
            }
            for e in 0..k {
                let want: f64 = (0..n).map(|j| dy[i * n + j] as f64 * w[j * k + e] as f64).sum();
                assert!((dx[i * k + e] as f64 - want).abs() <= 1e-5 * (n as f64).sqrt() * 4.0, "dy·W [{m}, {n}, {k}] at ({i}, {e}): {} vs {want}", dx[i * k + e]);
            }
        }
    }
    // Empty products give empty or zero results, not a panic.
    let empty = cpu::quantize(&[]);
    assert_eq!(cpu::matmul_xwt(&empty, &[1.0; 128], 2, 0, 64).unwrap(), Vec::<f32>::new());
    assert_eq!(cpu::matmul_dyw(&empty, &[], 2, 0, 64).unwrap(), vec![0.0; 128]);
    assert_eq!(cpu::dequantize_transposed(&empty, 0, 64).unwrap(), Vec::<f32>::new());
    let q = cpu::quantize(&[1.0; 128]);
    assert!(cpu::matmul_xwt(&q, &[0.0; 64], 1, 3, 64).unwrap_err().to_string().contains("W [3, 64] for 128 elements"));
    assert!(cpu::matmul_xwt(&q, &[0.0; 63], 1, 2, 64).unwrap_err().to_string().contains("x has 63 elements"));
}
