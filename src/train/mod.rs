//! The trainer: LoRA, sparse (SpIEL), full or head-only fine-tuning of a `Llama` with AdamW or
//! SM3 over f32 master weights, warmup and decay, global-norm clipping and gradient
//! accumulation; evaluation; checkpoints that resume to exactly the same losses.
//!
//! Determinism: optimizer step s consumes micro-batches `s·accum .. (s+1)·accum` of the global
//! sequence of batches, whose order within each epoch is a function of (seed, epoch), and each
//! micro-batch's dropout seed is a function of (seed, its index). So the step counter, the
//! master weights and the optimizer state (with sparse fine-tuning also the active indices
//! and any gradient sums for regrowth) are the whole training state.
//!
//! LoRA on a random two-layer model that learns one sequence by heart, and its adapter saved
//! in PEFT's format (`tuna finetune` adds the data files, evaluation, checkpoints and metrics
//! around the same `Trainer`, in [`run`]). The loss stays above ~2.2 here, since the frozen
//! random head's small rows bound the logits; what the adapters learned shows in the greedy
//! predictions:
//!
//! ```
//! use tuna::io::config::LlamaConfig;
//! use tuna::nn::Llama;
//! use tuna::peft::{load_adapter, save_adapter, LoraConfig};
//! use tuna::train::{data::Sequence, Method, TrainConfig, Trainer};
//! use tuna::Tensor;
//!
//! // vocab 32, hidden 64, intermediate 128, 2 layers, 4 heads over 2 key/value heads
//! let base = Llama::random(LlamaConfig::llama(32, 64, 128, 2, 4, 2), 0)?;
//! let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 31 + 1) as u32).collect();
//! let data = vec![Sequence { mask: vec![true; ids.len()], ids: ids.clone(), starts: Vec::new() }; 8];
//!
//! // How many of the 23 next tokens a model predicts (greedy).
//! let rows = Tensor::from_vec_i32(ids.iter().map(|&t| t as i32).collect(), [1, ids.len()])?;
//! let right = |model: &Llama| -> tuna::Result<usize> {
//!     let logits = model.forward(&rows, None)?.to_vec_f32()?;
//!     let best = |row: &[f32]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
//!     Ok(logits.chunks(32).zip(&ids[1..]).filter(|(row, &next)| best(row) == next as usize).count())
//! };
//! assert!(right(&base)? < 5);
//!
//! let lora = LoraConfig { r: 4, alpha: 8.0, ..Default::default() };
//! let config = TrainConfig { method: Method::Lora(lora.clone()), lr: 1e-2, max_steps: Some(30), batch_size: 4, ..Default::default() };
//! // A model moved first (`base.to_device(&Device::Cuda(0))?`) trains on that device.
//! let mut trainer = Trainer::new(base.clone(), config, data, 0)?;
//! while trainer.step < trainer.total_steps() {
//!     trainer.train_step()?;
//! }
//! assert_eq!(right(&trainer.model)?, 23);
//!
//! let dir = std::env::temp_dir().join(format!("tuna-doc-adapter-{}", std::process::id()));
//! save_adapter(&trainer.model, &lora, "a random model", &dir)?; // adapter_config.json, adapter_model.safetensors
//! let mut reloaded = base.clone();
//! assert_eq!(load_adapter(&mut reloaded, &dir)?, lora);
//! std::fs::remove_dir_all(&dir).ok();
//! assert_eq!(reloaded.forward(&rows, None)?.to_vec_f32()?, trainer.model.forward(&rows, None)?.to_vec_f32()?);
//! # Ok::<(), tuna::Error>(())
//! ```

pub mod checkpoint;
mod config;
pub mod data;
mod device;
mod device_cuda;
mod regrow;
pub mod plot;
pub mod run;

pub use config::{LossScale, Method, TrainConfig};

use crate::nn::Llama;

use crate::kernels::optim::{clip_scale, cpu::sum_squares};
use crate::nn::llama::SparseDelta;
use crate::optim::{Layout, Optimizer, OptimizerConfig, Schedule};
use crate::peft::sparse::Regrow;
use crate::{ops, Error, PendingValues, Result, Tape, Tensor};
use device::PendingSumSq;
use std::time::Instant;
use data::{epoch_order, make_batch, Sequence};

