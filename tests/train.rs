//! The trainer: exact resume, gradient accumulation, the three methods, optimizer state size,
//! the loss-curve image.

mod common;

use std::path::Path;

use tuna::nn::Llama;
use tuna::optim::{Layout, OptimizerConfig, Sm3Config};
use tuna::peft::{load_adapter, LoraConfig, Regrow, SparseConfig};
use tuna::rng::Rng;
use tuna::train::data::Sequence;
use tuna::train::{Method, TrainConfig, Trainer};

fn base() -> Llama {
    Llama::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")).unwrap()
}

/// Sequences of a learnable pattern (counting up by one from a random start, mod 300).
fn data(n: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 6 + rng.below(6);
            let start = rng.below(300) as u32;
            let ids: Vec<u32> = (0..len as u32).map(|i| 4 + (start + i) % 300).collect();
            let mut mask = vec![true; len];
            mask[0] = false;
            Sequence { ids, mask, starts: Vec::new() }
        })
        .collect()
}

fn lora(dropout: f32) -> Method {
    Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout, ..Default::default() })
}

fn cfg(method: Method, batch: usize, accum: usize) -> TrainConfig {
    TrainConfig { method, lr: 1e-2, warmup_steps: 2, epochs: 3, batch_size: batch, grad_accum: accum, seed: 7, ..Default::default() }
}

fn tmp(tag: &str) -> common::Scratch {
    common::Scratch::new(&format!("train-{tag}"))
}

#[test]
fn resume_continues_to_exactly_the_same_losses() {
    let c = cfg(lora(0.1), 4, 2);
    let mut full = Trainer::new(base(), c.clone(), data(24, 1), 0).unwrap();
    let total = full.total_steps();
    assert!(total >= 6);
    let uninterrupted: Vec<f32> = (0..total).map(|_| full.train_step().unwrap().loss).collect();

    let dir = tmp("resume");
    let mut first = Trainer::new(base(), c.clone(), data(24, 1), 0).unwrap();
    let mut resumed: Vec<f32> = (0..total / 2).map(|_| first.train_step().unwrap().loss).collect();
    first.save_checkpoint(&dir).unwrap();
    drop(first);
    let mut second = Trainer::new(base(), c, data(24, 1), 0).unwrap();
    second.load_checkpoint(&dir).unwrap();
    resumed.extend((total / 2..total).map(|_| second.train_step().unwrap().loss));
    assert_eq!(resumed, uninterrupted, "losses after resume must be bit-identical on the CPU");
    assert_eq!(second.masters, full.masters);
}

#[test]
fn a_checkpoint_half_written_is_refused() {
    let dir = tmp("torn");
    let mut t = Trainer::new(base(), cfg(lora(0.0), 4, 1), data(8, 2), 0).unwrap();
    t.train_step().unwrap();
    t.save_checkpoint(&dir).unwrap();
    let old_params = std::fs::read(dir.join("params.safetensors")).unwrap();
    t.train_step().unwrap();
    t.save_checkpoint(&dir).unwrap();
    // As if a crash left the params of step 1 beside the state of step 2.
    std::fs::write(dir.join("params.safetensors"), old_params).unwrap();
    let mut fresh = Trainer::new(base(), cfg(lora(0.0), 4, 1), data(8, 2), 0).unwrap();
    let e = fresh.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("params.safetensors") && e.contains("belongs to step 1") && e.contains("step 2"), "{e}");
}

