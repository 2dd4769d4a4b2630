//! What a run trains and how: the method, the optimizer and schedule settings, and the loss
//! scale of a half-precision model.

use crate::optim::{OptimizerConfig, ScheduleKind};
use crate::peft::{LoraConfig, SparseConfig};

#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// LoRA adapters on the target modules; the base stays frozen.
    Lora(LoraConfig),
    /// QLoRA: LoRA over a base whose decoder linears are quantized to NF4 at setup.
    Qlora(LoraConfig),
    /// Every parameter.
    Full,
    /// Only the LM head (the embedding table when they are tied).
    Head,
    /// SpIEL sparse fine-tuning: deltas at a changing set of active entries of the target
    /// matrices.
    Sparse(SparseConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Qlora(_) => "qlora",
            Method::Full => "full",
            Method::Head => "head",
            Method::Sparse(_) => "sparse",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub method: Method,
    pub lr: f32,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    pub epochs: usize,
    /// Stops after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// 0 disables clipping.
    pub max_grad_norm: f32,
    pub optimizer: OptimizerConfig,
    pub seed: u64,
    pub shuffle: bool,
    /// On the CPU, each micro-batch is split by rows into this many shards whose forward and
    /// backward run at the same time, each on its own tape, and whose gradients are summed in
    /// shard order: data parallelism across cores, which keeps each core on products of its own
    /// instead of splitting every product between cores. The result depends on this number
    /// (through summation order and the shards' dropout seeds), never on the thread count.
    pub shards: usize,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (`Llama::checkpoint_layers`); the gradients are the same bit for bit.
    pub checkpoint_layers: bool,
    /// The first loss scale of a half-precision (f16) model (see `LossScale`); unused otherwise.
    pub loss_scale: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Lora(LoraConfig::default()),
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: 1.0,
            optimizer: OptimizerConfig::AdamW(Default::default()),
            seed: 0,
            shuffle: true,
            shards: 2,
            checkpoint_layers: false,
            loss_scale: 65536.0,
        }
    }
}

/// Dynamic loss scaling for an f16 model (activations and their gradients in f16, f32 masters):
/// the backward is seeded with `scale` so that small gradients survive f16's range, and the
/// optimizer divides it out (its clipping sees the unscaled norm). A step whose gradients
/// overflowed (a non-finite norm) is skipped and the scale halved; after `GROWTH_INTERVAL`
/// good steps in a row it doubles. This is PyTorch's `GradScaler` rule with its defaults.
/// Checkpoints keep it, so a resumed run continues with the same scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    pub scale: f32,
    pub(crate) good_steps: usize,
}

impl LossScale {
    const GROWTH_INTERVAL: usize = 2000;

    pub fn new(scale: f32) -> LossScale {
        LossScale { scale, good_steps: 0 }
    }

    /// Records a step's outcome: `finite` when the gradients had no inf or NaN.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
        }
    }
}
