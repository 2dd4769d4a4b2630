//! Activation checkpointing per decoder layer: the same gradients as without, bit for bit (the
//! same ops on the same values in the same order), on every device, with LoRA (dropout on and
//! off), full tuning and packed rows; far fewer tape entries kept; and the trainer's losses
//! unchanged for every method.

mod common;

use std::path::Path;
use std::sync::Arc;

use tuna::nn::{Llama, Packing};
use tuna::optim::{OptimizerConfig, Sm3Config};
use tuna::peft::{load_adapter, LoraConfig, Regrow, SparseConfig};
use tuna::rng::Rng;
use tuna::train::data::{pack, Sequence};
use tuna::train::{Method, TrainConfig, Trainer};
use tuna::{Device, Tape, Tensor};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures").join(name)
}

fn ids() -> Tensor {
    Tensor::from_vec_i32((0..24).map(|i| 3 + (i * 7) % 90).collect(), [2, 12]).unwrap()
}

/// Two examples per row of 12: tokens 0..5 and 5..12.
fn packing() -> Packing {
    Packing { starts: Arc::new((0..2).flat_map(|_| (0..12u32).map(|p| if p < 5 { 0 } else { 5 })).collect()) }
}

/// One way of running the model for a gradient.
#[derive(Clone, Copy)]
struct Case {
    what: &'static str,
    /// Every weight trained (else the LoRA adapters).
    full: bool,
    dropout_seed: Option<u64>,
    packed: bool,
}

/// `a` and `b` equal bit for bit; a failure names the tensor and the first element that differs.
fn same(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "{what} {i}: length");
        if let Some(j) = (0..x.len()).find(|&j| x[j].to_bits() != y[j].to_bits()) {
            panic!("{what} {i} differs with checkpointing at element {j}: {} without, {} with", x[j], y[j]);
        }
    }
}

/// Gradients of every tracked tensor and the tape's length after the forward.
fn grads(model: &Llama, case: Case, checkpoint: bool) -> (Vec<Vec<f32>>, usize) {
    let mut m = model.clone();
    m.checkpoint_layers = checkpoint;
    m.dropout_seed = case.dropout_seed;
    let tape = Tape::new();
    if case.full {
        m.map_parameters(|_, t| Ok(tape.param(t))).unwrap();
    } else {
        m.map_lora(|_, t| Ok(tape.param(t))).unwrap();
    }
    let loss = if case.packed { m.loss_packed(&ids(), None, &packing()) } else { m.loss(&ids(), None) }.unwrap();
    let entries = tape.len();
    let g = tape.backward(&loss).unwrap();
    let params = if case.full { m.parameters() } else { m.lora_parameters() };
    let what = case.what;
    let grads = params.iter().map(|(name, p)| g.get(p).unwrap_or_else(|| panic!("{what} (checkpoint {checkpoint}): no gradient for {name}")).to_vec_f32().unwrap());
    (grads.collect(), entries)
}

#[test]
fn checkpointed_layers_give_the_same_gradients() {
    // LoRA with a non-zero B (PEFT's fixture adapter; on CUDA, whose attention needs a head
    // dim of 32 or more, the tiny test model's random one), so gradients reach A, and full tuning.
    for dev in common::devices() {
        let cuda = matches!(dev, Device::Cuda(_));
        let mut lora = if cuda {
            tuna::testing::model::tiny_lora_model(tuna::DType::F32, 0.25, false).unwrap()
        } else {
            let mut m = common::small_model(&dev);
            load_adapter(&mut m, &fixture("peft-lora")).unwrap();
            m
        };
        for (_, lin) in lora.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.dropout = 0.25;
            }
        }
        let base = common::small_model(&dev);
        let case = |what, full, dropout_seed, packed| Case { what, full, dropout_seed, packed };
        let cases = [
            (case("lora", false, None, false), &lora),
            // The recomputation draws the same dropout masks from the same per-layer seeds.
            (case("lora with dropout", false, Some(11), false), &lora),
            (case("lora, packed rows", false, None, true), &lora),
            (case("full", true, None, false), &base),
            (case("full, packed rows", true, None, true), &base),
        ];
        let mut plain_by_case = Vec::new();
        for (case, model) in cases {
            let what = case.what;
            let model = common::model_on(model, &dev);
            let (plain, plain_len) = grads(&model, case, false);
            let (ckpt, ckpt_len) = grads(&model, case, true);
            assert_eq!(plain.len(), ckpt.len());
            same(&plain, &ckpt, &format!("{what} on {dev}: gradient"));
            // Two layers: each becomes one entry instead of its ~20 ops.
            assert!(ckpt_len * 3 < plain_len, "{what} on {dev}: {ckpt_len} tape entries with checkpointing vs {plain_len} without");
            plain_by_case.push(plain);
        }
        // The dropout and packing cases change the gradients, so they test something of their own.
        assert_ne!(plain_by_case[0], plain_by_case[1], "dropout on {dev} left the LoRA gradients unchanged");
        assert_ne!(plain_by_case[0], plain_by_case[2], "packing on {dev} left the LoRA gradients unchanged");
        assert_ne!(plain_by_case[3], plain_by_case[4], "packing on {dev} left the full gradients unchanged");
    }
}

