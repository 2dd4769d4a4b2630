//! The sparse delta of sparse fine-tuning: a `[N, K]` weight W plus `scatter(δ)`, the values
//! δ at sorted flat indices `e = n·K + k` (zero elsewhere). With x `[M, K]` and dy `[M, N]`:
//!
//! - forward `y += x·scatter(δ)ᵀ`: `y[m, n_e] += x[m, k_e]·δ_e` (SpMM);
//! - backward `dx += dy·scatter(δ)`: `dx[m, k_e] += dy[m, n_e]·δ_e` (SpMM, transposed), and
//!   `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]` (SDDMM).
//!
//! Each costs M·nnz multiply-adds, so with 1% density the delta adds about 1% to the dense
//! layer; the dense part (`x·Wᵀ`, `dy·W`) runs on the GEMM as for a frozen weight.

use std::sync::{Arc, OnceLock};

use crate::kernels::check_len;
use crate::{Device, Error, Result};

/// The active entries of a sparse delta: sorted, distinct flat indices (read as a `[u32]`),
/// with a copy on the GPU made on first use there and kept while the active set lasts (a
/// training run's sparse linears read the same indices every forward until a reselection).
#[derive(Default)]
pub struct SparseIndices {
    host: Vec<u32>,
    device: OnceLock<(Device, Arc<DeviceIndices>)>,
}

/// A device copy of sparse indices.
pub(crate) enum DeviceIndices {
    Wgpu(crate::device::wgpu::PooledBuffer),
    Cuda(cudarc::driver::CudaSlice<u32>),
}

impl SparseIndices {
    pub fn new(host: Vec<u32>) -> Self {
        SparseIndices { host, device: OnceLock::new() }
    }

    /// The indices on `t`'s device (a GPU): the cached copy, uploaded on first use there.
    pub(crate) fn on_device_of(&self, t: &crate::Tensor) -> Result<Arc<DeviceIndices>> {
        use crate::tensor::Storage;
        let upload = || -> Result<Arc<DeviceIndices>> {
            Ok(Arc::new(match t.storage() {
                Storage::Wgpu { rt, .. } => DeviceIndices::Wgpu(crate::ops::gpu::wgpu_upload(rt, &self.host)),
                Storage::Cuda { rt, .. } => DeviceIndices::Cuda(crate::ops::cuda::upload(rt, &self.host)?),
                _ => return Err(Error::Unsupported { op: "sparse indices on a device", device: t.device() }),
            }))
        };
        if let Some((dev, idx)) = self.device.get() {
            // Another device than the cached one: a copy for this use only.
            return if *dev == t.device() { Ok(idx.clone()) } else { upload() };
        }
        let idx = upload()?;
        Ok(self.device.get_or_init(|| (t.device(), idx)).1.clone())
    }
}

impl std::ops::Deref for SparseIndices {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.host
    }
}

impl From<Vec<u32>> for SparseIndices {
    fn from(host: Vec<u32>) -> Self {
        SparseIndices::new(host)
    }
}

impl FromIterator<u32> for SparseIndices {
    fn from_iter<I: IntoIterator<Item = u32>>(it: I) -> Self {
        SparseIndices::new(it.into_iter().collect())
    }
}

impl Clone for SparseIndices {
    /// The host indices (a clone lives on its own; its device copy is made when first needed).
    fn clone(&self) -> Self {
        SparseIndices::new(self.host.clone())
    }
}

impl PartialEq for SparseIndices {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host
    }
}

impl std::fmt::Debug for SparseIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.host).finish()
    }
}

/// Sizes: x `[m, k]`, dy and y `[m, n]`, W `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub struct SparseParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Checks that `indices` increase strictly and fall inside the `[n, k]` matrix.
pub fn check_indices(op: &'static str, indices: &[u32], n: usize, k: usize) -> Result<()> {
    if let Some(p) = indices.windows(2).position(|w| w[0] >= w[1]) {
        return Err(Error::InvalidArgument(format!("{op}: sparse indices must increase strictly (position {})", p + 1)));
    }
    if let Some(&last) = indices.last() {
        if last as usize >= n * k {
            return Err(Error::InvalidArgument(format!("{op}: sparse index {last} outside the [{n}, {k}] matrix")));
        }
    }
    Ok(())
}

