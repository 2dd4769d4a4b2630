//! The KV cache of generation: each layer's keys and values of the positions seen so far,
//! grown by the new positions of each pass (in place on the CPU, by a device copy on GPUs).

use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// Keys and values of earlier positions, per layer: `[B, S, G, D]` each.
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers], len: 0 }
    }
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One layer's keys and values `[B, T, G, D]` added to its cache slot; returns the slot's
/// keys and values after (the attention reads them). On an error the slot is as it was.
pub(super) fn extend(slot: &mut Option<(Tensor, Tensor)>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        None => (k, v),
        // One row on the CPU: the new keys and values go at the end of the cache's own
        // vectors, which grow by doubling (a token costs its own rows, not a copy of the whole
        // cache: 47 MB a token at 1024 positions of the SmolLM-135M shape).
        Some((pk, pv)) if appends_in_place(&pk, &k) && appends_in_place(&pv, &v) => (append_in_place(pk, &k)?, append_in_place(pv, &v)?),
        Some((pk, pv)) => match concat_seq(&pk, &k).and_then(|k| Ok((k, concat_seq(&pv, &v)?))) {
            Ok(kv) => kv,
            Err(e) => {
                *slot = Some((pk, pv));
                return Err(e);
            }
        },
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

/// Whether [`append_in_place`] takes `new` onto `cached`: both CPU f32 `[1, S, G, D]` of the
/// same G and D, and the cache's vector held by nothing else.
fn appends_in_place(cached: &Tensor, new: &Tensor) -> bool {
    let (cd, nd) = (cached.dims(), new.dims());
    cd.len() == 4 && nd.len() == 4 && cd[0] == 1 && nd[0] == 1 && cd[2..] == nd[2..] && new.dtype() == DType::F32 && new.device() == Device::Cpu && cached.owns_cpu_f32()
}

/// `cached` `[1, S1, G, D]` with `new` `[1, S2, G, D]` appended along S, in `cached`'s own
/// vector (see [`appends_in_place`]).
fn append_in_place(cached: Tensor, new: &Tensor) -> Result<Tensor> {
    let (cd, nd) = (cached.dims().to_vec(), new.dims());
    let shape = vec![1, cd[1] + nd[1], cd[2], cd[3]];
    let rows = new.cpu_f32("kv cache")?;
    let mut v = cached.try_into_cpu_f32().map_err(|_| Error::InvalidArgument("kv cache: the cached keys are shared".into()))?;
    v.extend_from_slice(rows);
    Tensor::from_vec(v, shape)
}

/// Concatenates `[B, S1, G, D]` and `[B, S2, G, D]` along S (CPU, not recorded: caches are for
/// inference).
fn concat_seq(old: &Tensor, new: &Tensor) -> Result<Tensor> {
    let (od, nd) = (old.dims(), new.dims());
    let (b, row) = (od[0], od[2] * od[3]);
    let out_shape = vec![b, od[1] + nd[1], od[2], od[3]];
    if let (Storage::Wgpu { rt, buf: ob }, Storage::Wgpu { buf: nb, .. }) = (old.storage(), new.storage()) {
        if old.dtype() != new.dtype() {
            return Err(Error::DTypeMismatch { op: "kv cache", lhs: old.dtype(), rhs: new.dtype() });
        }
        // Row by row on the device: batch row i is [old row i | new row i]. (Copies move whole
        // 4-byte words: with f16, a row of G·D elements is a whole number of them as D is even.)
        let es = old.dtype().size_in_bytes();
        let bytes = es * (old.elem_count() + new.elem_count());
        rt.check_tensor_bytes(bytes, &format!("kv cache ({} {out_shape:?})", old.dtype()))?;
        let out = rt.alloc(bytes);
        let (os, ns) = ((od[1] * row * es) as u64, (nd[1] * row * es) as u64);
        let mut enc = rt.device.create_command_encoder(&Default::default());
        for i in 0..b as u64 {
            enc.copy_buffer_to_buffer(ob.buffer(), i * os, out.buffer(), i * (os + ns), os);
            enc.copy_buffer_to_buffer(nb.buffer(), i * ns, out.buffer(), i * (os + ns) + os, ns);
        }
        rt.queue.submit([enc.finish()]);
        return Ok(Tensor::from_storage(Storage::Wgpu { rt: rt.clone(), buf: out }, out_shape.into(), old.dtype(), old.device()));
    }
    if let (Storage::Cuda { rt, buf: ob }, Storage::Cuda { buf: nb, .. }) = (old.storage(), new.storage()) {
        if old.dtype() != new.dtype() {
            return Err(Error::DTypeMismatch { op: "kv cache", lhs: old.dtype(), rhs: new.dtype() });
        }
        // As on wgpu: batch row i of the output is [old row i | new row i], copied on the device.
        let es = old.dtype().size_in_bytes();
        let mut out = rt.alloc_zeros(es * (old.elem_count() + new.elem_count()))?;
        let (os, ns) = (od[1] * row * es, nd[1] * row * es);
        for i in 0..b {
            let at = i * (os + ns);
            rt.stream.memcpy_dtod(&ob.slice(i * os..(i + 1) * os), &mut out.slice_mut(at..at + os)).map_err(|e| Error::cuda("kv cache copy", e))?;
            rt.stream.memcpy_dtod(&nb.slice(i * ns..(i + 1) * ns), &mut out.slice_mut(at + os..at + os + ns)).map_err(|e| Error::cuda("kv cache copy", e))?;
        }
        return Ok(Tensor::from_storage(Storage::Cuda { rt: rt.clone(), buf: out }, out_shape.into(), old.dtype(), old.device()));
    }
    let (a, n) = (old.cpu_f32("kv cache")?, new.cpu_f32("kv cache")?);
    let mut out = Vec::with_capacity(a.len() + n.len());
    for i in 0..b {
        out.extend_from_slice(&a[i * od[1] * row..(i + 1) * od[1] * row]);
        out.extend_from_slice(&n[i * nd[1] * row..(i + 1) * nd[1] * row]);
    }
    Tensor::from_vec(out, out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// A KV cache that would grow past one storage binding (lavapipe: 128 MiB) is refused by
    /// name when it grows, instead of by wgpu's validation at the next read.
    #[test]
    fn a_kv_cache_growing_past_the_binding_limit_is_refused_by_name() {
        let wgpu: Vec<Device> = Device::available().into_iter().map(|d| d.device).filter(|d| matches!(d, Device::Wgpu(_))).collect();
        if std::env::var("TUNA_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            assert!(!wgpu.is_empty(), "TUNA_REQUIRE_WGPU=1 but wgpu found no adapter");
        }
        for dev in wgpu {
            let Device::Wgpu(i) = dev else { unreachable!() };
            let limit = crate::device::wgpu::runtime(i).unwrap().max_tensor_bytes() as usize;
            // Only where two halves of the limit are small enough to make here.
            if limit > 256 << 20 {
                continue;
            }
            // Each half just over half the limit, so each binds and the two together do not.
            let rows = limit / (2 * 4096) + 1;
            let half = Tensor::zeros([1, rows, 1, 1024], DType::F32, &dev).unwrap();
            let err = concat_seq(&half, &half).unwrap_err().to_string();
            assert!(err.contains("kv cache (f32") && err.contains("max_storage_buffer_binding_size"), "{err}");
            // Within the limit the cache grows: [half | one row of ones].
            let row = Tensor::full(1.0, [1, 1, 1, 1024], &dev).unwrap();
            let grown = concat_seq(&half, &row).unwrap();
            assert_eq!(grown.dims(), &[1, rows + 1, 1, 1024]);
            assert_eq!(grown.to_vec_f32().unwrap()[rows * 1024..], vec![1.0; 1024][..]);
        }
    }
}
