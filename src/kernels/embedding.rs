//! Embedding gather: `y[t, :] = table[ids[t], :]`, table `[V, E]`, ids `[T]` (i32), y `[T, E]`.
//!
//! Backward (scatter-add): `dtable[v, :] = sum over t with ids[t] == v of dy[t, :]`; the ids
//! get no gradient. Letters: T tokens, V vocabulary, E embedding width (the hidden size).
//!
//! Kernels: `kernels-cuda/embedding.cu` (f32, bf16), `kernels-wgsl/embedding.wgsl` (f32). The
//! GPU backward adds into dtable (`+=`, like `cpu::scatter_add`: zero it first for a plain
//! gradient) without atomics: the first token of each distinct id owns that id's row and adds
//! the dy rows of all its tokens in token order. So results are deterministic, and in f32
//! bitwise equal to the CPU path, whose sequential loop adds in the same order. The kernels
//! read an out-of-range id as a zero row and scatter nothing for it; check ids with
//! `check_ids` on the host before they go to the device.

use crate::kernels::check_len;
use crate::{Error, Result};

/// Sizes of one embedding call on a GPU.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingParams {
    /// T: tokens (ids).
    pub tokens: usize,
    /// V: rows of the table.
    pub vocab: usize,
    /// E: columns of the table.
    pub dim: usize,
}

impl EmbeddingParams {
    /// Checks the table-shaped buffer `table` `[V, E]`, ids `[T]` and the token rows `rows`
    /// `[T, E]`; names are the buffers' names in `op`.
    fn check(&self, op: &'static str, table: (&str, usize), ids: usize, rows: (&str, usize)) -> Result<()> {
        let fits = |n: Option<usize>| n.is_some_and(|n| n <= i32::MAX as usize);
        if !fits(self.vocab.checked_mul(self.dim)) || !fits(self.tokens.checked_mul(self.dim)) {
            return Err(Error::InvalidArgument(format!(
                "{op}: table [{}, {}] or rows [{}, {}] exceed i32 elements",
                self.vocab, self.dim, self.tokens, self.dim
            )));
        }
        check_len(op, table.0, table.1, self.vocab * self.dim)?;
        check_len(op, "ids", ids, self.tokens)?;
        check_len(op, rows.0, rows.1, self.tokens * self.dim)
    }
}

/// Checks every id against the vocabulary size, naming the first bad one and its position.
pub fn check_ids(ids: &[i32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&i| i < 0 || i as usize >= vocab) {
        Some(pos) => Err(Error::IndexOutOfRange { op: "embedding", index: ids[pos] as i64, position: pos, bound: vocab }),
        None => Ok(()),
    }
}

pub mod reference {
    pub fn gather(table: &[f64], ids: &[i32], e: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(ids.len() * e);
        for &id in ids {
            out.extend_from_slice(&table[id as usize * e..(id as usize + 1) * e]);
        }
        out
    }

    /// `dtable[v, :] += dy[t, :]` for every t with `ids[t] == v`.
    pub fn scatter_add(dy: &[f64], ids: &[i32], dtable: &mut [f64], e: usize) {
        for (t, &id) in ids.iter().enumerate() {
            for c in 0..e {
                dtable[id as usize * e + c] += dy[t * e + c];
            }
        }
    }
}

pub mod cpu {
    use rayon::prelude::*;

    /// Ids must have been checked with `check_ids`.
    pub fn gather(table: &[f32], ids: &[i32], out: &mut [f32], e: usize) {
        out.par_chunks_mut(e).zip(ids.par_iter()).for_each(|(o, &id)| {
            o.copy_from_slice(&table[id as usize * e..(id as usize + 1) * e]);
        });
    }

    /// `gather` from a bf16 table, each row widened to f32 (exact).
    pub fn gather_bf16(table: &[half::bf16], ids: &[i32], out: &mut [f32], e: usize) {
        out.par_chunks_mut(e).zip(ids.par_iter()).for_each(|(o, &id)| {
            o.iter_mut().zip(&table[id as usize * e..(id as usize + 1) * e]).for_each(|(o, v)| *o = v.to_f32());
        });
    }