/// One shard's share of a step: its scaled loss and the gradients of the trained tensors (and,
/// in a regrowth window, of the sparse target weights).
struct PieceGrads {
    /// Where the model is; read once the whole step is queued, without waiting for it.
    loss: Tensor,
    /// Where the model is (downloaded when the optimizer runs on the host).
    grads: Vec<Option<Tensor>>,
    /// In a regrowth window, the dense (f32) gradients of the sparse target weights.
    weight_grads: Vec<Option<Tensor>>,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub epoch: f32,
    /// The step's gradients overflowed f16 and the update was skipped (see `LossScale`).
    pub skipped: bool,
}

/// A step queued on the device by [`Trainer::start_step`], whose loss and gradient norm are
/// still on their way to the host. Queue the next step first, then `wait`: the device keeps
/// working while the host reads (on the CPU the step is done when queued).
pub struct PendingStep {
    /// The report, less the loss and (for a step taken) the gradient norm.
    report: StepReport,
    /// Each piece's loss, summed in piece order by `wait`.
    losses: Vec<PendingValues>,
    /// The gradients' sum of squares and the loss scale they carry; None when the norm is
    /// already in `report` (a CPU step, or a skipped one).
    sum_sq: Option<(PendingSumSq, f32)>,
    /// When the step was queued.
    pub started: Instant,
    /// The step may still be running on the device when `start_step` returns (a GPU step
    /// without a loss scale); on the CPU, or when the step already waited on its gradient norm
    /// (loss scaling), it is done, and queuing the next one first would only blur the timing.
    pub overlaps: bool,
}

impl PendingStep {
    /// The step's number, counted from 1 (the trainer's `step` once it is done).
    pub fn step(&self) -> usize {
        self.report.step
    }

    /// Waits for the loss and the gradient norm (not for work queued after the step).
    pub fn wait(self) -> Result<StepReport> {
        let mut report = self.report;
        let mut loss = 0.0f64;
        for l in self.losses {
            loss += l.wait()?[0] as f64;
        }
        report.loss = loss as f32;
        if let Some((sum_sq, scale)) = self.sum_sq {
            report.grad_norm = sum_sq.wait()?.max(0.0).sqrt() as f32 / scale;
        }
        Ok(report)
    }
}

pub struct Trainer {
    pub model: Llama,
    pub config: TrainConfig,
    /// Names of the trained tensors (PEFT keys for LoRA, `<module>.weight.values` for sparse
    /// deltas, transformers names otherwise).
    pub names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// How each trained tensor maps onto its matrix (SM3 and sparse deltas need it).
    pub layouts: Vec<Layout>,
    /// f32 master copies of the trained tensors. When training on a GPU (wgpu or CUDA, AdamW or
    /// SM3) the masters live on the device (see `device.rs`) and this host copy is refreshed by `sync_host`.
    pub masters: Vec<Vec<f32>>,
    /// The masters and the optimizer state on the device (wgpu or CUDA), when training there.
    device: Option<device::DeviceOptimizer>,
    /// On the CPU, the tensors the last `install` made from the masters (the model's trained
    /// tensors): the shards of the next step read them instead of copying the masters again.
    host_params: Vec<Tensor>,
    pub optimizer: Optimizer,
    /// Sparse fine-tuning with gradient regrowth: the dense gradient of each target matrix
    /// summed over the current window (None outside windows), where the model is.
    grad_sums: Option<regrow::GradSums>,
    /// Optimizer steps taken.
    pub step: usize,
    /// The loss scale of an f16 model (None for f32 and bf16 models).
    pub loss_scale: Option<LossScale>,
    train: Vec<Sequence>,
    pad: u32,
}