#[allow(clippy::needless_range_loop)]
pub mod reference {
    use super::SparseParams;

    /// The dense `[n, k]` matrix `scatter(δ)`.
    pub fn scatter(indices: &[u32], delta: &[f64], p: SparseParams) -> Vec<f64> {
        let mut w = vec![0.0; p.n * p.k];
        for (&e, &d) in indices.iter().zip(delta) {
            w[e as usize] += d;
        }
        w
    }

    /// `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]`.
    pub fn sddmm(dy: &[f64], x: &[f64], indices: &[u32], p: SparseParams) -> Vec<f64> {
        indices
            .iter()
            .map(|&e| {
                let (n, k) = (e as usize / p.k, e as usize % p.k);
                (0..p.m).map(|m| dy[m * p.n + n] * x[m * p.k + k]).sum()
            })
            .collect()
    }
}

pub mod cpu {
    use rayon::prelude::*;

    use super::SparseParams;
    use crate::device::cpu::rows_per_task;
    use crate::kernels::matmul::cpu::transpose;

    /// (row, column) of each flat index, split once per call so the loops over tokens do no
    /// integer division.
    fn coords(indices: &[u32], k: usize) -> Vec<(u32, u32)> {
        indices.iter().map(|&e| (e / k as u32, e % k as u32)).collect()
    }

    /// Whether to fold δ into a copy of W (one copy of W, then the GEMM alone) rather than run
    /// the scalar SpMM beside the GEMM: the SpMM's M·nnz scattered multiply-adds cost more
    /// than copying the N·K weight once M·nnz passes about a quarter of N·K, which a training
    /// batch always does; decoding a token at a time (M = 1) at low density does not.
    pub fn fold_delta(p: SparseParams, nnz: usize) -> bool {
        4 * p.m * nnz > p.n * p.k
    }

    /// `W + scatter(δ)` as a new matrix.
    pub fn with_delta(w: &[f32], indices: &[u32], delta: &[f32]) -> Vec<f32> {
        let mut out = w.to_vec();
        for (&e, &d) in indices.iter().zip(delta) {
            out[e as usize] += d;
        }
        out
    }

