//! The training loop around a `Trainer`: progress line, periodic evaluation, metrics (JSONL or
//! CSV), checkpoints (periodic, at the end, and on request from another thread, e.g. Ctrl-C),
//! resume, and the loss-curve image.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{json, Value};

use super::data::Sequence;
use super::{plot, PendingStep, StepReport, Trainer};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsFormat {
    Jsonl,
    Csv,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: usize,
    pub metrics: MetricsFormat,
    /// Continue from `out/checkpoint` when it exists.
    pub resume: bool,
    /// Draw the progress line on stderr.
    pub progress: bool,
    /// Behave as if stopped (Ctrl-C) right after this step: for testing the interrupt path.
    pub stop_after: Option<usize>,
    /// Keep the best result: with the base model's folder, each evaluation that lowers the eval
    /// loss below every earlier one writes the result as it stands under `out/best`
    /// (`Trainer::write_result`).
    pub keep_best: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: usize,
    pub final_train_loss: f32,
    pub final_eval_loss: Option<f32>,
    /// The lowest eval loss and its step (resumed runs count the steps before).
    pub best_eval: Option<(usize, f32)>,
    pub tokens_per_second: f64,
    pub seconds: f64,
    pub metrics_path: PathBuf,
    pub plot_path: PathBuf,
    pub checkpoint_path: PathBuf,
    /// Stopped early by the stop flag (a checkpoint was written).
    pub interrupted: bool,
}

/// One row of the metrics file.
#[derive(Clone, Debug)]
struct Row {
    step: usize,
    epoch: f32,
    loss: Option<f32>,
    eval_loss: Option<f32>,
    lr: f32,
    grad_norm: Option<f32>,
    tokens_per_second: Option<f64>,
}

impl Row {
    fn json(&self) -> Value {
        json!({"step": self.step, "epoch": self.epoch, "loss": self.loss, "eval_loss": self.eval_loss,
               "lr": self.lr, "grad_norm": self.grad_norm, "tokens_per_second": self.tokens_per_second})
    }
    fn csv(&self) -> String {
        let o = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        format!("{},{},{},{},{},{},{}", self.step, self.epoch, o(self.loss), o(self.eval_loss), self.lr, o(self.grad_norm), self.tokens_per_second.map(|x| format!("{x:.1}")).unwrap_or_default())
    }
    fn parse(line: &str, format: MetricsFormat) -> Option<Row> {
        match format {
            MetricsFormat::Jsonl => {
                let v: Value = serde_json::from_str(line).ok()?;
                let f = |k: &str| v.get(k).and_then(Value::as_f64);
                Some(Row { step: f("step")? as usize, epoch: f("epoch")? as f32, loss: f("loss").map(|x| x as f32), eval_loss: f("eval_loss").map(|x| x as f32), lr: f("lr")? as f32, grad_norm: f("grad_norm").map(|x| x as f32), tokens_per_second: f("tokens_per_second") })
            }
            MetricsFormat::Csv => {
                let c: Vec<&str> = line.split(',').collect();
                let o = |s: &str| s.parse::<f32>().ok();
                Some(Row { step: c.first()?.parse().ok()?, epoch: o(c.get(1)?)?, loss: o(c.get(2)?), eval_loss: o(c.get(3)?), lr: o(c.get(4)?)?, grad_norm: o(c.get(5)?), tokens_per_second: c.get(6)?.parse().ok() })
            }
        }
    }
}

const CSV_HEADER: &str = "step,epoch,loss,eval_loss,lr,grad_norm,tokens_per_second";

