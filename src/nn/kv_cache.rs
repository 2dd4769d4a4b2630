//! The KV cache of generation: each layer's keys and values of the positions seen so far,
//! grown by the new positions of each pass. With one sequence (B = 1, generation's case) they
//! are appended in place: into the vector on the CPU, into room kept past the cached rows of
//! the device buffer on GPUs (doubled when full), so a token costs a copy of its own rows, not
//! of the whole cache. Several sequences are concatenated into a new tensor.

use crate::tensor::{CpuStorage, Storage};
use crate::{Error, Result, Tensor};

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
        Some((pk, pv)) if appends_in_place(&pk, &k) && appends_in_place(&pv, &v) => {
            let old_rows = pk.dims()[1];
            let k = match append_in_place(pk, &k) {
                Ok(k) => k,
                Err((pk, e)) => {
                    *slot = Some((pk, pv));
                    return Err(e);
                }
            };
            match append_in_place(pv, &v) {
                Ok(v) => (k, v),
                Err((pv, e)) => {
                    // The keys' storage only gained rows past the old ones: the old keys are
                    // its first `old_rows` again.
                    let mut shape = k.dims().to_vec();
                    shape[1] = old_rows;
                    *slot = Some((k.share(shape.into(), None), pv));
                    return Err(e);
                }
            }
        }
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

/// Whether [`append_in_place`] takes `new` onto `cached`: both `[1, S, G, D]` of the same G, D,
/// dtype and device, the cache's storage held by nothing else (the attention that read it
/// last has let it go), and on the CPU both f32; on wgpu rows of whole 4-byte words (buffer
/// copies move words: with f16, G·D is even).
fn appends_in_place(cached: &Tensor, new: &Tensor) -> bool {
    let (cd, nd) = (cached.dims(), new.dims());
    let shapes = cd.len() == 4 && nd.len() == 4 && cd[0] == 1 && nd[0] == 1 && cd[2..] == nd[2..];
    let storage = match (cached.storage(), new.storage()) {
        (Storage::Cpu(CpuStorage::F32(_)), Storage::Cpu(CpuStorage::F32(_))) => true,
        (Storage::Cuda { .. }, Storage::Cuda { .. }) => true,
        (Storage::Wgpu { .. }, Storage::Wgpu { .. }) => (cd[2] * cd[3] * cached.dtype().size_in_bytes()).is_multiple_of(4),
        _ => false,
    };
    shapes && storage && cached.dtype() == new.dtype() && cached.device() == new.device() && cached.owns_storage()
}