#[test]
fn accumulation_equals_one_big_batch() {
    let mk = |batch, accum, shards| {
        let mut c = cfg(lora(0.0), batch, accum);
        c.shuffle = false;
        c.shards = shards;
        let mut t = Trainer::new(base(), c, data(8, 3), 0).unwrap();
        // Three steps: from the second on, shards read the parameters the last step installed.
        let mut r = t.train_step().unwrap();
        for _ in 0..2 {
            r = t.train_step().unwrap();
        }
        (r.loss, r.grad_norm, t.masters)
    };
    let (l1, g1, m1) = mk(4, 1, 1);
    let (l2, g2, m2) = mk(2, 2, 1);
    // A shard is a micro-batch run beside its siblings: same pieces, same order, same bits.
    let (l3, g3, m3) = mk(4, 1, 2);
    assert_eq!((l2, g2, &m2), (l3, g3, &m3), "batch 4 in 2 shards vs batch 2 accumulated twice");
    let (l4, g4, m4) = mk(2, 2, 2);
    assert_eq!(mk(1, 4, 1), (l4, g4, m4), "batch 2 in 2 shards, accumulated twice, vs batch 1 accumulated 4 times");
    assert!((l1 - l2).abs() < 1e-5, "{l1} vs {l2}");
    assert!((g1 - g2).abs() < 1e-4 * g1.max(1.0), "{g1} vs {g2}");
    for (a, b) in m1.iter().zip(&m2) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

#[test]
fn every_method_learns_and_reports_its_state() {
    let seqs = data(16, 4);
    for method in [lora(0.0), Method::Full, Method::Head] {
        let mut c = cfg(method.clone(), 4, 1);
        c.epochs = 6;
        c.lr = if method == Method::Full { 3e-3 } else { 2e-2 };
        let mut t = Trainer::new(base(), c, seqs.clone(), 0).unwrap();
        let before = t.evaluate(&seqs).unwrap();
        while t.step < t.total_steps() {
            t.train_step().unwrap();
        }
        let after = t.evaluate(&seqs).unwrap();
        assert!(after < before - 0.5, "{}: loss {before} -> {after}", method.name());
        match method {
            Method::Full => assert_eq!(t.trainable_count(), base().parameters().iter().map(|(_, t)| t.elem_count()).sum::<usize>()),
            Method::Head => assert_eq!(t.trainable_count(), 320 * 32),
            Method::Lora(_) => {} // counted in lora_trains_only_the_adapters
            Method::Sparse(_) | Method::Qlora(_) => unreachable!("tested below"),
        }
        // AdamW keeps two floats per trained element and nothing for frozen weights.
        assert_eq!(t.optimizer.state_len(), 2 * t.trainable_count());
    }
}

#[test]
fn lora_trains_only_the_adapters() {
    let mut t = Trainer::new(base(), cfg(lora(0.0), 4, 1), data(8, 5), 0).unwrap();
    // Per layer: q (32x32), k (16x32), v (16x32), o (32x32), gate/up (64x32), down (32x64):
    // A is [4, in], B is [out, 4].
    let per_layer: usize = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)].iter().map(|(o, i)| 4 * i + o * 4).sum();
    assert_eq!(t.trainable_count(), 2 * per_layer);
    let frozen_before = t.model.parameters();
    t.train_step().unwrap();
    for ((n, a), (_, b)) in frozen_before.iter().zip(t.model.parameters()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), "{n} changed");
    }
}

#[test]
fn loss_curve_png_is_well_formed() {
    let dir = tmp("plot");
    let path = dir.join("loss.png");
    let train: Vec<(f32, f32)> = (0..50).map(|i| (i as f32, 5.0 / (1.0 + i as f32 * 0.1))).collect();
    tuna::train::plot::loss_curve(&path, &train, &[(10.0, 3.0), (40.0, 1.5)]).unwrap();
    let png = std::fs::read(&path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 640);
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
}

#[test]
fn packed_training_matches_unpacked_loss() {
    use tuna::train::data::{make_batch, pack};
    let seqs = data(12, 6);
    let rows = pack(&seqs, 32);
    assert!(rows.len() < seqs.len() && rows.iter().all(|r| r.ids.len() <= 32));
    assert_eq!(rows.iter().map(|r| r.targets()).sum::<usize>(), seqs.iter().map(|s| s.targets()).sum::<usize>());
    // The mean loss over all targets is the same packed or not.
    let model = base();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let plain = make_batch(&refs, 0).unwrap();
    let unpacked = model.loss(&plain.ids, Some(&plain.mask)).unwrap().to_scalar().unwrap();
    let prefs: Vec<&Sequence> = rows.iter().collect();
    let packed = make_batch(&prefs, 0).unwrap();
    assert_eq!(packed.targets, plain.targets);
    let l = model.loss_packed(&packed.ids, Some(&packed.mask), packed.packing.as_ref().unwrap()).unwrap().to_scalar().unwrap();
    assert!((l - unpacked).abs() < 1e-5, "{l} vs {unpacked}");
    // And the trainer runs on packed rows.
    let mut t = Trainer::new(base(), cfg(lora(0.0), 2, 1), rows, 0).unwrap();
    assert!(t.train_step().unwrap().loss.is_finite());
}

