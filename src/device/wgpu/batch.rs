//! Submissions in batches. A `queue.submit` costs far more than recording a dispatch (wgpu
//! tracks and fences each submission, and the driver wakes for it): on lavapipe a chain of
//! small dispatches took 84 µs a dispatch with one submit each and 61 µs batched (`cargo bench
//! --bench kernels -- dispatch/wgpu`; lavapipe runs each dispatch on the CPU, ~40-60 µs of
//! it), and batches of 8 already saved most of it. So on a device tuna
//! opened ([`super::runtime`]), launches record into one open encoder and command buffers wait
//! in order, and the device's queue gets them all in one submit every [`BATCH`] launches, or
//! before anything that must come after them: a read, a synchronization, a `write_buffer`.
//!
//! A device tuna did not open (a program's own, handed to the launchers) is never batched: each
//! launch is submitted when it returns, as the program expects.
//!
//! Every submit and `write_buffer` in tuna goes through here ([`submit`], [`submit_now`],
//! [`write_buffer`]); one that went around would run ahead of the work recorded before it.
//!
//! Work wgpu refuses (a bind group it will not make, a buffer it could not allocate) spoils the
//! whole command buffer it is recorded in. So once a device has refused something, its batch is
//! paused: what was recorded before is submitted on its own, and each launch after it goes in
//! a submit of its own, as without batching, until the error has been reported (by a read or a
//! synchronization). Only the refused launches are lost, not the ones batched around them.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Launches (dispatches and command buffers) a device's batch takes before it is submitted:
/// past ~8 the saving levels off on lavapipe, and a GPU idles until the first submit.
pub const BATCH: usize = 32;

/// Work recorded on one device and not yet submitted.
#[derive(Default)]
struct Batch {
    /// Dispatches recorded since the last command buffer was closed.
    open: Option<wgpu::CommandEncoder>,
    /// Command buffers in submission order (`open`'s work comes after them).
    closed: Vec<wgpu::CommandBuffer>,
    /// Launches since the last submit.
    launches: usize,
    /// The device refused work that is not yet reported: launches are submitted one by one.
    paused: bool,
}

impl Batch {
    /// Everything recorded, in order, leaving the batch empty.
    fn take(&mut self) -> Vec<wgpu::CommandBuffer> {
        if let Some(enc) = self.open.take() {
            self.closed.push(enc.finish());
        }
        self.launches = 0;
        std::mem::take(&mut self.closed)
    }
}

/// The batches of the devices tuna opened; a device missing here is not batched.
static BATCHES: LazyLock<Mutex<HashMap<wgpu::Device, Batch>>> = LazyLock::new(Mutex::default);

fn batches() -> std::sync::MutexGuard<'static, HashMap<wgpu::Device, Batch>> {
    BATCHES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Batches `device`'s launches from now on (`runtime` calls it for the devices it opens).
pub(super) fn enable(device: &wgpu::Device) {
    batches().entry(device.clone()).or_default();
}

/// Whether `device`'s launches are batched (tuna opened it; this stays true while a refusal
/// pauses its batch).
pub fn is_batched(device: &wgpu::Device) -> bool {
    batches().contains_key(device)
}

/// `device` refused work (or will: a buffer it could not make): its batch pauses until
/// [`resume`].
pub(super) fn pause(device: &wgpu::Device) {
    if let Some(batch) = batches().get_mut(device) {
        batch.paused = true;
    }
}

/// The refused work has been reported: `device` batches again.
pub(super) fn resume(device: &wgpu::Device) {
    if let Some(batch) = batches().get_mut(device) {
        batch.paused = false;
    }
}

/// The batch of a device that batches now, or, for a paused one, after submitting what it
/// recorded before the pause on its own; `None` where the launch at hand goes alone.
#[allow(clippy::mutable_key_type)] // `wgpu::Device` hashes and compares by its id, which never changes.
fn open_batch<'a>(all: &'a mut HashMap<wgpu::Device, Batch>, device: &wgpu::Device, queue: &wgpu::Queue) -> Option<&'a mut Batch> {
    let batch = all.get_mut(device)?;
    if !batch.paused {
        return Some(batch);
    }
    let earlier = batch.take();
    if !earlier.is_empty() {
        queue.submit(earlier);
    }
    None
}

/// After one more launch: submits the batch when it is full. The lock is held through the
/// submit, so batches reach the queue in the order they were recorded.
fn count(queue: &wgpu::Queue, batch: &mut Batch) {
    batch.launches += 1;
    if batch.launches >= BATCH {
        queue.submit(batch.take());
    }
}

/// Records one dispatch, the buffers bound at their binding numbers: into `device`'s batch where
/// tuna opened the device, else into an encoder of its own that is submitted before this
/// returns.
pub fn dispatch(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[(u32, &wgpu::Buffer)],
    workgroups: (u32, u32, u32),
) {
    let group = super::binds::bind_group(device, pipeline, buffers);
    let mut all = batches();
    match open_batch(&mut all, device, queue) {
        Some(batch) => {
            let enc = batch.open.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
            super::record(enc, pipeline, &group, workgroups);
            count(queue, batch);
        }
        None => {
            let mut enc = device.create_command_encoder(&Default::default());
            super::record(&mut enc, pipeline, &group, workgroups);
            queue.submit([enc.finish()]);
        }
    }
}

/// Queues `enc`'s commands behind everything recorded on `device` so far (submitted with the
/// batch; at once on a device that is not batched, or whose batch a refusal paused).
pub fn submit(device: &wgpu::Device, queue: &wgpu::Queue, enc: wgpu::CommandEncoder) {
    let mut all = batches();
    match open_batch(&mut all, device, queue) {
        Some(batch) => {
            if let Some(open) = batch.open.take() {
                batch.closed.push(open.finish());
            }
            batch.closed.push(enc.finish());
            count(queue, batch);
        }
        None => {
            queue.submit([enc.finish()]);
        }
    }
}

/// Submits everything recorded on `device`, then `enc` (if any), now; the index is what a poll
/// waits for.
pub fn submit_now(device: &wgpu::Device, queue: &wgpu::Queue, enc: Option<wgpu::CommandEncoder>) -> wgpu::SubmissionIndex {
    let mut all = batches();
    let mut work = open_batch(&mut all, device, queue).map(Batch::take).unwrap_or_default();
    work.extend(enc.map(|e| e.finish()));
    queue.submit(work)
}

/// Submits everything recorded on `device` now. A program that shares a device tuna opened
/// calls it before submitting work of its own that reads what tuna's launches wrote.
pub fn flush(device: &wgpu::Device, queue: &wgpu::Queue) {
    let mut all = batches();
    if let Some(batch) = all.get_mut(device) {
        if batch.launches > 0 || batch.open.is_some() || !batch.closed.is_empty() {
            queue.submit(batch.take());
        }
    }
}

/// `queue.write_buffer` behind the work recorded so far. wgpu runs a `write_buffer` before the
/// next submission's commands, so recorded work that still reads the buffer's old contents (a
/// pooled buffer given out again) is submitted first.
pub fn write_buffer(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer, offset: u64, data: &[u8]) {
    flush(device, queue);
    queue.write_buffer(buffer, offset, data);
}
