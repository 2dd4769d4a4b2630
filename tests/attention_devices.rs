//! Flash attention on wgpu (lavapipe in CI) against the f64 reference, with DESIGN.md's
//! flash-attention rule: the error of O, dQ, dK, dV is at most twice that of the plain f32
//! implementation (the CPU path, which forms the softmax the textbook way) on the same inputs,
//! plus an absolute floor of 1e-6 for entries where both are at rounding level. Shapes cross
//! the 64-query / 64-key blocks and the 8-wide tiles. With f16 storage (adapters with
//! SHADER_F16; lavapipe has it) the inputs are rounded to f16 first and the bar is a naive f16
//! attention (`testing::attention::naive_half`: S, P, O, dP, dS and the gradients rounded).

mod common;

use proptest::prelude::*;
use tuna::device::wgpu::runtime;
use tuna::kernels::attention::wgsl::Precision;
use tuna::kernels::attention::{cpu, reference, split_kv_fits, wgsl, AttentionParams};
use tuna::rng::Rng;
use tuna::testing::attention::naive_half;
use tuna::{DType, Device};

struct Case {
    p: AttentionParams,
    packed: bool,
    seed: u64,
}

/// The largest absolute error; a NaN anywhere counts as infinite (`f64::max` alone skips it).
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
}

/// O, and with `backward` dQ, dK and dV, of the WGSL kernels (the forward by `kernel`) against
/// the reference with the 2x-naive rule.
fn check(dev_index: usize, c: &Case, kernel: wgsl::FwdKernel, backward: bool, precision: Precision) -> Result<(), String> {
    let p = &c.p;
    let mut rng = Rng::new(c.seed);
    let (qn, kn) = (p.batch * p.q_len * p.heads * p.head_dim, p.batch * p.kv_len * p.kv_heads * p.head_dim);
    let f16 = precision == Precision::F16;
    let mut gen = |n: usize| -> Vec<f32> {
        let x = rng.vec(n, -1.0, 1.0);
        if f16 {
            x.into_iter().map(|a| half::f16::from_f32(a).to_f32()).collect()
        } else {
            x
        }
    };
    let (q, k, v, dout) = (gen(qn), gen(kn), gen(kn), gen(qn));
    // Packed: examples start every 23 positions.
    let starts: Vec<u32> = (0..p.batch * p.q_len).map(|i| ((i % p.q_len) / 23 * 23) as u32).collect();
    let st = c.packed.then_some(starts.as_slice());
    let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let want_o = reference::forward(&f(&q), &f(&k), &f(&v), p, st);
    let (wq, wk, wv) = reference::backward(&f(&q), &f(&k), &f(&v), &f(&dout), p, st);
    // The naive implementation in the same precision sets the bar: the plain f32 CPU path, or
    // the naive f16 attention.
    let naive: [Vec<f64>; 4] = if f16 {
        naive_half(DType::F16, &f(&q), &f(&k), &f(&v), &f(&dout), p, st)
    } else {
        let mut o32 = vec![0.0f32; qn];
        cpu::forward(&q, &k, &v, &mut o32, p, st);
        let (mut dq32, mut dk32, mut dv32) = (vec![0.0f32; qn], vec![0.0f32; kn], vec![0.0f32; kn]);
        cpu::backward(&q, &k, &v, &dout, &mut dq32, &mut dk32, &mut dv32, p, st);
        [f(&o32), f(&dq32), f(&dk32), f(&dv32)]
    };

    let rt = runtime(dev_index).map_err(|e| e.to_string())?;
    let up = |x: &[f32]| {
        if f16 {
            rt.upload(bytemuck::cast_slice(&x.iter().map(|&a| half::f16::from_f32(a)).collect::<Vec<_>>()))
        } else {
            rt.upload(bytemuck::cast_slice(x))
        }
    };
    let (bq, bk, bv, bdo) = (up(&q), up(&k), up(&v), up(&dout));
    let bst = rt.upload(bytemuck::cast_slice(&starts));
    let rows = p.batch * p.q_len * p.heads;
    let (bo, bstats) = (rt.alloc_zeros(qn * 4), rt.alloc_zeros(rows * 8));
    let (bdq, bdk, bdv) = (rt.alloc_zeros(qn * 4), rt.alloc_zeros(kn * 4), rt.alloc_zeros(kn * 4));
    let sb = c.packed.then_some(bst.buffer());
    wgsl::forward(kernel, &rt.device, &rt.queue, &rt.kernels, bq.buffer(), bk.buffer(), bv.buffer(), sb, bo.buffer(), bstats.buffer(), p, precision).map_err(|e| e.to_string())?;
    if backward {
        wgsl::backward(&rt.device, &rt.queue, &rt.kernels, bq.buffer(), bk.buffer(), bv.buffer(), sb, bo.buffer(), bdo.buffer(), bstats.buffer(), bdq.buffer(), bdk.buffer(), bdv.buffer(), p, precision)
            .map_err(|e| e.to_string())?;
    }
    let down = |b: &wgpu::Buffer, n: usize| -> Vec<f32> {
        if f16 {
            // Copies move whole 4-byte words.
            let bytes = rt.download(b, (2 * n).next_multiple_of(4)).unwrap();
            bytes.chunks_exact(2).take(n).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect()
        } else {
            bytemuck::pod_collect_to_vec(&rt.download(b, n * 4).unwrap())
        }
    };
    let [no, ndq, ndk, ndv] = &naive;
    for (name, got, naive, want) in [
        ("O", down(bo.buffer(), qn), no, &want_o),
        ("dQ", down(bdq.buffer(), qn), ndq, &wq),
        ("dK", down(bdk.buffer(), kn), ndk, &wk),
        ("dV", down(bdv.buffer(), kn), ndv, &wv),
    ]
    .into_iter()
    .take(if backward { 4 } else { 1 })
    {
        let (e, bar) = (max_err(&got, want), 2.0 * max_err64(naive, want) + 1e-6);
        if e > bar {
            return Err(format!("{name} ({precision:?}, {kernel:?} forward): error {e:.3e} > {bar:.3e} (twice the naive error) for {p:?} packed={}", c.packed));
        }
    }
    Ok(())
}

