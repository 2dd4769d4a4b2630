//! Casts between f32, f16 and bf16 storage: round to nearest even, NaN stays a (quiet) NaN,
//! overflow to infinity — the `half` crate's conversions, which are the CPU path and the
//! reference (`cpu`). The GPU kernels (`kernels-wgsl/cast.wgsl`, `kernels-cuda/cast.cu`) give
//! the same bits for every non-NaN input.

use crate::{DType, Error, Result};

/// The kernels' code for a float storage type.
fn code(op: &'static str, dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        _ => Err(Error::UnsupportedDType { op, dtype }),
    }
}

pub mod cpu {
    use half::{bf16, f16};

    use crate::DType;

    /// Element `x` as f32 (exact for every float type).
    pub fn widen(bits: &[u8], from: DType) -> Vec<f32> {
        match from {
            DType::F16 => bits.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => bits.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => bytemuck::pod_collect_to_vec(bits),
        }
    }

    /// f32 values in `to`'s storage, little-endian bytes, rounded to nearest even.
    pub fn narrow(v: &[f32], to: DType) -> Vec<u8> {
        match to {
            DType::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            DType::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            _ => bytemuck::cast_slice(v).to_vec(),
        }
    }
}

pub mod wgsl {
    use super::code;
    use crate::device::wgpu::{dispatch, grid, uniform, KernelCache};
    use crate::kernels::check_len;
    use crate::{DType, Error, Result};

    pub const SOURCE: &str = wgsl_source!("cast.wgsl");

    /// Words a buffer of `n` elements of `dtype` spans (16-bit elements pack two to a word).
    fn words(n: usize, dtype: DType) -> usize {
        (n * dtype.size_in_bytes()).div_ceil(4)
    }

    /// `dst = src` converted from `from` to `to` (f32, f16, bf16), `n` elements. The last word
    /// of a 16-bit `dst` with odd `n` is written whole (its upper half zero).
    #[allow(clippy::too_many_arguments)]
    pub fn cast(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, src: &wgpu::Buffer, from: DType, dst: &wgpu::Buffer, to: DType, n: usize) -> Result<()> {
        const OP: &str = "cast (wgsl)";
        let (f, t) = (code(OP, from)?, code(OP, to)?);
        check_len(OP, "src", src.size() as usize / 4, words(n, from))?;
        check_len(OP, "dst", dst.size() as usize / 4, words(n, to))?;
        let n32 = u32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{OP}: {n} elements exceed u32")))?;
        if n == 0 {
            return Ok(());
        }
        let pipe = kernels.pipeline(device, "convert", SOURCE, "convert")?;
        let u = uniform(device, &[n32, f, t, 0]);
        let (gx, gy) = grid(n32.div_ceil(2).div_ceil(256));
        dispatch(device, queue, &pipe, &[&u, src, dst], (gx, gy, 1));
        Ok(())
    }
}

pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

    use super::code;
    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::{DType, Error, Result};

    fn name(dtype: DType) -> &'static str {
        match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    /// `dst = src` converted from `from` to `to` (f32, f16, bf16; different types), `n` elements,
    /// over byte buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn cast(stream: &Arc<CudaStream>, modules: &ModuleCache, src: &CudaSlice<u8>, from: DType, dst: &mut CudaSlice<u8>, to: DType, n: usize) -> Result<()> {
        const OP: &str = "cast (cuda)";
        code(OP, from)?;
        code(OP, to)?;
        if from == to {
            return Err(Error::InvalidArgument(format!("{OP}: from and to are both {from}")));
        }
        check_len(OP, "src", src.len() / from.size_in_bytes(), n)?;
        check_len(OP, "dst", dst.len() / to.size_in_bytes(), n)?;
        if n == 0 {
            return Ok(());
        }
        let f = modules.function("cast", &format!("cast_{}_{}", name(from), name(to)))?;
        let blocks = (n.div_ceil(256) as u32).min(65535 * 8);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let n = n as i64;
        // SAFETY: the kernel reads n elements of `from` from src and writes n of `to` to dst,
        // both checked above; the argument types match its signature (pointers, long).
        unsafe { stream.launch_builder(&f).arg(src).arg(dst).arg(&n).launch(cfg) }.map_err(|e| Error::cuda(format!("launching {OP}"), e))?;
        Ok(())
    }
}