fn write_metrics(path: &Path, rows: &[Row], format: MetricsFormat) -> Result<()> {
    let mut text = String::new();
    if format == MetricsFormat::Csv {
        text.push_str(CSV_HEADER);
        text.push('\n');
    }
    for r in rows {
        text.push_str(&match format {
            MetricsFormat::Jsonl => r.json().to_string(),
            MetricsFormat::Csv => r.csv(),
        });
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

fn fmt_time(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Trains to the end (or until `stop` is raised), evaluating on `eval`, writing metrics and
/// checkpoints under `opts.out`.
pub fn run(trainer: &mut Trainer, eval: &[Sequence], opts: &RunOptions, stop: &AtomicBool) -> Result<RunSummary> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::file(&opts.out, format!("cannot create: {e}")))?;
    let ext = match opts.metrics {
        MetricsFormat::Jsonl => "jsonl",
        MetricsFormat::Csv => "csv",
    };
    let metrics_path = opts.out.join(format!("metrics.{ext}"));
    let checkpoint_path = opts.out.join("checkpoint");
    let plot_path = opts.out.join("loss.png");
    let mut rows: Vec<Row> = Vec::new();
    if opts.resume && checkpoint_path.join("trainer_state.json").exists() {
        trainer.load_checkpoint(&checkpoint_path)?;
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            rows = text.lines().filter_map(|l| Row::parse(l, opts.metrics)).filter(|r| r.step <= trainer.step).collect();
        }
        eprintln!("resumed from {} at step {}", checkpoint_path.display(), trainer.step);
    }
    let total = trainer.total_steps();
    let started = Instant::now();
    let start_step = trainer.step;
    let (mut tokens, mut last) = (0usize, None::<StepReport>);
    let tty = opts.progress && std::io::stderr().is_terminal();
    let mut last_eval = rows.iter().rev().find_map(|r| r.eval_loss);
    let lower = |a: (usize, f32), b: (usize, f32)| if b.1 < a.1 { b } else { a };
    let mut best_eval = rows.iter().filter_map(|r| Some((r.step, r.eval_loss?))).reduce(lower);
    let interrupted;
    let evaluates = |step: usize| !eval.is_empty() && ((opts.eval_every > 0 && step.is_multiple_of(opts.eval_every)) || step == total);
    let checkpoints = |step: usize| opts.checkpoint_every > 0 && step.is_multiple_of(opts.checkpoint_every) && step < total;
    // Steps after which the loop needs the trainer as that step left it: the next step is
    // queued only once these are done.
    let holds = |step: usize| evaluates(step) || checkpoints(step) || opts.stop_after == Some(step);
    // Step n + 1 is queued before step n's loss is read, so the device does not idle while the
    // host logs; only where step n may still be running (`PendingStep::overlaps`: on the CPU
    // the step is done when queued, and queuing the next first would count its time as n's).
    let mut pending: Option<PendingStep> = None;
    let mut last_done = started;
    loop {
        let hold = pending.as_ref().is_some_and(|p| !p.overlaps || holds(p.step()));
        let stopping = stop.load(Ordering::SeqCst);
        let next = if trainer.step < total && !stopping && !hold { Some(trainer.start_step()?) } else { None };
        let Some(p) = pending.take() else {
            if next.is_none() {
                interrupted = stopping && trainer.step < total;
                break;
            }
            pending = next;
            continue;
        };
        // A step's time runs from when it was queued or the previous one finished, whichever
        // came later (evaluation and checkpoints are not counted).
        let from = p.started.max(last_done);
        let r = p.wait()?;
        last_done = Instant::now();
        tokens += r.tokens;
        let tps = r.tokens as f64 / (last_done - from).as_secs_f64().max(1e-9);
        let mut row = Row { step: r.step, epoch: r.epoch, loss: Some(r.loss), eval_loss: None, lr: r.lr, grad_norm: Some(r.grad_norm), tokens_per_second: Some(tps) };
        if evaluates(r.step) {
            let e = trainer.evaluate(eval)?;
            row.eval_loss = Some(e);
            last_eval = Some(e);
            if best_eval.is_none_or(|(_, b)| e < b) {
                best_eval = Some((r.step, e));
                if let Some(base) = &opts.keep_best {
                    trainer.write_result(&opts.out.join("best"), base)?;
                }
            }
        }
        rows.push(row);
        if checkpoints(r.step) {
            trainer.save_checkpoint(&checkpoint_path)?;
            write_metrics(&metrics_path, &rows, opts.metrics)?;
        }
        if opts.progress {
            let done = r.step - start_step;
            let elapsed = started.elapsed().as_secs_f64();
            let eta = elapsed / done as f64 * (total - r.step) as f64;
            let width = 24;
            let filled = width * r.step / total.max(1);
            let bar: String = (0..width).map(|i| if i < filled { '=' } else if i == filled { '>' } else { ' ' }).collect();
            let eval_txt = last_eval.map(|e| format!(" eval {e:.4}")).unwrap_or_default();
            let line = format!(
                "step {}/{total} [{bar}] loss {:.4}{eval_txt} lr {:.2e} {:.0} tok/s eta {}",
                r.step, r.loss, r.lr, tokens as f64 / elapsed.max(1e-9), fmt_time(eta)
            );
            if tty {
                eprint!("\r{line}\x1b[K");
                let _ = std::io::stderr().flush();
            } else if r.step % 10 == 0 || r.step == total || r.step == start_step + 1 {
                eprintln!("{line}");
            }
        }
        let stop_here = opts.stop_after == Some(r.step);
        last = Some(r);
        if stop_here {
            interrupted = true;
            break;
        }
        pending = next;
    }
    if tty {
        eprintln!();
    }
    trainer.save_checkpoint(&checkpoint_path)?;
    write_metrics(&metrics_path, &rows, opts.metrics)?;
    let train: Vec<(f32, f32)> = rows.iter().filter_map(|r| Some((r.step as f32, r.loss?))).collect();
    let evals: Vec<(f32, f32)> = rows.iter().filter_map(|r| Some((r.step as f32, r.eval_loss?))).collect();
    plot::loss_curve(&plot_path, &train, &evals)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(RunSummary {
        steps: trainer.step,
        final_train_loss: last.map(|r| r.loss).or_else(|| rows.iter().rev().find_map(|r| r.loss)).unwrap_or(f32::NAN),
        final_eval_loss: last_eval,
        best_eval,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        seconds,
        metrics_path,
        plot_path,
        checkpoint_path,
        interrupted,
    })
}