impl Trainer {
    /// Sets up `method` on `model`. LoRA adapters are attached here, seeded by `config.seed`,
    /// unless the model already carries them (a loaded adapter trained further: see
    /// [`Llama::lora_to_train`]); the other methods refuse a model with adapters.
    pub fn new(mut model: Llama, config: TrainConfig, train: Vec<Sequence>, pad: u32) -> Result<Self> {
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training examples (every line was bad, empty or held out)".into()));
        }
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::InvalidArgument("batch size and gradient accumulation must be at least 1".into()));
        }
        // Trained base weights in f16 (full and head fine-tuning) take f32 masters that the
        // optimizer copies back to f16 after each step: the wgpu optimizer does; the CUDA one
        // writes bf16, the model's type there.
        let on_wgpu = matches!(model.device(), crate::Device::Wgpu(_));
        if model.embed.dtype() == crate::DType::F16 && matches!(config.method, Method::Full | Method::Head) && !on_wgpu {
            return Err(Error::InvalidArgument(format!("{} fine-tuning of an f16 model runs on wgpu (and in bf16 on CUDA), not on {}", config.method.name(), model.device())));
        }
        let carries_lora = !model.lora_parameters().is_empty();
        match &config.method {
            Method::Lora(l) => {
                model.lora_to_train(l, config.seed)?;
            }
            Method::Qlora(l) => {
                model.quantize_nf4()?;
                model.lora_to_train(l, config.seed)?;
            }
            m if carries_lora => {
                return Err(Error::InvalidArgument(format!(
                    "the model carries LoRA adapters, which {} fine-tuning would leave out of what it writes: fold them into the base first (`Llama::merge_lora`, `tuna merge`), or train them further with the lora method",
                    m.name()
                )))
            }
            Method::Sparse(s) => {
                if s.regrow == Regrow::Sm3 && s.reselect_every > 0 && !matches!(config.optimizer, OptimizerConfig::Sm3(_)) {
                    return Err(Error::InvalidArgument("sparse regrowth by SM3 scores needs the SM3 optimizer (--optimizer sm3), or use --regrow grad".into()));
                }
                model.add_sparse(s, config.seed)?
            }
            Method::Full | Method::Head => {}
        }
        let current = trainable(&model, &config.method);
        let names = current.iter().map(|(n, _)| n.clone()).collect();
        let shapes: Vec<Vec<usize>> = current.iter().map(|(_, t)| t.dims().to_vec()).collect();
        let masters = current.iter().map(|(_, t)| t.to_vec_f32()).collect::<Result<_>>()?;
        let layouts: Vec<Layout> = match &config.method {
            Method::Sparse(_) => model
                .sparse_deltas()
                .into_iter()
                .zip(model.linears().into_iter().filter(|(_, l)| l.sparse.is_some()))
                .map(|((_, d), (_, l))| Layout::Sparse { rows: l.weight.dims()[0], cols: l.weight.dims()[1], indices: d.indices })
                .collect(),
            _ => shapes.iter().map(|s| Layout::dense(s)).collect(),
        };
        let optimizer = Optimizer::new(config.optimizer, &layouts);
        let loss_scale = (model.embed.dtype() == crate::DType::F16).then(|| LossScale::new(config.loss_scale));
        let mut t = Trainer { model, optimizer, config, names, shapes, layouts, masters, device: None, host_params: Vec::new(), grad_sums: None, step: 0, loss_scale, train, pad };
        t.reset_device_state()?;
        Ok(t)
    }

    /// On a GPU, (re)uploads the masters and the optimizer state, which stay on the device
    /// from then on (until a sparse reselection changes the active entries).
    fn reset_device_state(&mut self) -> Result<()> {
        let dev = self.model.device();
        self.device = None;
        if dev != crate::Device::Cpu {
            let host = match &self.optimizer {
                Optimizer::AdamW(a) => device::HostOptState::AdamW(a.state.clone()),
                Optimizer::Sm3(o) => device::HostOptState::Sm3(o.state.clone()),
            };
            // Adapters are f32 masters whatever the model's dtype; trained base weights (full,
            // head) are read in the model's dtype (bf16 on CUDA), the masters staying f32.
            let param_dtype = match self.config.method {
                Method::Full | Method::Head => self.model.embed.dtype(),
                _ => crate::DType::F32,
            };
            let model_dtype = self.model.embed.dtype();
            self.device = Some(device::DeviceOptimizer::new(&self.masters, &self.shapes, &self.layouts, &host, dev, (param_dtype, model_dtype))?);
        }
        Ok(())
    }

    /// The trained tensors as the model on a GPU reads them (None on the CPU).
    pub(crate) fn device_params(&self) -> Option<&[Tensor]> {
        self.device.as_ref().map(device::DeviceOptimizer::params)
    }

    /// Refreshes the host copies (`masters`, the optimizer's state) from the device, when the
    /// training state lives there; a no-op on the CPU.
    pub fn sync_host(&mut self) -> Result<()> {
        if let Some(sums) = &mut self.grad_sums {
            sums.move_to_host()?;
        }
        if let Some(d) = &self.device {
            let (masters, state) = d.download()?;
            self.masters = masters;
            match (&mut self.optimizer, state) {
                (Optimizer::AdamW(a), device::HostOptState::AdamW(s)) => a.state = s,
                (Optimizer::Sm3(o), device::HostOptState::Sm3(s)) => o.state = s,
                _ => return Err(Error::InvalidArgument("device state of another optimizer".into())),
            }
        }
        Ok(())
    }

    /// Training examples.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.config.batch_size)
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.batches_per_epoch().div_ceil(self.config.grad_accum)
    }

    pub fn total_steps(&self) -> usize {
        self.config.max_steps.unwrap_or(self.config.epochs * self.steps_per_epoch())
    }

    pub fn schedule(&self) -> Schedule {
        Schedule { kind: self.config.schedule, peak_lr: self.config.lr, warmup_steps: self.config.warmup_steps, total_steps: self.total_steps() }
    }

    /// Elements trained.
    pub fn trainable_count(&self) -> usize {
        self.masters.iter().map(Vec::len).sum()
    }

    /// Writes the master weights into the model, as parameters of `tape` when given.
    fn install(&mut self, tape: Option<&Tape>) -> Result<Vec<Tensor>> {
        // A copy shares every tensor with the model, so this costs a few reference counts.
        let mut model = self.model.clone();
        let handles = self.install_into(&mut model, tape)?;
        self.model = model;
        if self.device.is_none() && tape.is_none() {
            self.host_params = handles.clone();
        }
        Ok(handles)
    }

    /// Writes the master weights into `model` (the trainer's model or a shard's copy of it).
    fn install_into(&self, model: &mut Llama, tape: Option<&Tape>) -> Result<Vec<Tensor>> {
        let mut handles = Vec::with_capacity(self.masters.len());
        let mut tensors = Vec::with_capacity(self.masters.len());
        let dev = model.device();
        for (i, (m, s)) in self.masters.iter().zip(&self.shapes).enumerate() {
            // Device-resident masters are used as they are; host masters are copied to where
            // the model is, once per change (a shard's tape reads the last copy).
            let t = match (&self.device, self.host_params.get(i)) {
                (Some(d), _) => d.params()[i].clone(),
                (None, Some(p)) if tape.is_some() => p.clone(),
                (None, _) => Tensor::from_vec(m.clone(), s.clone())?.to_device(&dev)?,
            };
            let t = match tape {
                Some(tape) => tape.param(&t),
                None => t,
            };
            tensors.push(t);
        }
        let mut it = tensors.into_iter();
        let mut take = |name: &str| -> Result<Tensor> {
            let t = it.next().ok_or_else(|| Error::Tape(format!("no master weight for {name}")))?;
            handles.push(t.clone());
            Ok(t)
        };
        match self.config.method {
            Method::Lora(_) | Method::Qlora(_) => model.map_lora(|name, _| take(name))?,
            Method::Full => model.map_parameters(|name, _| take(name))?,
            Method::Head => match &mut model.lm_head {
                Some(h) => *h = take("lm_head.weight")?,
                None => model.embed = take("model.embed_tokens.weight")?,
            },
            Method::Sparse(_) => {
                let layouts = &self.layouts;
                let mut i = 0;
                for (path, lin) in model.linears_mut() {
                    if lin.sparse.is_none() {
                        continue;
                    }
                    let Layout::Sparse { indices, .. } = &layouts[i] else { unreachable!("sparse methods have sparse layouts") };
                    lin.sparse = Some(SparseDelta { indices: indices.clone(), values: take(&format!("{path}.weight.values"))? });
                    i += 1;
                }
            }
        }
        Ok(handles)
    }

    /// The sequences of global micro-batch `k`.
    fn micro_batch(&self, k: usize) -> Vec<&Sequence> {
        let bpe = self.batches_per_epoch();
        let (epoch, b) = (k / bpe, k % bpe);
        let order = epoch_order(self.train.len(), self.config.seed, epoch, self.config.shuffle);
        let bs = self.config.batch_size;
        order[b * bs..((b + 1) * bs).min(order.len())].iter().map(|&i| &self.train[i]).collect()
    }

    /// One optimizer step over `grad_accum` micro-batches. The loss is the mean over all their
    /// target tokens, so accumulation gives the gradient of one big batch.
    pub fn train_step(&mut self) -> Result<StepReport> {
        self.start_step()?.wait()
    }

    /// `train_step`, returning once the step is queued: the loss and the gradient norm come
    /// with `PendingStep::wait`. The trainer is ready for the next step at once (the
    /// device's queue keeps the order), so a loop that queues step n + 1 before it waits for
    /// step n never lets the device idle between steps. Only a loss-scaled step (f16) waits
    /// here, on the gradients' norm: an overflow skips it.
    pub fn start_step(&mut self) -> Result<PendingStep> {
        let started = Instant::now();
        if self.device.is_none() && self.model.device() != crate::Device::Cpu {
            // Only after a failed upload (`reset_device_state`): the host path would train
            // stale masters.
            return Err(Error::InvalidArgument(format!("the training state is not on {} (its upload failed); resume from a checkpoint", self.model.device())));
        }
        let accum = self.config.grad_accum;
        let first = self.step * accum;
        // (micro-batch index, shard index, batch): CPU micro-batches split into row shards.
        let shards = if self.model.embed.device() == crate::Device::Cpu { self.config.shards.max(1) } else { 1 };
        let mut pieces = Vec::new();
        for k in first..first + accum {
            let seqs = self.micro_batch(k);
            let per = seqs.len().div_ceil(shards).max(1);
            for (s, chunk) in seqs.chunks(per).enumerate() {
                pieces.push((k, s, make_batch(chunk, self.pad)?));
            }
        }
        let total_targets: usize = pieces.iter().map(|p| p.2.targets).sum::<usize>().max(1);
        let window = self.in_grad_window();
        let sums_on = self.device.is_some().then(|| self.model.device());
        if window && self.grad_sums.is_none() {
            self.grad_sums = Some(regrow::GradSums::zeros(&self.layouts, sums_on)?);
        }
        // A regrowth window's dense gradients are summed as the pieces come (on the device when
        // training there, so each piece's are freed at once): into the window's sums, or with
        // a loss scale into this step's, added once the step is known not to overflow.
        let mut step_sums = if window && self.loss_scale.is_some() { Some(regrow::GradSums::zeros(&self.layouts, sums_on)?) } else { None };
        // The shards of a micro-batch run side by side; micro-batches run one after another
        // (accumulation bounds memory).
        let mut results: Vec<PieceGrads> = Vec::with_capacity(pieces.len());
        for group in pieces.chunk_by(|a, b| a.0 == b.0) {
            let out: Vec<Result<PieceGrads>> = if group.len() == 1 {
                vec![self.piece_grads(group[0].0, group[0].1, &group[0].2, total_targets, window)]
            } else {
                use rayon::prelude::*;
                // Each shard's products get an equal share of the threads.
                let threads = (rayon::current_num_threads() / group.len()).max(1);
                group
                    .par_iter()
                    .map(|(k, s, b)| crate::kernels::matmul::cpu::with_gemm_threads(threads, || self.piece_grads(*k, *s, b, total_targets, window)))
                    .collect()
            };
            for r in out {
                let mut r = r?;
                let weight_grads = std::mem::take(&mut r.weight_grads);
                if let Some(sums) = step_sums.as_mut().or(self.grad_sums.as_mut()) {
                    sums.add(&weight_grads, 1.0)?;
                }
                results.push(r);
            }
        }
        let lr = self.schedule().lr(self.step);
        if self.device.is_some() {
            return self.device_step(results, step_sums, lr, pieces.iter().map(|p| p.2.tokens).sum(), started);
        }
        // Summed in (micro-batch, shard) order, so the result does not depend on thread timing.
        let mut grads: Vec<Vec<f32>> = self.masters.iter().map(|m| vec![0.0; m.len()]).collect();
        let mut losses = Vec::with_capacity(results.len());
        for r in results {
            losses.push(r.loss.read_later()?);
            for (acc, g) in grads.iter_mut().zip(r.grads) {
                if let Some(g) = g {
                    // Read in place where it is a CPU f32 tensor (every CPU gradient), else copied.
                    let owned;
                    let g = match g.cpu_f32("trainer: gradient") {
                        Ok(v) => v,
                        Err(_) => {
                            owned = g.to_vec_f32()?;
                            &owned
                        }
                    };
                    acc.iter_mut().zip(g).for_each(|(a, v)| *a += v);
                }
            }
        }
        let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let sum_sq = sum_squares(&refs);
        let grad_norm = sum_sq.sqrt() as f32;
        self.optimizer.step(&mut self.masters, &grads, &self.layouts, lr, clip_scale(sum_sq, self.config.max_grad_norm))?;
        self.step += 1;
        self.maybe_reselect()?;
        self.install(None)?;
        let report = StepReport {
            step: self.step,
            loss: f32::NAN,
            lr,
            grad_norm,
            tokens: pieces.iter().map(|p| p.2.tokens).sum(),
            epoch: (self.step * accum) as f32 / self.batches_per_epoch() as f32,
            skipped: false,
        };
        Ok(PendingStep { report, losses, sum_sq: None, started, overlaps: false })
    }

    /// The optimizer step on the device: gradients summed there in piece order, then the
    /// device optimizer (`device.rs`); the host reads the loss and the gradient norm only.
    fn device_step(&mut self, results: Vec<PieceGrads>, step_sums: Option<regrow::GradSums>, lr: f32, tokens: usize, started: Instant) -> Result<PendingStep> {
        let dev = self.model.device();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.masters.len()];
        let mut losses = Vec::with_capacity(results.len());
        for r in results {
            losses.push(r.loss.read_later()?);
            for (acc, g) in grads.iter_mut().zip(r.grads) {
                if let Some(g) = g {
                    *acc = Some(match acc.take() {
                        None => g,
                        Some(a) => ops::add(&a, &g)?,
                    });
                }
            }
        }
        // A trained tensor that got no gradient gets zeros in its parameters' dtype (bf16 for
        // full and head fine-tuning on CUDA, whose optimizer takes gradients in that dtype).
        let params = self.device.as_ref().expect("device state").params();
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.shapes)
            .zip(params)
            .map(|((g, s), p)| g.map_or_else(|| Tensor::zeros(s.clone(), p.dtype(), &dev), Ok))
            .collect::<Result<_>>()?;
        let accum = self.config.grad_accum;
        let bpe = self.batches_per_epoch() as f32;
        let epoch = |step: usize| (step * accum) as f32 / bpe;
        // With a loss scale the gradients are scale·g: an overflow skips the step (the data
        // moves on, the weights and the optimizer's state do not).
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        if let Some(ls) = &mut self.loss_scale {
            let sum_sq = self.device.as_mut().expect("device state").sum_squares(&grads)?;
            ls.update(sum_sq.is_finite());
            if !sum_sq.is_finite() {
                self.step += 1;
                self.device_reselect()?;
                let report = StepReport { step: self.step, loss: f32::NAN, lr, grad_norm: f32::NAN, tokens, epoch: epoch(self.step), skipped: true };
                return Ok(PendingStep { report, losses, sum_sq: None, started, overlaps: false });
            }
        }
        // A loss-scaled step's regrowth gradients join the window's sums unscaled, now that
        // the step is taken.
        if let (Some(sums), Some(step)) = (&mut self.grad_sums, step_sums) {
            sums.absorb(step, 1.0 / scale)?;
        }
        let p = match &mut self.optimizer {
            Optimizer::AdamW(a) => {
                a.step += 1;
                let c = a.config;
                device::StepParams::AdamW(crate::kernels::optim::AdamWParams { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, step: a.step as u32, grad_scale: 1.0 / scale })
            }
            Optimizer::Sm3(o) => {
                o.step += 1;
                let c = o.config;
                device::StepParams::Sm3(crate::kernels::optim::Sm3Params { lr, eps: c.eps, beta1: c.beta1, weight_decay: c.weight_decay, grad_scale: 1.0 / scale })
            }
        };
        // The kernels clip against the scaled norm, so the bound is scaled too.
        let sum_sq = self.device.as_mut().expect("device state").step(&grads, p, self.config.max_grad_norm * scale)?;
        self.step += 1;
        self.device_reselect()?;
        self.install(None)?;
        let report = StepReport { step: self.step, loss: f32::NAN, lr, grad_norm: f32::NAN, tokens, epoch: epoch(self.step), skipped: false };
        Ok(PendingStep { report, losses, sum_sq: Some((sum_sq, scale)), started, overlaps: self.loss_scale.is_none() })
    }

    /// Loss and gradients of one shard of micro-batch `k`, on a tape of its own over a copy of
    /// the model (the copy shares the frozen weights). The loss is scaled by the shard's share
    /// of the step's target tokens.
    fn piece_grads(&self, k: usize, shard: usize, batch: &data::Batch, total_targets: usize, window: bool) -> Result<PieceGrads> {
        let tape = Tape::new();
        let mut model = self.model.clone();
        model.checkpoint_layers = self.config.checkpoint_layers;
        let params = self.install_into(&mut model, Some(&tape))?;
        // Gradient regrowth: the target weights become tape parameters, so the sparse linears
        // also produce their dense gradient.
        let weights: Vec<Tensor> = if window {
            model.linears_mut().into_iter().filter(|(_, l)| l.sparse.is_some()).map(|(_, l)| {
                l.weight = tape.param(&l.weight);
                l.weight.clone()
            }).collect()
        } else {
            Vec::new()
        };
        // Shard 0 keeps the micro-batch's seed, so one shard is the unsharded step.
        let seed = self.config.seed ^ (k as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f);
        model.dropout_seed = Some(seed ^ (shard as u64).wrapping_mul(0x94d0_49bb_1331_11eb));
        let loss = match &batch.packing {
            Some(pk) => model.loss_packed(&batch.ids, Some(&batch.mask), pk),
            None => model.loss(&batch.ids, Some(&batch.mask)),
        };
        let loss = ops::scale(&loss?, batch.targets as f32 / total_targets as f32)?;
        // An f16 model's backward starts from the loss scale (see `LossScale`).
        let g = match self.loss_scale {
            Some(ls) => tape.backward_from(&loss, &Tensor::full(ls.scale, loss.shape().clone(), &loss.device())?)?,
            None => tape.backward(&loss)?,
        };
        let weight_grads = weights.iter().map(|p| g.get(p).cloned()).collect();
        Ok(PieceGrads { loss, grads: params.iter().map(|p| g.get(p).cloned()).collect(), weight_grads })
    }

    /// Mean loss over the target tokens of `seqs` (no tape, no dropout).
    pub fn evaluate(&mut self, seqs: &[Sequence]) -> Result<f32> {
        self.install(None)?;
        evaluate(&self.model, seqs, self.config.batch_size, self.pad)
    }

    /// Writes what the run trained, as it stands, under `out`: `adapter/` (PEFT's format) for
    /// LoRA and QLoRA, `sparse/` for sparse deltas, `model/` (a Hugging Face folder, config and
    /// tokenizer copied from `base`) for full and head fine-tuning. `base` is also recorded as
    /// the base model of an adapter or deltas. Returns the folder written.
    pub fn write_result(&mut self, out: &std::path::Path, base: &std::path::Path) -> Result<std::path::PathBuf> {
        self.install(None)?;
        let name = base.display().to_string();
        let dir = match &self.config.method {
            Method::Lora(l) | Method::Qlora(l) => {
                let dir = out.join("adapter");
                crate::peft::save_adapter(&self.model, l, &name, &dir)?;
                dir
            }
            Method::Sparse(_) => {
                let dir = out.join("sparse");
                crate::peft::sparse::save_deltas(&self.model, &name, &dir)?;
                dir
            }
            Method::Full | Method::Head => {
                let dir = out.join("model");
                self.model.save(base, &dir)?;
                dir
            }
        };
        Ok(dir)
    }
}