fn max_err64(got: &[f64], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
}

/// The precisions wgpu adapter `i` runs.
fn precisions(i: usize) -> Vec<Precision> {
    if common::has_f16(Device::Wgpu(i)) {
        vec![Precision::F32, Precision::F16]
    } else {
        vec![Precision::F32]
    }
}

fn wgpu_devices() -> Vec<usize> {
    common::devices().into_iter().filter_map(|d| if let Device::Wgpu(i) = d { Some(i) } else { None }).collect()
}

#[allow(clippy::too_many_arguments)]
fn params(b: usize, t: usize, s: usize, h: usize, g: usize, d: usize, causal: bool, window: Option<usize>) -> AttentionParams {
    AttentionParams { batch: b, q_len: t, kv_len: s, heads: h, kv_heads: g, head_dim: d, causal, window, scale: 1.0 / (d as f32).sqrt() }
}

#[test]
fn flash_attention_wgsl_matches_reference() {
    let cases = [
        Case { p: params(1, 70, 70, 2, 1, 8, true, None), packed: false, seed: 1 },
        Case { p: params(2, 67, 67, 4, 2, 16, false, None), packed: false, seed: 2 },
        Case { p: params(1, 5, 80, 2, 2, 8, true, None), packed: false, seed: 3 }, // KV-cache offset
        Case { p: params(1, 70, 70, 2, 1, 8, true, Some(20)), packed: false, seed: 4 },
        Case { p: params(2, 70, 70, 2, 1, 8, true, None), packed: true, seed: 5 },
        Case { p: params(1, 9, 9, 1, 1, 128, true, None), packed: false, seed: 6 },
        Case { p: params(1, 12, 12, 2, 2, 64, false, None), packed: false, seed: 7 },
        // T > S without causal: the first queries sit before key 0, so a window still sees
        // every key from them (each key is less than W positions behind) and fewer later.
        Case { p: params(1, 40, 25, 2, 1, 8, false, Some(10)), packed: false, seed: 8 },
        Case { p: params(2, 30, 7, 2, 2, 8, false, None), packed: false, seed: 9 },
        // A head dim that is not a multiple of 4 (the kernels hold head vectors as vec4s).
        Case { p: params(2, 33, 41, 4, 2, 13, false, None), packed: false, seed: 10 },
        // Long enough that summing a key's 1500 dV terms one by one in f32 broke the 2x-naive
        // rule (the kernels now add a tile's 8 terms first), and far past where lavapipe's loop
        // limit cut the kernels when their head-dim loops ran per element (S 480 at D 64).
        Case { p: params(1, 1500, 1500, 1, 1, 64, true, None), packed: false, seed: 18 },
        // Gemma's head dim (the wide build of the kernels), with GQA, a window and packed rows,
        // and one past 128 that is not a multiple of 4. The split-KV forward stops at 128:
        // `Auto` takes the tiled one for decoding there.
        Case { p: params(1, 70, 70, 4, 2, 256, true, Some(20)), packed: false, seed: 20 },
        Case { p: params(2, 40, 40, 2, 1, 256, true, None), packed: true, seed: 21 },
        Case { p: params(1, 3, 50, 4, 1, 181, true, None), packed: false, seed: 22 },
    ];
    for i in wgpu_devices() {
        for c in &cases {
            // The tiled forward on every case, and the split-KV one where it applies.
            let mut kernels = vec![wgsl::FwdKernel::Tiled, wgsl::FwdKernel::Auto];
            if !c.packed && split_kv_fits(&c.p) && c.p.head_dim <= 128 {
                kernels.push(wgsl::FwdKernel::SplitKv);
            }
            for pr in precisions(i) {
                for &kernel in &kernels {
                    check(i, c, kernel, true, pr).unwrap_or_else(|e| panic!("wgpu:{i}: {e}"));
                }
            }
        }
    }
}