fn sparse(regrow: Regrow, every: usize) -> Method {
    Method::Sparse(SparseConfig { density: 0.1, reselect_every: every, reselect_rate: 0.3, regrow, grad_window: 2, ..Default::default() })
}

fn sm3() -> OptimizerConfig {
    OptimizerConfig::Sm3(Sm3Config::default())
}

/// Sparse fine-tuning resumes exactly, with the active sets changing along the way: by SM3
/// scores, and by gradient sums with the checkpoint inside a summing window; on every device
/// (on a GPU the masters and the optimizer's state go back and forth at each reselection).
#[test]
fn sparse_resume_is_exact_across_reselections() {
    for dev in common::devices() {
        for (method, optimizer, stop) in [(sparse(Regrow::Sm3, 2), sm3(), 3), (sparse(Regrow::Grad, 3), OptimizerConfig::AdamW(Default::default()), 2)] {
            let c = TrainConfig { optimizer, ..cfg(method, 4, 1) };
            let model = || common::model_on(&common::small_model(&dev), &dev);
            let mut full = Trainer::new(model(), c.clone(), data(24, 1), 0).unwrap();
            let total = full.total_steps();
            let start = full.layouts.clone();
            let uninterrupted: Vec<f32> = (0..total).map(|_| full.train_step().unwrap().loss).collect();
            assert_ne!(start, full.layouts, "the active entries should have changed");

            let dir = tmp(&format!("sparse-resume-{stop}-{dev}"));
            let mut first = Trainer::new(model(), c.clone(), data(24, 1), 0).unwrap();
            let mut resumed: Vec<f32> = (0..stop).map(|_| first.train_step().unwrap().loss).collect();
            first.save_checkpoint(&dir).unwrap();
            drop(first);
            let mut second = Trainer::new(model(), c, data(24, 1), 0).unwrap();
            second.load_checkpoint(&dir).unwrap();
            resumed.extend((stop..total).map(|_| second.train_step().unwrap().loss));
            assert_eq!(uninterrupted, resumed, "{dev}");
            assert_eq!(full.layouts, second.layouts, "{dev}");
            full.sync_host().unwrap();
            second.sync_host().unwrap();
            assert_eq!(full.masters, second.masters, "{dev}");
        }
    }
}

