//! RoPE, the fused gated linear unit (SwiGLU, GeGLU), the embedding gather / scatter-add and sparse fine-tuning's linear,
//! forward and backward, on every
//! device present, against their f64 references; casts between f32, f16 and bf16 against the
//! CPU's bit for bit. The check bodies and their tolerances live
//! in `tuna::testing::token_ops` (shared with `tools/gpu-check`, which runs them on CUDA in f32 and
//! bf16; wgpu runs f32 and, with SHADER_F16, f16); the device list comes from `common::devices()`, which fails under
//! TUNA_REQUIRE_WGPU=1 when no wgpu adapter is found. Shapes stay small for lavapipe.

mod common;

use proptest::prelude::*;
use tuna::kernels::elementwise::{self, GluAct, GluParams};
use tuna::kernels::embedding::EmbeddingParams;
use tuna::kernels::rope::{Direction, RopeParams};
use tuna::testing::cast::check_cast;
use tuna::testing::sparse::{check_sparse_linear, SparseCase};
use tuna::testing::token_ops::{check_embedding, check_rope, check_rope_angles, check_glu, RopeCase};
use tuna::device::wgpu::Precision;
use tuna::{DType, Device, Tensor};

fn dtypes(dev: Device) -> Vec<DType> {
    match dev {
        Device::Cuda(_) => vec![DType::F32, DType::BF16],
        d if common::has_f16(d) => vec![DType::F32, DType::F16],
        _ => vec![DType::F32],
    }
}

fn rope_case(tokens: usize, heads: usize, head_dim: usize, max_position: usize, dtype: DType, seed: u64) -> RopeCase {
    RopeCase { tokens, heads, head_dim, max_position, dtype, seed }
}

