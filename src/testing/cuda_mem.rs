//! Device buffers for the CUDA runs of the checks (`optim`, `lora`, `token_ops`): upload,
//! zeroed allocation, download, and the two parameter storages a check runs in.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::{Error, Result};

pub(crate) fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(what.to_string(), e)
}

/// `v` on the device (one zero element when `v` is empty: no zero-length allocation).
pub(crate) fn up<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        return zeros(s, 1);
    }
    s.clone_htod(v).map_err(err("copy to device"))
}

/// `n` zeroed elements (at least one).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(n.max(1)).map_err(err("alloc"))
}

/// The first `n` elements of `d` on the host.
pub(crate) fn down<T: DeviceRepr + Default + Clone>(s: &Arc<CudaStream>, d: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
    let mut v = s.clone_dtoh(d).map_err(err("copy to host"))?;
    v.truncate(n);
    Ok(v)
}

/// Storage of a check: f32, or bf16 bits.
pub(crate) trait Storage: DeviceRepr + ValidAsZeroBits + Default + Clone + Copy + Unpin {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Storage for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Storage for u16 {
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v).to_bits()
    }
    fn to_f32(self) -> f32 {
        half::bf16::from_bits(self).to_f32()
    }
}
