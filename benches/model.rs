//! Forward pass of a ~30M-parameter Llama on the CPU (hidden 512, 8 layers, 8 heads,
//! intermediate 1376, vocab 8192; batch 4 × sequence 128), in tokens per second, so later work
//! can see its effect. Random weights built in place: no files needed.
//!
//!   cargo bench --bench model

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tuna::io::config::LlamaConfig;
use tuna::nn::Llama;
use tuna::rng::Rng;
use tuna::peft::LoraConfig;
use tuna::train::data::Sequence;
use tuna::train::{Method, TrainConfig, Trainer};
use tuna::Tensor;

fn forward(c: &mut Criterion) {
    let cfg = LlamaConfig::llama(8192, 512, 1376, 8, 8, 8);
    let model = Llama::random(cfg, 0).unwrap();
    let params: usize = model.parameters().iter().map(|(_, t)| t.elem_count()).sum();
    let (b, t) = (4, 128);
    let mut rng = Rng::new(1);
    let ids: Vec<i32> = (0..b * t).map(|_| rng.below(8192) as i32).collect();
    let ids = Tensor::from_vec_i32(ids, [b, t]).unwrap();
    let mut g = c.benchmark_group(format!("llama_forward_cpu/{:.1}M_params", params as f64 / 1e6));
    g.sample_size(10);
    g.throughput(Throughput::Elements((b * t) as u64));
    g.bench_function("batch4_seq128 (elements = tokens)", |bch| bch.iter(|| model.forward(&ids, None).unwrap()));
    g.finish();
}

/// One LoRA training step (rank 8 on every linear, fp32): forward, backward through the tape,
/// AdamW. The configuration of `tools/bench-vs-torch`.
fn lora_step(c: &mut Criterion) {
    let cfg = LlamaConfig::llama(8192, 512, 1376, 8, 8, 8);
    let model = Llama::random(cfg, 0).unwrap();
    let (b, t) = (4, 128);
    let mut rng = Rng::new(1);
    let seqs: Vec<Sequence> = (0..b)
        .map(|_| Sequence { ids: (0..t).map(|_| rng.below(8192) as u32).collect(), mask: vec![true; t], starts: Vec::new() })
        .collect();
    let config = TrainConfig {
        method: Method::Lora(LoraConfig { r: 8, alpha: 16.0, ..Default::default() }),
        batch_size: b,
        max_steps: Some(1_000_000),
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, config, seqs, 0).unwrap();
    let mut g = c.benchmark_group("lora_step_cpu/33.7M_params_r8");
    g.sample_size(10);
    g.throughput(Throughput::Elements((b * t) as u64));
    g.bench_function("batch4_seq128 (elements = tokens)", |bch| bch.iter(|| trainer.train_step().unwrap()));
    g.finish();
}

criterion_group!(benches, forward, lora_step);
criterion_main!(benches);