#[test]
fn casts_match_the_cpu_bit_for_bit_on_every_device() {
    // Odd and even lengths; the largest crosses many 256-wide workgroups.
    for dev in common::devices() {
        for (i, n) in [20usize, 21, 4097, 100_001].into_iter().enumerate() {
            check_cast(dev, n, i as u64).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn greedy_argmax_picks_as_the_cpu_on_every_device() {
    // One column, fewer than a workgroup, a ragged number of strides, and SmolLM's vocabulary.
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, v) in [1usize, 7, 300, 49_152].into_iter().enumerate() {
                tuna::testing::argmax::check_argmax(dev, dtype, v, i as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn matmul_with_every_transposition_matches_f64_on_every_device() {
    // Ragged sizes (not multiples of any tile); gpu-check runs the same body on CUDA in bf16,
    // where a transposed a goes through the transpose kernel.
    for dev in common::devices() {
        // The CUDA GEMM is 16-bit only.
        for dtype in dtypes(dev).into_iter().filter(|&d| !(matches!(dev, Device::Cuda(_)) && d == DType::F32)) {
            for (i, mnk) in [(1, 1, 1), (5, 67, 33), (70, 9, 130)].into_iter().enumerate() {
                tuna::testing::token_ops::check_matmul(dev, dtype, mnk, i as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

/// The dtypes `sparse_linear` runs in: the model's (f32 on the CPU and wgpu, f16 on wgpu with
/// SHADER_F16, bf16 on CUDA, whose GEMM is 16-bit).
fn sparse_dtypes(dev: Device) -> Vec<DType> {
    dtypes(dev).into_iter().filter(|&d| !(matches!(dev, Device::Cuda(_)) && d == DType::F32)).collect()
}

#[test]
fn sparse_linear_matches_f64_on_every_device() {
    // `testing::sparse::CASES` (gpu-check runs them on CUDA in bf16).
    for dev in common::devices() {
        for dtype in sparse_dtypes(dev) {
            for (i, c) in tuna::testing::sparse::CASES.into_iter().enumerate() {
                check_sparse_linear(dev, dtype, c, i as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn add_and_scale_match_the_cpu_bit_for_bit_in_each_gpu_dtype() {
    // The shared body gpu-check runs on CUDA (f32 and bf16); here on every GPU present. (f16
    // on wgpu rounds as the driver converts, so the next test bounds it instead.)
    for dev in common::devices().into_iter().filter(|d| *d != Device::Cpu) {
        for dtype in dtypes(dev).into_iter().filter(|d| *d != DType::F16) {
            for (i, (m, n)) in [(1, 1), (37, 301), (3, 1025)].into_iter().enumerate() {
                tuna::testing::token_ops::check_add_scale(dev, dtype, m, n, i as u64).unwrap();
            }
        }
    }
}

#[test]
fn add_and_scale_match_the_cpu_bit_for_bit_on_every_device() {
    // One f32 operation per element, so the device must give the CPU's bits: add with b the
    // same shape and b a bias broadcast over rows; scale by a host factor; scale_by a device
    // factor (the fused losses' backward).
    use tuna::ops;
    let mut rng = tuna::testing::Rng::new(11);
    let (m, n) = (37, 301);
    let a = Tensor::from_vec(rng.vec(m * n, -3.0, 3.0), [m, n]).unwrap();
    let full = Tensor::from_vec(rng.vec(m * n, -3.0, 3.0), [m, n]).unwrap();
    let bias = Tensor::from_vec(rng.vec(n, -3.0, 3.0), [n]).unwrap();
    for dev in common::devices() {
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        for (what, b) in [("same shape", &full), ("bias over rows", &bias)] {
            let want = ops::add(&a, b).unwrap().to_vec_f32().unwrap();
            let got = ops::add(&on(&a), &on(b)).unwrap().to_vec_f32().unwrap();
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "add ({what}) on {dev}");
        }
        let want = ops::scale(&a, -0.37).unwrap().to_vec_f32().unwrap();
        let got = ops::scale(&on(&a), -0.37).unwrap().to_vec_f32().unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "scale on {dev}");
        if let Device::Wgpu(i) = dev {
            let rt = tuna::device::wgpu::runtime(i).unwrap();
            if rt.has_f16() {
                // f16 storage, f32 math: the CPU's f32 result within f16's rounding.
                let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_device(&dev).unwrap();
                let to64 = |t: Tensor| t.to_dtype(DType::F32).unwrap().to_vec_f32().unwrap().into_iter().map(f64::from).collect::<Vec<_>>();
                let (a16, b16) = (half(&a), half(&bias));
                let (a_r, b_r) = (a.to_dtype(DType::F16).unwrap(), bias.to_dtype(DType::F16).unwrap());
                let want = to64(ops::add(&a_r.to_dtype(DType::F32).unwrap(), &b_r.to_dtype(DType::F32).unwrap()).unwrap());
                let got = ops::add(&a16, &b16).unwrap();
                assert_eq!(got.dtype(), DType::F16);
                tuna::testing::compare(&format!("add f16 on {dev}"), &got.to_vec_f32().unwrap(), &want, tuna::testing::Tolerance::F16).unwrap();
                let want = to64(ops::scale(&a_r.to_dtype(DType::F32).unwrap(), -0.37).unwrap());
                tuna::testing::compare(&format!("scale f16 on {dev}"), &ops::scale(&a16, -0.37).unwrap().to_vec_f32().unwrap(), &want, tuna::testing::Tolerance::F16).unwrap();
                let mixed = ops::add(&a16, &on(&bias)).unwrap_err().to_string();
                assert!(mixed.contains("add"), "f16 + f32 is an error naming the op: {mixed}");
            }
            let (ab, sb, yb) = (rt.upload(&a.to_bytes().unwrap()), rt.upload(bytemuck::bytes_of(&-0.37f32)), rt.alloc(4 * m * n));
            elementwise::wgsl::scale_by(&rt.device, &rt.queue, &rt.kernels, ab.buffer(), sb.buffer(), yb.buffer(), m * n).unwrap();
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&rt.download(yb.buffer(), 4 * m * n).unwrap());
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "scale_by on {dev}");
        }
    }
}

#[test]
fn cast_passes_the_gradient_back_in_the_source_dtype() {
    // x (f32, trained) -> f16 -> scale by 3 (in f16 on wgpu; on the CPU back in f32 first) ->
    // f32, seeded with dy = 1: dx = 3 everywhere, in f32, and the forward equals the
    // f16-rounded values.
    use tuna::{ops, Tape};
    let vals: Vec<f32> = (0..37).map(|i| 0.1 * i as f32 - 1.7).collect();
    for dev in common::devices() {
        let half_math = common::has_f16(dev);
        let tape = Tape::new();
        let x = tape.param(&Tensor::from_slice(&vals, [37], &dev).unwrap());
        let h = ops::cast(&x, DType::F16).unwrap();
        assert_eq!(h.dtype(), DType::F16);
        let y = if half_math { ops::cast(&ops::scale(&h, 3.0).unwrap(), DType::F32).unwrap() } else { ops::scale(&ops::cast(&h, DType::F32).unwrap(), 3.0).unwrap() };
        let want: Vec<f32> = vals.iter().map(|&v| half::f16::from_f32(3.0 * half::f16::from_f32(v).to_f32()).to_f32()).collect();
        let got = y.to_vec_f32().unwrap();
        if half_math {
            assert_eq!(got, want, "f16 forward on {dev}");
        }
        // dy = 1 everywhere (sum's gradient; `sum` itself has no wgpu kernel).
        let g = tape.backward_from(&y, &Tensor::from_slice(&[1.0f32; 37], [37], &dev).unwrap()).unwrap();
        let dx = g.get(&x).expect("x has a gradient");
        assert_eq!(dx.dtype(), DType::F32, "the gradient comes back in x's dtype on {dev}");
        assert_eq!(dx.to_vec_f32().unwrap(), vec![3.0; 37], "dx on {dev}");
        assert!(ops::cast(&x, DType::F32).unwrap().id() == x.id(), "same dtype: the identity");
    }
}

#[test]
fn rope_matches_reference_on_every_device() {
    // (tokens, heads, D, positions below): D = 2 and odd D/2, heads * D/2 around the 256-wide
    // workgroup, Llama's D = 64 and 128, positions up to long-context lengths.
    let shapes = [(1, 1, 2, 1), (3, 2, 6, 10), (5, 3, 64, 2048), (2, 8, 128, 131_072), (7, 5, 130, 4096), (40, 4, 32, 1 << 20)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(t, h, d, maxp)) in shapes.iter().enumerate() {
                check_rope(dev, rope_case(t, h, d, maxp, dtype, i as u64)).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn rope_cos_sin_are_accurate_up_to_2_pow_20_radians_on_every_device() {
    // Every position below 4096, then a stride through [0, 2^20], at inv_freq 1 (the angle is
    // the position) and at a Llama frequency (an f32 product that is not exact).
    let mut positions: Vec<i32> = (0..4096).collect();
    positions.extend((0..=(1 << 20)).step_by(997));
    positions.push(1 << 20);
    for dev in common::devices() {
        for freq in [1.0, 0.749_894_2, 1e-4] {
            check_rope_angles(dev, &positions, freq).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn glu_matches_reference_on_every_device() {
    // Ragged around the 256-wide column blocks; one row, many rows.
    let shapes = [(1, 1), (3, 7), (5, 256), (4, 257), (2, 1000), (130, 64)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(rows, cols)) in shapes.iter().enumerate() {
                for packed in [false, true] {
                    for act in [GluAct::Silu, GluAct::GeluTanh] {
                        check_glu(dev, dtype, GluParams { rows, cols, act }, packed, i as u64).unwrap_or_else(|e| panic!("{e}"));
                    }
                }
            }
        }
    }
}

#[test]
fn embedding_matches_reference_on_every_device() {
    // (T, V, E): one token; ids that all repeat (V = 1, 3); T past one and several chunks of
    // 256 tokens with repeats across chunks; E past the 256-wide column stride; V > T.
    let shapes = [(1, 1, 1), (5, 1, 3), (40, 3, 17), (300, 7, 260), (700, 50, 33), (600, 2000, 64)];
    for dev in common::devices() {
        for dtype in dtypes(dev) {
            for (i, &(t, v, e)) in shapes.iter().enumerate() {
                check_embedding(dev, dtype, t, v, e, i as u64).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rope_random_shapes_on_every_device(tokens in 1usize..40, heads in 1usize..6, half in 1usize..80, max_position in 1usize..100_000, seed: u64) {
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                check_rope(dev, rope_case(tokens, heads, 2 * half, max_position, dtype, seed)).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn glu_random_shapes_on_every_device(rows in 1usize..40, cols in 1usize..600, packed: bool, gelu: bool, seed: u64) {
        let act = if gelu { GluAct::GeluTanh } else { GluAct::Silu };
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                check_glu(dev, dtype, GluParams { rows, cols, act }, packed, seed).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn sparse_linear_random_shapes_on_every_device(batch in 1usize..3, rows in 1usize..20, n in 1usize..50, k in 1usize..50, density in 0.0f64..0.6, bias: bool, weight_grad: bool, seed: u64) {
        let nnz = ((n * k) as f64 * density) as usize;
        let c = SparseCase { batch, m: batch * rows, n, k, nnz, bias, weight_grad };
        for dev in common::devices() {
            for dtype in sparse_dtypes(dev) {
                check_sparse_linear(dev, dtype, c, seed).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn embedding_random_shapes_on_every_device(tokens in 1usize..600, vocab in 1usize..300, dim in 1usize..300, seed: u64) {
        for dev in common::devices() {
            for dtype in dtypes(dev) {
                check_embedding(dev, dtype, tokens, vocab, dim, seed).map_err(TestCaseError::fail)?;
            }
        }
    }
}

/// Bad shapes come back as errors that name the op and the buffer, on every device's launchers.
#[test]
fn bad_shapes_name_the_op_and_the_buffer() {
    let p = GluParams { rows: 4, cols: 8, act: GluAct::Silu };
    let (g, small) = (vec![0.0f32; 32], vec![0.0f32; 31]);
    let e = elementwise::cpu::glu(&g, &small, &mut [0.0; 32], p).unwrap_err().to_string();
    assert!(e.contains("glu_fwd") && e.contains("`u`"), "{e}");
    let e = elementwise::cpu::glu_backward_packed(&g, &g, &mut [0.0; 64], p).unwrap_err().to_string();
    assert!(e.contains("glu_bwd_packed") && e.contains("`gu`"), "{e}");

    let Some(Device::Wgpu(i)) = common::devices().into_iter().find(|d| matches!(d, Device::Wgpu(_))) else { return };
    let rt = tuna::device::wgpu::runtime(i).unwrap();
    let (d, q, k) = (&rt.device, &rt.queue, &rt.kernels);
    // Pool buffers hold at least 64 f32; ask for more than that.
    let b = rt.alloc(256);
    let big = rt.alloc(4096);
    let rp = RopeParams { tokens: 8, heads: 4, head_dim: 8 };
    let e = tuna::kernels::rope::wgsl::rope(d, q, k, b.buffer(), b.buffer(), b.buffer(), big.buffer(), rp, Direction::Backward, Precision::F32).unwrap_err().to_string();
    assert!(e.contains("rope_bwd") && e.contains("`dy`"), "{e}");
    let odd = RopeParams { head_dim: 7, ..rp };
    let e = tuna::kernels::rope::wgsl::rope(d, q, k, big.buffer(), b.buffer(), b.buffer(), big.buffer(), odd, Direction::Forward, Precision::F32).unwrap_err().to_string();
    assert!(e.contains("rope_fwd") && e.contains("even"), "{e}");
    let ep = EmbeddingParams { tokens: 10, vocab: 100, dim: 8 };
    let e = tuna::kernels::embedding::wgsl::backward(d, q, k, b.buffer(), b.buffer(), big.buffer(), ep, Precision::F32).unwrap_err().to_string();
    assert!(e.contains("embedding_bwd") && e.contains("`dy`"), "{e}");
    let e = tuna::kernels::embedding::wgsl::forward(d, q, k, b.buffer(), b.buffer(), big.buffer(), ep, Precision::F32).unwrap_err().to_string();
    assert!(e.contains("embedding_fwd") && e.contains("`table`"), "{e}");
    let sp = GluParams { rows: 16, cols: 4, act: GluAct::GeluTanh };
    let e = elementwise::wgsl::backward_packed(d, q, k, big.buffer(), big.buffer(), b.buffer(), sp, Precision::F32).unwrap_err().to_string();
    assert!(e.contains("glu_bwd_packed") && e.contains("`dgu`"), "{e}");
}