/// The WGSL split-KV forward (decoding) on caches of one to several 256-key chunks, with
/// partial 64-key tiles, GQA groups of 1 to 16 rows, head dims up to 128, causal with the cache
/// offset, a window, more queries than keys; the (tiled) backward runs on its log-sum-exp.
/// Asked for by name on packed rows or a group past 16 rows, an error.
///
/// Lavapipe ends every loop of an invocation after about 65,000 iterations in all, silently
/// (llvmpipe's loop limiter). The tiled kernels give one query (or key) to an invocation, which
/// loops over every key (query): about S/8·(D/2 + D/32 + 5) iterations for the forward or dQ
/// (8 keys a pass, the head dim in vec4s), wrong from S 14,000 at D 64. On lavapipe the tiled
/// forward refuses such a cache; split-KV's loops (at most ~18k an invocation whatever S) get
/// it right.
#[test]
fn flash_attention_wgsl_split_kv_matches_reference() {
    let cases = [
        (Case { p: params(2, 1, 700, 8, 2, 16, true, None), packed: false, seed: 11 }, true),
        (Case { p: params(1, 4, 520, 8, 2, 24, true, None), packed: false, seed: 12 }, true),
        (Case { p: params(1, 2, 600, 4, 4, 16, true, Some(100)), packed: false, seed: 13 }, true),
        (Case { p: params(1, 1, 120, 16, 1, 128, true, None), packed: false, seed: 14 }, true),
        (Case { p: params(1, 3, 100, 12, 3, 96, false, None), packed: false, seed: 15 }, true),
        (Case { p: params(1, 4, 3, 4, 2, 20, false, Some(2)), packed: false, seed: 16 }, true),
        (Case { p: params(1, 1, 3000, 8, 2, 64, true, None), packed: false, seed: 17 }, false),
        (Case { p: params(1, 1, 16000, 8, 2, 64, true, None), packed: false, seed: 19 }, false),
    ];
    for i in wgpu_devices() {
        for (c, backward) in &cases {
            assert!(split_kv_fits(&c.p));
            for pr in precisions(i) {
                check(i, c, wgsl::FwdKernel::SplitKv, *backward, pr).unwrap_or_else(|e| panic!("wgpu:{i}: {e}"));
            }
        }
        // The long cache through the tiled forward: on lavapipe past its loop limit, an error.
        if tuna::device::wgpu::adapter_details()[i].name.to_lowercase().contains("llvmpipe") {
            let err = check(i, &cases[7].0, wgsl::FwdKernel::Tiled, false, Precision::F32).unwrap_err();
            assert!(err.contains("past llvmpipe's limit of 65535"), "{err}");
        }
        let refused = [Case { p: params(1, 5, 5, 8, 2, 64, true, None), packed: false, seed: 0 }, Case { p: params(1, 8, 8, 2, 2, 16, true, None), packed: true, seed: 0 }];
        for c in &refused {
            let err = check(i, c, wgsl::FwdKernel::SplitKv, false, Precision::F32).unwrap_err();
            assert!(err.contains("split-KV kernel takes at most 16 query rows"), "{err}");
        }
        let err = check(i, &Case { p: params(1, 1, 40, 4, 2, 256, true, None), packed: false, seed: 0 }, wgsl::FwdKernel::SplitKv, false, Precision::F32).unwrap_err();
        assert!(err.contains("split-KV kernel takes head dims up to 128, got 256"), "{err}");
    }
}