/// Sparse fine-tuning trains only the deltas, keeps the count of active entries, leaves the
/// base weights untouched, and its state scales with the active entries.
#[test]
fn sparse_trains_only_deltas() {
    let mut t = Trainer::new(base(), TrainConfig { optimizer: sm3(), ..cfg(sparse(Regrow::Sm3, 1), 4, 1) }, data(8, 5), 0).unwrap();
    let shapes: Vec<(usize, usize)> = t.model.linears().iter().map(|(_, l)| (l.weight.dims()[0], l.weight.dims()[1])).collect();
    let active: usize = shapes.iter().map(|&(o, i)| ((o * i) as f64 * 0.1).round() as usize).sum();
    assert_eq!(t.trainable_count(), active);
    let accumulators: usize = shapes.iter().map(|&(o, i)| o + i).sum();
    assert_eq!(t.optimizer.state_len(), accumulators + active); // r + c per matrix, momentum per entry
    let frozen_before = base().parameters();
    for _ in 0..3 {
        t.train_step().unwrap();
        assert_eq!(t.trainable_count(), active);
        for l in &t.layouts {
            let Layout::Sparse { indices, .. } = l else { panic!("dense layout in a sparse run") };
            assert!(indices.windows(2).all(|w| w[0] < w[1]));
        }
    }
    for ((n, a), (_, b)) in frozen_before.iter().zip(t.model.parameters()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), "{n} changed");
    }
    // Merging folds the deltas in: merged W = base W + scatter(δ).
    let deltas = t.model.sparse_deltas();
    let mut merged = t.model.clone();
    merged.merge_sparse().unwrap();
    for ((path, d), ((_, lin), (_, orig))) in deltas.iter().zip(merged.linears().into_iter().zip(base().linears())) {
        let mut want = orig.weight.to_vec_f32().unwrap();
        for (&i, v) in d.indices.iter().zip(d.values.to_vec_f32().unwrap()) {
            want[i as usize] += v;
        }
        assert_eq!(lin.weight.to_vec_f32().unwrap(), want, "{path}");
        assert!(lin.sparse.is_none());
    }
    // Saved and loaded deltas give the same model outputs.
    let dir = tmp("deltas");
    tuna::peft::save_deltas(&t.model, "base", &dir).unwrap();
    let mut loaded = base();
    assert_eq!(tuna::peft::load_deltas(&mut loaded, &dir).unwrap(), deltas.len());
    let ids = tuna::Tensor::from_vec_i32(vec![5, 6, 7, 8], [1, 4]).unwrap();
    let (a, b) = (t.model.forward(&ids, None).unwrap().to_vec_f32().unwrap(), loaded.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    assert_eq!(a, b);
}

/// SM3 learns with LoRA, and sparse fine-tuning learns with SM3 and with AdamW.
#[test]
fn sm3_and_sparse_learn() {
    let seqs = data(16, 4);
    for (method, optimizer, lr) in [
        (lora(0.0), sm3(), 5e-2),
        (sparse(Regrow::Sm3, 4), sm3(), 5e-2),
        (sparse(Regrow::Grad, 4), OptimizerConfig::AdamW(Default::default()), 1e-2),
    ] {
        let c = TrainConfig { optimizer, lr, epochs: 6, ..cfg(method.clone(), 4, 1) };
        let mut t = Trainer::new(base(), c, seqs.clone(), 0).unwrap();
        let before = t.evaluate(&seqs).unwrap();
        while t.step < t.total_steps() {
            t.train_step().unwrap();
        }
        let after = t.evaluate(&seqs).unwrap();
        assert!(after < before - 0.5, "{} with {}: loss {before} -> {after}", method.name(), t.optimizer.name());
    }
}

/// Gradient regrowth needs gradients; SM3 regrowth needs the SM3 optimizer: a clear error.
/// A model that already carries LoRA adapters (PEFT's fixture adapter, attached by
/// `load_adapter` on the model's device) is trained from them, on every f32 device: the masters
/// start at the adapter's values, the loss before the first step is the adapted model's, and a
/// step moves on from there. A config that describes other adapters, and the methods that would
/// leave the adapters out of what they write, are refused.
#[test]
fn adapters_already_attached_are_trained_further() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/peft-lora");
    let adapted = |dev: &tuna::Device| {
        let mut m = base().to_device(dev).unwrap();
        let l = load_adapter(&mut m, &fixture).unwrap();
        (m, l)
    };
    let (cpu_model, loaded) = adapted(&tuna::Device::Cpu);
    assert_eq!((loaded.r, loaded.alpha, loaded.target_modules.len()), (4, 8.0, 7), "the fixture: r 4, alpha 8 on every linear");
    let kept = || cfg(Method::Lora(loaded.clone()), 4, 1);
    let values: Vec<Vec<f32>> = cpu_model.lora_parameters().iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect();
    let seqs = data(8, 4);
    let want = tuna::train::evaluate(&cpu_model, &seqs, 4, 0).unwrap();
    let fresh = Trainer::new(base(), kept(), data(8, 4), 0).unwrap().evaluate(&seqs).unwrap();
    assert!((want - fresh).abs() > 1e-3, "the fixture adapter should change the loss: {want} vs {fresh}");
    for dev in common::f32_model_devices() {
        let mut t = Trainer::new(adapted(&dev).0, kept(), data(8, 4), 0).unwrap();
        t.sync_host().unwrap();
        assert!(t.masters == values, "{dev}: the masters start at the adapter's values");
        let before = t.evaluate(&seqs).unwrap();
        assert!((before - want).abs() <= 1e-5 * want, "{dev}: loss {before} before training, the adapted model's is {want}");
        t.train_step().unwrap();
        let after = t.evaluate(&seqs).unwrap();
        assert!(after < before, "{dev}: a step on the training data should lower its loss: {before} -> {after}");
    }
    let refused = |method: Method| Trainer::new(adapted(&tuna::Device::Cpu).0, cfg(method, 4, 1), data(8, 4), 0).err().expect("should be refused").to_string();
    let e = refused(Method::Lora(LoraConfig { r: 8, ..loaded.clone() }));
    assert!(e.contains("rank 4") && e.contains("r 8"), "{e}");
    let e = refused(Method::Lora(LoraConfig { alpha: 16.0, ..loaded.clone() }));
    assert!(e.contains("scale is 2") && e.contains("config's is 4"), "{e}");
    let e = refused(Method::Lora(LoraConfig { target_modules: vec!["q_proj".into()], ..loaded.clone() }));
    assert!(e.contains("model.layers.0.self_attn.k_proj has an adapter"), "{e}");
    for method in [Method::Full, Method::Head, sparse(Regrow::Grad, 0)] {
        let e = refused(method.clone());
        assert!(e.contains("carries LoRA adapters") && e.contains("merge_lora") && e.contains(method.name()), "{e}");
    }
}

