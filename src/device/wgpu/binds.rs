//! Bind groups kept for reuse. Making one costs more than the rest of recording a dispatch
//! (wgpu validates it, allocates a descriptor set and tracks it: recording a dispatch took 1.33
//! µs with a fresh one and 0.39 µs with a kept one on the development machine, `cargo bench
//! --bench kernels -- dispatch/wgpu`), and on a device tuna opened the same kernel meets the
//! same buffers step after step: tensors come from the pool, uniforms from their cache. So
//! there a bind group is kept by pipeline and buffers, and made once.
//!
//! A kept bind group holds its buffers alive. So a pool buffer that is released for good drops
//! the bind groups that hold it (`forget`), and a device keeps at most [`KEPT`], after which
//! its bind groups start over. A program's own device gets a fresh bind group each dispatch,
//! as before: tuna cannot tell when it drops its buffers.

// wgpu's handles (`Buffer`, `ComputePipeline`) hash and compare by their id, which never changes,
// though clippy sees interior mutability in them.
#![allow(clippy::mutable_key_type)]

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Bind groups a device keeps before they start over.
pub const KEPT: usize = 4096;

/// What a bind group is made of: the pipeline (whose layout it follows) and each buffer at its
/// binding number.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<(u32, wgpu::Buffer)>,
}

type Kept = HashMap<wgpu::Device, HashMap<Key, wgpu::BindGroup>>;
static KEPT_GROUPS: LazyLock<Mutex<Kept>> = LazyLock::new(Mutex::default);

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT_GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new bind group of `buffers` at their binding numbers for `pipeline`'s group 0 (what each
/// dispatch made before bind groups were kept).
pub fn fresh_bind_group(device: &wgpu::Device, pipeline: &wgpu::ComputePipeline, buffers: &[(u32, &wgpu::Buffer)]) -> wgpu::BindGroup {
    let layout = pipeline.get_bind_group_layout(0);
    let entries: Vec<wgpu::BindGroupEntry> =
        buffers.iter().map(|(i, b)| wgpu::BindGroupEntry { binding: *i, resource: b.as_entire_binding() }).collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &layout, entries: &entries })
}

/// The bind group for a dispatch on `device`: kept where tuna opened the device, else made for
/// this dispatch. One the device refuses pauses its batch ([`super::batch`]) and is made again
/// outside the error scope that caught it, so that the device's handler records the error as for
/// any refused work (and the dispatch is submitted on its own, to fail alone).
pub fn bind_group(device: &wgpu::Device, pipeline: &wgpu::ComputePipeline, buffers: &[(u32, &wgpu::Buffer)]) -> wgpu::BindGroup {
    if !super::is_batched(device) {
        return fresh_bind_group(device, pipeline, buffers);
    }
    let key = Key { pipeline: pipeline.clone(), buffers: buffers.iter().map(|(i, b)| (*i, (*b).clone())).collect() };
    if let Some(group) = kept().get(device).and_then(|groups| groups.get(&key)) {
        return group.clone();
    }
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let group = fresh_bind_group(device, pipeline, buffers);
    if pollster::block_on(scope.pop()).is_some() {
        super::batch::pause(device);
        return fresh_bind_group(device, pipeline, buffers);
    }
    let mut all = kept();
    let mine = all.entry(device.clone()).or_default();
    if mine.len() >= KEPT {
        mine.clear();
    }
    mine.insert(key, group.clone());
    group
}

/// Drops the kept bind groups that hold `buffer` (a pool buffer released for good), so that
/// its memory goes back to the device.
pub(super) fn forget(buffer: &wgpu::Buffer) {
    for groups in kept().values_mut() {
        groups.retain(|key, _| !key.buffers.iter().any(|(_, b)| b == buffer));
    }
}

/// Whether a kept bind group on any device holds `buffer`.
pub fn holds(buffer: &wgpu::Buffer) -> bool {
    kept().values().any(|groups| groups.keys().any(|key| key.buffers.iter().any(|(_, b)| b == buffer)))
}