/// Mean next-token loss over the target tokens of `seqs`, in batches.
pub fn evaluate(model: &Llama, seqs: &[Sequence], batch_size: usize, pad: u32) -> Result<f32> {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let b = make_batch(&refs, pad)?;
        if b.targets == 0 {
            continue;
        }
        let loss = match &b.packing {
            Some(pk) => model.loss_packed(&b.ids, Some(&b.mask), pk)?,
            None => model.loss(&b.ids, Some(&b.mask))?,
        };
        nll += loss.to_scalar()? as f64 * b.targets as f64;
        n += b.targets;
    }
    Ok(if n == 0 { f32::NAN } else { (nll / n as f64) as f32 })
}

/// The tensors a method trains, with their names, in a fixed order.
fn trainable(model: &Llama, method: &Method) -> Vec<(String, Tensor)> {
    match method {
        Method::Lora(_) | Method::Qlora(_) => model.lora_parameters(),
        Method::Full => model.parameters(),
        Method::Head => match &model.lm_head {
            Some(h) => vec![("lm_head.weight".into(), h.clone())],
            None => vec![("model.embed_tokens.weight".into(), model.embed.clone())],
        },
        Method::Sparse(_) => model.sparse_deltas().into_iter().map(|(p, d)| (format!("{p}.weight.values"), d.values)).collect(),
    }
}