#[test]
fn sm3_regrowth_without_sm3_is_refused() {
    let err = Trainer::new(base(), cfg(sparse(Regrow::Sm3, 2), 4, 1), data(8, 5), 0).err().expect("should fail");
    assert!(err.to_string().contains("--optimizer sm3"), "{err}");
}

/// QLoRA: the decoder linears become NF4 (about 4.13 bits per weight), the model computes
/// what it computes with those weights dequantized to f32 (within rounding: its products decode
/// W inside and sum in their own order), only the adapters train, and the loss falls.
#[test]
fn qlora_quantizes_the_base_and_trains_the_adapters() {
    let mut q = base();
    let (n, bytes) = q.quantize_nf4().unwrap();
    let linear_weights: usize = base().linears().iter().map(|(_, l)| l.weight.elem_count()).sum();
    assert_eq!(n, linear_weights);
    // Per matrix of n weights: n/2 bytes of codes, one byte per 64, 4 per 64·256, 4 for the
    // offset (4.127 bits per weight on large matrices; these tiny ones pay more for the fixed
    // part, see tests/nf4.rs for a large one).
    let want: usize = base().linears().iter().map(|(_, l)| {
        let n = l.weight.elem_count();
        n / 2 + n.div_ceil(64) + 4 * n.div_ceil(64 * 256) + 4
    }).sum();
    assert_eq!(bytes, want);
    assert!(8.0 * bytes as f64 / (n as f64) < 4.2);
    // The same model with the dequantized weights in f32.
    let mut d = base();
    for ((_, lq), (_, ld)) in q.linears().into_iter().zip(d.linears_mut()) {
        assert_eq!(lq.weight.dtype(), tuna::DType::NF4);
        ld.weight = tuna::Tensor::from_vec(lq.weight.to_vec_f32().unwrap(), lq.weight.dims().to_vec()).unwrap();
    }
    let ids = tuna::Tensor::from_vec_i32(vec![5, 6, 7, 8, 9], [1, 5]).unwrap();
    let (a, b) = (q.forward(&ids, None).unwrap().to_vec_f32().unwrap(), d.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 1e-5 * scale, "NF4 logits differ from the dequantized model's by {worst} (largest {scale})");

    let seqs = data(16, 4);
    let c = TrainConfig { lr: 2e-2, epochs: 6, ..cfg(Method::Qlora(LoraConfig { r: 4, alpha: 8.0, ..Default::default() }), 4, 1) };
    let mut t = Trainer::new(base(), c, seqs.clone(), 0).unwrap();
    assert_eq!(t.trainable_count(), Trainer::new(base(), cfg(lora(0.0), 4, 1), data(8, 5), 0).unwrap().trainable_count());
    let before = t.evaluate(&seqs).unwrap();
    while t.step < t.total_steps() {
        t.train_step().unwrap();
    }
    let after = t.evaluate(&seqs).unwrap();
    assert!(after < before - 0.5, "qlora: loss {before} -> {after}");
    for (_, l) in t.model.linears() {
        assert_eq!(l.weight.dtype(), tuna::DType::NF4, "the base stays quantized");
    }
    // An NF4 base cannot be written as a safetensors checkpoint by mistake.
    let err = q.save(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa").as_path(), &tmp("nf4-save")).unwrap_err();
    assert!(err.to_string().contains("NF4"), "{err}");
}

#[test]
fn training_on_wgpu_follows_the_cpu_loss_curve() {
    // AdamW, and SM3 with and without momentum: the optimizer state stays on the device too;
    // and QLoRA, whose NF4 base stays on the device.
    let no_momentum = OptimizerConfig::Sm3(Sm3Config { beta1: 0.0, ..Default::default() });
    let qlora = Method::Qlora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() });
    let runs = [
        (lora(0.0), OptimizerConfig::AdamW(Default::default())),
        (Method::Full, OptimizerConfig::AdamW(Default::default())),
        (lora(0.0), sm3()),
        (Method::Full, no_momentum),
        // QLoRA with dropout: the NF4 base quantized on the host, then kept on the device
        // (nf4_gemm.wgsl); the same dropout masks on both devices.
        (qlora, OptimizerConfig::AdamW(Default::default())),
    ];
    for dev in common::devices().into_iter().filter(|d| matches!(d, tuna::Device::Wgpu(_))) {
        for (method, optimizer) in &runs {
            let what = format!("{} with {}", method.name(), optimizer.name());
            let run = |model: Llama| {
                let mut c = cfg(method.clone(), 4, 2);
                c.lr = if *method == Method::Full { 3e-3 } else { 2e-2 };
                c.optimizer = *optimizer;
                // One shard on the CPU too: a shard draws its own dropout masks, and wgpu runs
                // each micro-batch as one.
                c.shards = 1;
                let mut t = Trainer::new(model, c, data(16, 6), 0).unwrap();
                let losses: Vec<f32> = (0..t.total_steps().min(5)).map(|_| t.train_step().unwrap().loss).collect();
                // On wgpu the masters and the optimizer state live on the device; this copies
                // them back.
                t.sync_host().unwrap();
                let state: Vec<Vec<f32>> = match &t.optimizer {
                    tuna::optim::Optimizer::Sm3(o) => o.state.iter().flat_map(|s| [s.r.clone(), s.c.clone(), s.momentum.clone().unwrap_or_default()]).collect(),
                    tuna::optim::Optimizer::AdamW(a) => a.state.iter().flat_map(|(m, v)| [m.clone(), v.clone()]).collect(),
                };
                (losses, t.masters, state)
            };
            let (cpu_losses, cpu_masters, cpu_state) = run(base());
            let (gpu_losses, gpu_masters, gpu_state) = run(base().to_device(&dev).unwrap());
            assert_eq!(cpu_losses.len(), 5);
            // The same f32 math in another order of summation: agreement to a few ulps per step,
            // growing slowly as the runs drift apart.
            for (i, (c, g)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
                assert!((c - g).abs() <= 1e-4 * c.abs().max(1.0), "{what} step {i} on {dev}: cpu {c} vs {g}");
            }
            for (name, cpu, gpu) in [("masters", &cpu_masters, &gpu_masters), ("optimizer state", &cpu_state, &gpu_state)] {
                assert_eq!(cpu.len(), gpu.len(), "{what}: {name} tensors");
                for (c, g) in cpu.iter().zip(gpu) {
                    assert_eq!(c.len(), g.len(), "{what}: {name} lengths");
                    for (x, y) in c.iter().zip(g) {
                        assert!((x - y).abs() <= 1e-4 + 1e-3 * x.abs(), "{what} {name} on {dev}: cpu {x} vs {y}");
                    }
                }
            }
        }
    }
}