    /// `y[m, n_e] += x[m, k_e]·δ_e`, rows of y in parallel.
    pub fn spmm_add(x: &[f32], indices: &[u32], delta: &[f32], y: &mut [f32], p: SparseParams) {
        let nk = coords(indices, p.k);
        let rows = rows_per_task(p.n.max(indices.len()));
        y.par_chunks_mut(rows * p.n).zip(x.par_chunks(rows * p.k)).for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(p.n).zip(xb.chunks(p.k)) {
                for (&(n, k), &d) in nk.iter().zip(delta) {
                    yr[n as usize] += xr[k as usize] * d;
                }
            }
        });
    }

    /// `dx[m, k_e] += dy[m, n_e]·δ_e`, rows of dx in parallel.
    pub fn spmm_t_add(dy: &[f32], indices: &[u32], delta: &[f32], dx: &mut [f32], p: SparseParams) {
        let nk = coords(indices, p.k);
        let rows = rows_per_task(p.k.max(indices.len()));
        dx.par_chunks_mut(rows * p.k).zip(dy.par_chunks(rows * p.n)).for_each(|(xb, yb)| {
            for (xr, yr) in xb.chunks_mut(p.k).zip(yb.chunks(p.n)) {
                for (&(n, k), &d) in nk.iter().zip(delta) {
                    xr[k as usize] += yr[n as usize] * d;
                }
            }
        });
    }

    /// Whether dδ is cheaper by the SDDMM than by the dense `dW = dyᵀ·x` and a gather: below
    /// 10% density. The SDDMM's cost grows with M·nnz, the GEMM's with M·N·K. Measured
    /// (`benches/kernels.rs`, sparse_ddelta, the AVX-512 machine, 2 cores, 1024 x 1024, medians
    /// in ms, SDDMM / dense at M 512 and 2048): 1% 0.81 / 2.57 and 4.07 / 9.73; 5% 1.87 / 2.42
    /// and 6.76 / 11.3; 8% 2.19 / 2.42 and 8.57 / 11.2; 10% 2.45 / 2.48 and 9.71 / 9.95. At 10%
    /// the two tie, and the SDDMM holds no dense `[N, K]` gradient. (Before its dot ran in the
    /// widest vectors the crossing was at 5–8%, the threshold then. The SDDMM's transposes got
    /// faster after these figures; the two routes were not measured again side by side.)
    pub fn sddmm_is_cheaper(p: SparseParams, nnz: usize) -> bool {
        10 * nnz < p.n * p.k
    }

    /// `dense[indices]`.
    pub fn gather(dense: &[f32], indices: &[u32]) -> Vec<f32> {
        indices.iter().map(|&e| dense[e as usize]).collect()
    }

    /// `dδ_e = Σ_m dy[m, n_e]·x[m, k_e]`: dy and x are transposed once, so each entry is a
    /// contiguous dot product over the M tokens.
    pub fn sddmm(dy: &[f32], x: &[f32], indices: &[u32], p: SparseParams) -> Vec<f32> {
        let dyt = transpose(dy, p.m, p.n);
        let xt = transpose(x, p.m, p.k);
        indices
            .par_iter()
            .with_min_len(256)
            .map(|&e| {
                let (n, k) = (e as usize / p.k, e as usize % p.k);
                crate::kernels::math::dot(&dyt[n * p.m..(n + 1) * p.m], &xt[k * p.m..(k + 1) * p.m])
            })
            .collect()
    }

}

/// The GPU kernels (`kernels-wgsl/sparse.wgsl`, `kernels-cuda/sparse.cu`): `apply` adds δ into
/// a copy of W in place, `gather` reads the dense gradient at the active entries. On a GPU the
/// op folds δ into W and runs the dense GEMMs (dδ gathered from `dW = dyᵀ·x`): an SDDMM reads
/// a column of dy and of x per entry, which at a training density of 1% moves about as many
/// bytes as the tensor-core GEMM does flops' worth of work, and the dense dW is what gradient
/// regrowth needs anyway.
pub mod wgsl {
    use crate::device::wgpu::{dispatch, grid, uniform, KernelCache, Precision};
    use crate::kernels::check_len;
    use crate::{Error, Result};

    pub const SOURCE: &str = wgsl_source!("sparse.wgsl");

    #[allow(clippy::too_many_arguments)]
    fn launch(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernels: &KernelCache,
        entry: &'static str,
        indices: &wgpu::Buffer,
        n: usize,
        dense: &wgpu::Buffer,
        len: usize,
        vals: &wgpu::Buffer,
        precision: Precision,
    ) -> Result<()> {
        check_len(entry, "indices", indices.size() as usize / 4, n)?;
        check_len(entry, "values", vals.size() as usize / 4, n)?;
        check_len(entry, "dense matrix", dense.size() as usize / precision.bytes(), len)?;
        let to_u32 = |v: usize, what: &str| u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{entry}: {what} ({v}) exceeds u32")));
        let (n32, len32) = (to_u32(n, "active entries")?, to_u32(len, "matrix size")?);
        if n == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline_as(device, entry, SOURCE, entry, precision)?;
        let u = uniform(device, &[n32, len32, 0, 0]);
        let (gx, gy) = grid(n32.div_ceil(256));
        dispatch(device, queue, &pipe, &[&u, indices, dense, vals], (gx, gy, 1));
        Ok(())
    }