fn data() -> Vec<Sequence> {
    let mut rng = Rng::new(3);
    (0..12)
        .map(|_| {
            let ids: Vec<u32> = (0..10).map(|_| 3 + rng.below(90) as u32).collect();
            Sequence { mask: vec![true; ids.len()], ids, starts: Vec::new() }
        })
        .collect()
}

/// The trainer's losses and masters with and without checkpointing are the same bit for bit.
fn same_run(dev: &Device, config: &TrainConfig, data: &[Sequence], what: &str) {
    let (plain_losses, plain_masters) = run(dev, config, data, false);
    let (ckpt_losses, ckpt_masters) = run(dev, config, data, true);
    assert!(plain_losses.len() >= 3, "{what} on {dev}: {} steps", plain_losses.len());
    assert_eq!(plain_losses, ckpt_losses, "{what} on {dev}: losses without and with checkpointing");
    same(&plain_masters, &ckpt_masters, &format!("{what} on {dev}: master"));
}

/// Losses of every step and the trained masters (copied back from the device).
fn run(dev: &Device, config: &TrainConfig, data: &[Sequence], checkpoint_layers: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
    let c = TrainConfig { checkpoint_layers, ..config.clone() };
    let model = common::model_on(&common::small_model(dev), dev);
    let mut t = Trainer::new(model, c, data.to_vec(), 0).unwrap();
    let losses: Vec<f32> = (0..t.total_steps()).map(|_| t.train_step().unwrap().loss).collect();
    t.sync_host().unwrap();
    (losses, t.masters)
}

#[test]
fn trainer_losses_are_unchanged_by_checkpointing() {
    let lora = Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() });
    let cfg = |method: Method| TrainConfig { method, lr: 1e-2, batch_size: 4, epochs: 1, seed: 5, ..Default::default() };
    let sparse = |regrow| Method::Sparse(SparseConfig { density: 0.1, reselect_every: 1, reselect_rate: 0.3, regrow, grad_window: 1, ..Default::default() });
    // Every method on the CPU; sparse by gradient regrowth makes the frozen target weights tape
    // parameters too, so they are checkpoint inputs beside the deltas.
    let cpu = [
        ("lora", cfg(lora.clone())),
        ("qlora", cfg(Method::Qlora(LoraConfig { r: 4, alpha: 8.0, ..Default::default() }))),
        ("full", cfg(Method::Full)),
        ("head", cfg(Method::Head)),
        ("sparse, sm3 regrowth", TrainConfig { optimizer: OptimizerConfig::Sm3(Sm3Config::default()), ..cfg(sparse(Regrow::Sm3)) }),
        ("sparse, gradient regrowth", cfg(sparse(Regrow::Grad))),
    ];
    for (what, c) in &cpu {
        same_run(&Device::Cpu, c, &data(), what);
    }
    // Packed rows (attention masked per example).
    let rows = pack(&data(), 24);
    assert!(rows.len() < data().len());
    let c = TrainConfig { batch_size: 2, ..cfg(lora.clone()) };
    same_run(&Device::Cpu, &c, &rows, "lora on packed rows");
    // The other devices train LoRA (with dropout), full tuning and sparse with gradient regrowth.
    for dev in common::devices().into_iter().filter(|d| !matches!(d, Device::Cpu)) {
        for c in [cfg(lora.clone()), cfg(Method::Full), cfg(sparse(Regrow::Grad))] {
            same_run(&dev, &c, &data(), c.method.name());
        }
    }
}