#[test]
fn flash_attention_wgsl_rejects_bad_input() {
    for i in wgpu_devices() {
        let rt = runtime(i).unwrap();
        let buf = |bytes: u64| {
            rt.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: bytes, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false })
        };
        let p = params(1, 4, 4, 2, 1, 300, true, None);
        let (q, k, v, o, st) = (buf(9600 * 4), buf(4800 * 4), buf(4800 * 4), buf(9600 * 4), buf(64));
        let err = wgsl::forward(wgsl::FwdKernel::Auto, &rt.device, &rt.queue, &rt.kernels, &q, &k, &v, None, &o, &st, &p, Precision::F32).unwrap_err();
        assert!(err.to_string().contains("head dim 300"), "{err}");
        let p = params(1, 4, 4, 2, 1, 8, true, None);
        let small = buf(16);
        let err = wgsl::forward(wgsl::FwdKernel::Auto, &rt.device, &rt.queue, &rt.kernels, &small, &k, &v, None, &o, &st, &p, Precision::F32).unwrap_err();
        assert!(err.to_string().contains("`q`"), "{err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn flash_attention_wgsl_random_shapes(b in 1usize..3, t in 1usize..40, extra in 0usize..12, g in 1usize..3, group in 1usize..3,
                                          d in 1usize..20, causal: bool, packed: bool, seed: u64) {
        let s = t + extra;
        let p = params(b, t, s, g * group, g, d, causal, None);
        // Packed rows need T == S (one sequence per row, split into examples).
        let c = Case { p: if packed { AttentionParams { kv_len: t, ..p } } else { p }, packed, seed };
        for i in wgpu_devices() {
            for pr in precisions(i) {
                check(i, &c, wgsl::FwdKernel::Auto, true, pr).map_err(TestCaseError::fail)?;
            }
        }
    }
}