    /// `w[indices[i]] += delta[i]` in place (w `len` elements in `precision`, δ f32; the indices
    /// distinct, checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, indices: &wgpu::Buffer, delta: &wgpu::Buffer, n: usize, w: &wgpu::Buffer, len: usize, precision: Precision) -> Result<()> {
        launch(device, queue, kernels, "sparse_apply", indices, n, w, len, delta, precision)
    }

    /// `out[i] = g[indices[i]]` as f32 (g `len` elements in `precision`).
    #[allow(clippy::too_many_arguments)]
    pub fn gather(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, indices: &wgpu::Buffer, n: usize, g: &wgpu::Buffer, len: usize, out: &wgpu::Buffer, precision: Precision) -> Result<()> {
        launch(device, queue, kernels, "sparse_gather", indices, n, g, len, out, precision)
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::{DType, Error, Result};

    fn suffix(op: &'static str, dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            DType::F16 => Ok("f16"),
            _ => Err(Error::UnsupportedDType { op, dtype }),
        }
    }

    fn config(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((n.div_ceil(256) as u32).min(65535 * 8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// `w[indices[i]] += delta[i]` in place, w a byte buffer of `len` elements of `dtype`
    /// (f32, bf16, f16), δ f32; the indices distinct (checked by the caller).
    pub fn apply(stream: &Arc<CudaStream>, modules: &ModuleCache, indices: &CudaView<'_, u32>, delta: &CudaView<'_, f32>, w: &mut CudaSlice<u8>, dtype: DType, len: usize) -> Result<()> {
        const OP: &str = "sparse_apply (cuda)";
        let n = indices.len();
        check_len(OP, "delta", delta.len(), n)?;
        check_len(OP, "w", w.len() / dtype.size_in_bytes().max(1), len)?;
        let f = modules.function("sparse", &format!("sparse_apply_{}", suffix(OP, dtype)?))?;
        if n == 0 {
            return Ok(());
        }
        let (n64, len64) = (n as i64, len as i64);
        // SAFETY: the kernel writes w at the indices below len (len elements of dtype checked
        // above) and reads n indices and n values; the argument types match its signature.
        unsafe { stream.launch_builder(&f).arg(w).arg(indices).arg(delta).arg(&n64).arg(&len64).launch(config(n)) }.map_err(|e| Error::cuda(format!("launching {OP}"), e))?;
        Ok(())
    }

    /// `out[i] = g[indices[i]]` as f32, g a byte buffer of `len` elements of `dtype`.
    pub fn gather(stream: &Arc<CudaStream>, modules: &ModuleCache, indices: &CudaView<'_, u32>, g: &CudaSlice<u8>, dtype: DType, len: usize, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
        const OP: &str = "sparse_gather (cuda)";
        let n = indices.len();
        check_len(OP, "out", out.len(), n)?;
        check_len(OP, "g", g.len() / dtype.size_in_bytes().max(1), len)?;
        let f = modules.function("sparse", &format!("sparse_gather_{}", suffix(OP, dtype)?))?;
        if n == 0 {
            return Ok(());
        }
        let (n64, len64) = (n as i64, len as i64);
        // SAFETY: the kernel reads g below len and n indices, and writes n f32s to out (all
        // checked above); the argument types match its signature.
        unsafe { stream.launch_builder(&f).arg(g).arg(indices).arg(out).arg(&n64).arg(&len64).launch(config(n)) }.map_err(|e| Error::cuda(format!("launching {OP}"), e))?;
        Ok(())
    }
}

/// Length checks shared by the op.
pub(crate) fn check(op: &'static str, x: usize, indices: &[u32], delta: usize, p: SparseParams) -> Result<()> {
    check_len(op, "x", x, p.m * p.k)?;
    if delta != indices.len() {
        return Err(Error::InvalidArgument(format!("{op}: {} sparse indices but {delta} values", indices.len())));
    }
    check_indices(op, indices, p.n, p.k)
}
