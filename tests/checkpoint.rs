//! Activation checkpointing per decoder layer: the same gradients as without, bit for bit (the
//! same ops on the same values in the same order), on every device; far fewer tape entries
//! kept; and the trainer's losses unchanged.

mod common;

use std::path::Path;

use tuna::nn::Llama;
use tuna::peft::load_adapter;
use tuna::rng::Rng;
use tuna::train::data::Sequence;
use tuna::train::{Method, TrainConfig, Trainer};
use tuna::{Tape, Tensor};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures").join(name)
}

fn ids() -> Tensor {
    Tensor::from_vec_i32((0..24).map(|i| 3 + (i * 7) % 90).collect(), [2, 12]).unwrap()
}

/// Gradients of every tracked tensor and the tape's length after the forward.
fn grads(model: &Llama, full: bool, checkpoint: bool) -> (Vec<Vec<f32>>, usize) {
    let mut m = model.clone();
    m.checkpoint_layers = checkpoint;
    let tape = Tape::new();
    if full {
        m.map_parameters(|_, t| Ok(tape.param(t))).unwrap();
    } else {
        m.map_lora(|_, t| Ok(tape.param(t))).unwrap();
    }
    let loss = m.loss(&ids(), None).unwrap();
    let entries = tape.len();
    let g = tape.backward(&loss).unwrap();
    let params: Vec<Tensor> = if full { m.parameters().into_iter().map(|(_, t)| t).collect() } else { m.lora_parameters().into_iter().map(|(_, t)| t).collect() };
    (params.iter().map(|p| g.get(p).expect("a gradient for every parameter").to_vec_f32().unwrap()).collect(), entries)
}

#[test]
fn checkpointed_layers_give_the_same_gradients() {
    // LoRA with a non-zero B (PEFT's fixture adapter), so gradients reach A, and full tuning.
    let mut lora = Llama::load(&fixture("llama-gqa")).unwrap();
    load_adapter(&mut lora, &fixture("peft-lora")).unwrap();
    let base = Llama::load(&fixture("llama-gqa")).unwrap();
    for dev in common::devices() {
        for (what, model, full) in [("lora", &lora, false), ("full", &base, true)] {
            let model = model.to_device(&dev).unwrap();
            let (plain, plain_len) = grads(&model, full, false);
            let (ckpt, ckpt_len) = grads(&model, full, true);
            assert_eq!(plain.len(), ckpt.len());
            for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
                assert_eq!(a, b, "{what} on {dev}: gradient {i} differs with checkpointing");
            }
            // Two layers: each becomes one entry instead of its ~20 ops.
            assert!(ckpt_len * 3 < plain_len, "{what} on {dev}: {ckpt_len} tape entries with checkpointing vs {plain_len} without");
        }
    }
}

#[test]
fn trainer_losses_are_unchanged_by_checkpointing() {
    let mut rng = Rng::new(3);
    let data: Vec<Sequence> = (0..12)
        .map(|_| {
            let ids: Vec<u32> = (0..10).map(|_| 3 + rng.below(90) as u32).collect();
            Sequence { mask: vec![true; ids.len()], ids, starts: Vec::new() }
        })
        .collect();
    let run = |checkpoint_layers: bool, method: Method| {
        let c = TrainConfig { method, lr: 1e-2, batch_size: 4, epochs: 1, seed: 5, checkpoint_layers, ..Default::default() };
        let mut t = Trainer::new(Llama::load(&fixture("llama-gqa")).unwrap(), c, data.clone(), 0).unwrap();
        let losses: Vec<f32> = (0..t.total_steps()).map(|_| t.train_step().unwrap().loss).collect();
        (losses, t.masters)
    };
    for method in [Method::Lora(tuna::peft::LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() }), Method::Full] {
        let name = method.name();
        assert_eq!(run(false, method.clone()), run(true, method), "{name}: losses and weights with and without checkpointing");
    }
}