/// Gemma's head dim 256 on each CUDA device (the emulator in CI; gpu-check runs every head dim
/// over more shapes): the first forward kernel and the backward, both with two blocks sharing
/// the output's columns, and the split-KV forward, against the f64 reference with the 2x-naive
/// rule; GQA, a window, a KV-cache offset, packed rows, lengths off the 64-row tiles. The
/// pipelined forward stops at 128: asked for by name, an error.
#[test]
fn flash_attention_cuda_head_dim_256_matches_reference() {
    use tuna::kernels::attention::cuda::{BwdKernel, FwdKernel};
    use tuna::testing::attention::{check_flash_attention_cuda, FaCase};
    let cuda: Vec<usize> = common::devices().into_iter().filter_map(|d| if let Device::Cuda(i) = d { Some(i) } else { None }).collect();
    // (B, T, S, H, G, causal, window, packed)
    let shapes = [(1, 70, 70, 4, 2, true, Some(20), false), (2, 40, 40, 2, 1, true, None, true), (1, 5, 90, 2, 2, true, None, false), (1, 33, 20, 2, 1, false, None, false)];
    for i in cuda {
        for (n, &(batch, q_len, kv_len, heads, kv_heads, causal, window, packed)) in shapes.iter().enumerate() {
            let p = AttentionParams { batch, q_len, kv_len, heads, kv_heads, head_dim: 256, causal, window, scale: 1.0 / 16.0 };
            let dtype = if n % 2 == 0 { DType::BF16 } else { DType::F16 };
            let case = FaCase { p, packed, seed: n as u64, kernel: Some(FwdKernel::Sync), bwd: Some(BwdKernel::Sync), dtype };
            check_flash_attention_cuda(i, &case).unwrap_or_else(|e| panic!("cuda:{i} {dtype} {p:?} packed {packed}: {e}"));
        }
        let p = AttentionParams { batch: 1, q_len: 2, kv_len: 300, heads: 8, kv_heads: 2, head_dim: 256, causal: true, window: Some(100), scale: 1.0 / 16.0 };
        check_flash_attention_cuda(i, &FaCase { p, packed: false, seed: 9, kernel: Some(FwdKernel::SplitKv), bwd: None, dtype: DType::BF16 }).unwrap_or_else(|e| panic!("cuda:{i} split-KV {p:?}: {e}"));
        let err = check_flash_attention_cuda(i, &FaCase { p, packed: false, seed: 0, kernel: Some(FwdKernel::Pipelined), bwd: None, dtype: DType::BF16 }).unwrap_err();
        assert!(err.contains("pipelined kernel takes head dims up to 128"), "{err}");
    }
}

/// The CUDA split-KV forward (decoding: a few query rows per key/value head over a long cache)
/// against the f64 reference with the same 2x-naive rule, on each CUDA device (the emulator in
/// CI): caches of one to several 256-key chunks, GQA groups of 1 to 16 rows, causal with the
/// cache offset, a window, more queries than keys. gpu-check runs the same kernel over more
/// shapes and every head dim.
#[test]
fn flash_attention_cuda_split_kv_matches_reference() {
    use tuna::kernels::attention::cuda::FwdKernel;
    use tuna::testing::attention::{check_flash_attention_cuda, FaCase};
    let cuda: Vec<usize> = common::devices().into_iter().filter_map(|d| if let Device::Cuda(i) = d { Some(i) } else { None }).collect();
    // (B, T, S, H, G, D, causal, window)
    let shapes = [
        (2, 1, 700, 8, 2, 64, true, None),
        (1, 4, 1500, 8, 2, 128, true, None),
        (1, 2, 600, 4, 4, 32, true, Some(100)),
        (1, 3, 257, 12, 3, 96, false, None),
        (1, 4, 3, 4, 2, 64, false, Some(2)),
    ];
    for i in cuda {
        for (n, &(batch, q_len, kv_len, heads, kv_heads, d, causal, window)) in shapes.iter().enumerate() {
            let p = AttentionParams { batch, q_len, kv_len, heads, kv_heads, head_dim: d, causal, window, scale: 1.0 / (d as f32).sqrt() };
            assert!(split_kv_fits(&p));
            for dtype in [DType::BF16, DType::F16] {
                let case = FaCase { p, packed: false, seed: n as u64, kernel: Some(FwdKernel::SplitKv), bwd: None, dtype };
                check_flash_attention_cuda(i, &case).unwrap_or_else(|e| panic!("cuda:{i} {dtype} {p:?}: {e}"));
            }
        }
        // Packed rows and groups past 16 rows go to the tiled kernels; asked for by name, an error.
        let p = AttentionParams { batch: 1, q_len: 5, kv_len: 5, heads: 8, kv_heads: 2, head_dim: 64, causal: true, window: None, scale: 0.125 };
        assert!(!split_kv_fits(&p));
        let err = check_flash_attention_cuda(i, &FaCase { p, packed: false, seed: 0, kernel: Some(FwdKernel::SplitKv), bwd: None, dtype: DType::BF16 }).unwrap_err();
        assert!(err.contains("split-KV kernel takes at most 16 query rows"), "{err}");
    }
}