/// `cached` `[1, S1, G, D]` with `new` `[1, S2, G, D]` appended along S in `cached`'s own
/// storage (see [`appends_in_place`]): on a GPU into the room past its rows, or, when that is
/// too small, into a new buffer with room for as many rows again. On an error `cached` comes
/// back as it was.
fn append_in_place(cached: Tensor, new: &Tensor) -> std::result::Result<Tensor, (Tensor, Error)> {
    let (dtype, device, old_shape) = (cached.dtype(), cached.device(), cached.shape().clone());
    let cd = old_shape.dims();
    let shape = vec![1, cd[1] + new.dims()[1], cd[2], cd[3]];
    let es = dtype.size_in_bytes();
    let (old, add) = (cached.elem_count() * es, new.elem_count() * es);
    let need = old + add;
    let storage = cached.try_into_storage().map_err(|t| (t, Error::InvalidArgument("kv cache: the cached keys are shared".into())))?;
    let back = |s: Storage, e: Error| (Tensor::from_storage(s, old_shape.clone(), dtype, device), e);
    let grown = match (storage, new.storage()) {
        (Storage::Cpu(CpuStorage::F32(mut v)), Storage::Cpu(CpuStorage::F32(n))) => {
            v.extend_from_slice(n);
            Storage::Cpu(CpuStorage::F32(v))
        }
        (Storage::Cuda { rt, buf }, Storage::Cuda { buf: nb, .. }) => {
            let mut buf = if need <= buf.len() {
                buf
            } else {
                // Room for as many rows again: a token's copy of the whole cache comes once per
                // doubling. Not zeroed: the rows are copied in, and nothing reads past them.
                let mut bigger = match rt.alloc_uninit(need.max(2 * old)) {
                    Ok(b) => b,
                    Err(e) => return Err(back(Storage::Cuda { rt, buf }, e)),
                };
                if old > 0 {
                    if let Err(e) = rt.stream.memcpy_dtod(&buf.slice(..old), &mut bigger.slice_mut(..old)) {
                        return Err(back(Storage::Cuda { rt, buf }, Error::cuda("kv cache copy", e)));
                    }
                }
                bigger
            };
            if add > 0 {
                if let Err(e) = rt.stream.memcpy_dtod(&nb.slice(..add), &mut buf.slice_mut(old..need)) {
                    // Only the room past the old rows was written.
                    return Err(back(Storage::Cuda { rt, buf }, Error::cuda("kv cache copy", e)));
                }
            }
            Storage::Cuda { rt, buf }
        }
        (Storage::Wgpu { rt, buf }, Storage::Wgpu { buf: nb, .. }) => {
            if let Err(e) = rt.check_tensor_bytes(need, &format!("kv cache ({dtype} {shape:?})")) {
                return Err(back(Storage::Wgpu { rt, buf }, e));
            }
            let mut enc = rt.device.create_command_encoder(&Default::default());
            let buf = if need as u64 <= buf.buffer().size() {
                buf
            } else {
                // As on CUDA; at most what one binding holds.
                let bigger = rt.alloc(need.max(2 * old).min(rt.max_tensor_bytes() as usize));
                enc.copy_buffer_to_buffer(buf.buffer(), 0, bigger.buffer(), 0, old as u64);
                bigger
            };
            enc.copy_buffer_to_buffer(nb.buffer(), 0, buf.buffer(), old as u64, add as u64);
            crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
            Storage::Wgpu { rt, buf }
        }
        (s, _) => return Err(back(s, Error::InvalidArgument("kv cache: new keys on another device or storage".into()))),
    };
    Ok(Tensor::from_storage(grown, shape.into(), dtype, device))
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
        crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
        return Ok(Tensor::from_storage(Storage::Wgpu { rt: rt.clone(), buf: out }, out_shape.into(), old.dtype(), old.device()));
    }
    if let (Storage::Cuda { rt, buf: ob }, Storage::Cuda { buf: nb, .. }) = (old.storage(), new.storage()) {
        if old.dtype() != new.dtype() {
            return Err(Error::DTypeMismatch { op: "kv cache", lhs: old.dtype(), rhs: new.dtype() });
        }
        // As on wgpu: batch row i of the output is [old row i | new row i], copied on the device.
        let es = old.dtype().size_in_bytes();
        // Not zeroed: the copies write every byte.
        let mut out = rt.alloc_uninit(es * (old.elem_count() + new.elem_count()))?;
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
    use crate::{DType, Device};

    /// The bytes a cache's storage has room for.
    fn room(t: &Tensor) -> usize {
        match t.storage() {
            Storage::Cpu(CpuStorage::F32(v)) => v.capacity() * 4,
            Storage::Cuda { buf, .. } => buf.len(),
            Storage::Wgpu { buf, .. } => buf.buffer().size() as usize,
            _ => unreachable!("an f32 or 16-bit cache"),
        }
    }

    /// One sequence's cache grows in place on every device, in f32 and in a 16-bit type: forty
    /// one-row appends to a 3-row prefix hold every row in order, the storage is made anew
    /// only when its room runs out (a few times, not forty), and a cache still read elsewhere
    /// is concatenated instead, the reader's tensor left as it was.
    #[test]
    fn one_sequence_grows_in_place_making_room_by_doubling() {
        for dev in Device::available().into_iter().map(|d| d.device) {
            let half = match dev {
                Device::Cpu => None,
                Device::Cuda(_) => Some(DType::BF16),
                Device::Wgpu(_) => Some(DType::F16),
            };
            for dtype in std::iter::once(DType::F32).chain(half) {
                let (g, d) = (2, 4);
                let rows = |r: std::ops::Range<usize>| {
                    let n = r.len();
                    let data: Vec<f32> = r.flat_map(|i| (0..g * d).map(move |j| (i * 100 + j) as f32)).collect();
                    Tensor::from_vec(data, [1, n, g, d]).unwrap().to_device(&dev).unwrap().to_dtype(dtype).unwrap()
                };
                let mut slot = None;
                extend(&mut slot, rows(0..3), rows(0..3)).unwrap();
                let mut rooms = Vec::new();
                for i in 3..43 {
                    let (k, v) = extend(&mut slot, rows(i..i + 1), rows(i..i + 1)).unwrap();
                    assert_eq!((k.dims(), v.dims()), (&[1, i + 1, g, d][..], &[1, i + 1, g, d][..]), "{dev} {dtype}");
                    rooms.push(room(&k));
                }
                let want = rows(0..43).to_vec_f32().unwrap();
                let (k, v) = slot.clone().unwrap();
                assert_eq!(k.to_vec_f32().unwrap(), want, "{dev} {dtype}: keys");
                assert_eq!(v.to_vec_f32().unwrap(), want, "{dev} {dtype}: values");
                rooms.dedup();
                assert!(rooms.len() <= 6, "{dev} {dtype}: the storage was made {} times over 40 appends", rooms.len());
                // `k` still held here: the next append must not write into its storage.
                let (k2, _) = extend(&mut slot, rows(43..44), rows(43..44)).unwrap();
                assert_eq!(k.to_vec_f32().unwrap(), want, "{dev} {dtype}: a held cache changed");
                assert_eq!(k2.to_vec_f32().unwrap(), rows(0..44).to_vec_f32().unwrap(), "{dev} {dtype}: after a concatenation");
            }
        }
    }

    /// Two sequences (B = 2) are concatenated row by row on every device: batch row i of the
    /// cache is its old rows, then its new ones (on CUDA into memory the copies must fill: the
    /// emulator starts it as NaN).
    #[test]
    fn two_sequences_are_concatenated_per_batch_row() {
        for dev in Device::available().into_iter().map(|d| d.device) {
            let (g, d) = (3, 4);
            // Position p of sequence b holds b·1000 + p·10 + j.
            let seq = |b: usize, r: std::ops::Range<usize>| r.flat_map(move |p| (0..g * d).map(move |j| (b * 1000 + p * 10 + j) as f32)).collect::<Vec<f32>>();
            let batch = |r: std::ops::Range<usize>| {
                let data = [seq(0, r.clone()), seq(1, r.clone())].concat();
                Tensor::from_vec(data, [2, r.len(), g, d]).unwrap().to_device(&dev).unwrap()
            };
            let mut slot = None;
            for r in [0..2, 2..5, 5..6] {
                extend(&mut slot, batch(r.clone()), batch(r)).unwrap();
            }
            let (k, v) = slot.unwrap();
            assert_eq!(k.dims(), &[2, 6, g, d], "{dev}");
            let want = [seq(0, 0..6), seq(1, 0..6)].concat();
            assert_eq!(k.to_vec_f32().unwrap(), want, "{dev}: keys");
            assert_eq!(v.to_vec_f32().unwrap(), want, "{dev}: values");
        }
    }

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