    /// Adds each row of dy into its id's row of dtable (sequential: ids repeat).
    pub fn scatter_add(dy: &[f32], ids: &[i32], dtable: &mut [f32], e: usize) {
        for (row, &id) in dy.chunks(e).zip(ids) {
            for (d, g) in dtable[id as usize * e..(id as usize + 1) * e].iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::EmbeddingParams;
    use crate::device::cuda::ModuleCache;
    use crate::{Error, Result};

    /// Threads per block; the backward's shared list holds one chunk of this many ids.
    const BLOCK: u32 = 256;

    fn suffix<T>(op: &str) -> Result<&'static str> {
        match std::mem::size_of::<T>() {
            4 => Ok("f32"),
            2 => Ok("bf16"),
            s => Err(Error::InvalidArgument(format!("{op}: no CUDA kernel for {s}-byte elements"))),
        }
    }

    fn launch<T: DeviceRepr>(
        op: &'static str,
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        src: &CudaView<'_, T>,
        ids: &CudaView<'_, i32>,
        dst: &mut CudaViewMut<'_, T>,
        p: EmbeddingParams,
    ) -> Result<()> {
        if p.tokens == 0 || p.dim == 0 {
            return Ok(());
        }
        let f = modules.function("embedding", &format!("{op}_{}", suffix::<T>(op)?))?;
        let cfg = LaunchConfig { grid_dim: (p.tokens as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let (t, v, e) = (p.tokens as i32, p.vocab as i32, p.dim as i32);
        // SAFETY: argument types match the kernel signature; the caller checked the lengths.
        unsafe { stream.launch_builder(&f).arg(src).arg(ids).arg(dst).arg(&t).arg(&v).arg(&e).launch(cfg) }
            .map_err(|e| Error::cuda(format!("launching {op}"), e))?;
        Ok(())
    }

    /// `y[t, :] = table[ids[t], :]`; f32 (`T = f32`) or bf16 bits (`T = u16`).
    pub fn forward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        table: &CudaView<'_, T>,
        ids: &CudaView<'_, i32>,
        y: &mut CudaViewMut<'_, T>,
        p: EmbeddingParams,
    ) -> Result<()> {
        p.check("embedding_fwd", ("table", table.len()), ids.len(), ("y", y.len()))?;
        launch("embedding_fwd", stream, modules, table, ids, y, p)
    }

    /// `dtable[v, :] += sum of dy[t, :] over ids[t] == v`, deterministic (no atomics).
    pub fn backward<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        modules: &ModuleCache,
        dy: &CudaView<'_, T>,
        ids: &CudaView<'_, i32>,
        dtable: &mut CudaViewMut<'_, T>,
        p: EmbeddingParams,
    ) -> Result<()> {
        p.check("embedding_bwd", ("dtable", dtable.len()), ids.len(), ("dy", dy.len()))?;
        launch("embedding_bwd", stream, modules, dy, ids, dtable, p)
    }
}

pub mod wgsl {
    use super::EmbeddingParams;
    pub use crate::device::wgpu::Precision;
    use crate::device::wgpu::{dispatch, grid, uniform, KernelCache};
    use crate::Result;

    pub const SOURCE: &str = wgsl_source!("embedding.wgsl");

    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct Params {
        tokens: u32,
        vocab: u32,
        dim: u32,
        _pad: u32,
    }

    fn elems(b: &wgpu::Buffer) -> usize {
        b.size() as usize / 4
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        entry: &str,
        src: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        p: EmbeddingParams,
        precision: Precision,
    ) -> Result<()> {
        if p.tokens == 0 || p.dim == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, entry, SOURCE, entry, precision)?;
        let u = uniform(device, &Params { tokens: p.tokens as u32, vocab: p.vocab as u32, dim: p.dim as u32, _pad: 0 });
        let (gx, gy) = grid(p.tokens as u32);
        dispatch(device, queue, &pipe, &[&u, src, ids, dst], (gx, gy, 1));
        Ok(())
    }

    /// `y[t, :] = table[ids[t], :]`, table and y stored in `precision`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        table: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        y: &wgpu::Buffer,
        p: EmbeddingParams,
        precision: Precision,
    ) -> Result<()> {
        let tensor = |b: &wgpu::Buffer| b.size() as usize / precision.bytes();
        p.check("embedding_fwd", ("table", tensor(table)), elems(ids), ("y", tensor(y)))?;
        run(device, queue, kernels, "embedding_fwd", table, ids, y, p, precision)
    }

    /// `dtable[v, :] += sum of dy[t, :] over ids[t] == v`, deterministic (no atomics), dy and
    /// dtable stored in `precision` (the sums in f32).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        dy: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        dtable: &wgpu::Buffer,
        p: EmbeddingParams,
        precision: Precision,
    ) -> Result<()> {
        let tensor = |b: &wgpu::Buffer| b.size() as usize / precision.bytes();
        p.check("embedding_bwd", ("dtable", tensor(dtable)), elems(ids), ("dy", tensor(dy)))?;
        run(device, queue, kernels, "embedding_bwd", dy, ids, dtable, p, precision)
    }
}