#[test]
fn resume_on_wgpu_is_exact() {
    // The masters and the optimizer state (AdamW's moments, SM3's accumulators) live on the
    // device; a checkpoint copies them out and a resume copies them back, so the run continues
    // to exactly the same losses.
    for dev in common::devices().into_iter().filter(|d| matches!(d, tuna::Device::Wgpu(_))) {
        for optimizer in [OptimizerConfig::AdamW(Default::default()), sm3()] {
            let c = TrainConfig { optimizer, ..cfg(lora(0.0), 4, 1) };
            let mut full = Trainer::new(base().to_device(&dev).unwrap(), c.clone(), data(16, 8), 0).unwrap();
            let uninterrupted: Vec<f32> = (0..4).map(|_| full.train_step().unwrap().loss).collect();
            let dir = tmp(&format!("resume-{dev}-{}", optimizer.name()).replace(':', "-"));
            let mut first = Trainer::new(base().to_device(&dev).unwrap(), c.clone(), data(16, 8), 0).unwrap();
            let mut resumed: Vec<f32> = (0..2).map(|_| first.train_step().unwrap().loss).collect();
            first.save_checkpoint(&dir).unwrap();
            drop(first);
            let mut second = Trainer::new(base().to_device(&dev).unwrap(), c, data(16, 8), 0).unwrap();
            second.load_checkpoint(&dir).unwrap();
            resumed.extend((0..2).map(|_| second.train_step().unwrap().loss));
            assert_eq!(resumed, uninterrupted, "losses after resume on {dev} with {}", optimizer.name());
            full.sync_host().unwrap();
            second.sync_host().unwrap();
            assert_eq!(second.masters, full.masters);
        }
    }
}

