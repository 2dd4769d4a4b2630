//! Optimizers over f32 master weights, the learning-rate schedule and gradient clipping.

mod adamw;
mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{clip_grad_norm, Schedule, ScheduleKind};