#[test]
fn queued_steps_report_what_waited_steps_do() {
    // `start_step` returns with the loss and the gradient norm still on their way. Queuing the
    // next step before waiting (as the run loop does) must change neither, although the next
    // step rewrites the buffer the norm is reduced into. f16 on wgpu takes the loss-scaled
    // path, which waits on the norm inside the step.
    for dev in common::devices() {
        let mut dtypes = vec![None];
        if common::has_f16(dev) {
            dtypes.push(Some(tuna::DType::F16));
        }
        for dtype in dtypes {
            let run = |queued: bool| {
                let mut model = common::model_on(&common::small_model(&dev), &dev);
                if let Some(d) = dtype {
                    model = model.to_dtype(d).unwrap();
                }
                let mut t = Trainer::new(model, cfg(lora(0.1), 4, 2), data(24, 4), 0).unwrap();
                let mut reports = Vec::new();
                if queued {
                    let mut pending = t.start_step().unwrap();
                    for _ in 1..5 {
                        let next = t.start_step().unwrap();
                        reports.push(pending.wait().unwrap());
                        pending = next;
                    }
                    reports.push(pending.wait().unwrap());
                } else {
                    reports = (0..5).map(|_| t.train_step().unwrap()).collect();
                }
                t.sync_host().unwrap();
                (reports, t.masters)
            };
            // Bits, since a step skipped for overflow reports a NaN norm.
            let bits = |r: &[tuna::train::StepReport]| r.iter().map(|r| (r.step, r.loss.to_bits(), r.grad_norm.to_bits(), r.skipped, r.tokens)).collect::<Vec<_>>();
            let (waited, waited_masters) = run(false);
            let (queued, queued_masters) = run(true);
            assert_eq!(bits(&queued), bits(&waited), "{dtype:?} on {dev}: {queued:?} vs {waited:?}");
            assert_eq!(queued_masters, waited_masters, "{dtype:?} on {dev}");
            // Each step's norm and loss are its own, so one read a step late would show.
            let taken: Vec<_> = waited.iter().filter(|r| !r.skipped).collect();
            assert!(taken.len() >= 3, "{dtype:?} on {dev}: {waited:?}");
            assert!(taken.windows(2).all(|w| w[0].grad_norm != w[1].grad_norm && w[0].loss != w[1].loss), "{waited:?}");
        }
    }
}
