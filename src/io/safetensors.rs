//! Weights in safetensors files, memory-mapped: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. f32, bf16 and f16 tensors load as f32 (on the CPU; the
//! caller moves them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::io::read_json;
use crate::{DType, Device, Error, Result, Tensor};

/// The safetensors files of one model, and which file holds each tensor.
pub struct WeightFiles {
    /// What errors about the set as a whole name: the single file or the shard index.
    source: PathBuf,
    files: Vec<MappedFile>,
    location: HashMap<String, usize>,
}

/// One mapped file and its header, parsed once at open: a tensor's view is then a slice of the
/// map, with no header parsed again (parsing the whole header for each tensor took ~55 ms of a
/// 0.28 s load of SmolLM-135M's 273 tensors).
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Where the tensor data starts: after the 8-byte length and the header.
    data_start: usize,
    header: safetensors::tensor::Metadata,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors` or, failing that, the shards named by
    /// `dir/model.safetensors.index.json`. Every header is parsed here, so a truncated or
    /// corrupt file fails at open with its name.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (source, paths): (PathBuf, Vec<PathBuf>) = if single.exists() {
            (single.clone(), vec![single])
        } else if index.exists() {
            let json = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
            let mut shards: Vec<String> = map
                .values()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::file(&index, "`weight_map` values must be file names")))
                .collect::<Result<_>>()?;
            shards.sort();
            shards.dedup();
            (index.clone(), shards.into_iter().map(|s| dir.join(s)).collect())
        } else {
            return Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json in this folder"));
        };
        let mut w = Self::from_paths(&paths)?;
        w.source = source;
        Ok(w)
    }

    /// Opens the given safetensors files.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
            // SAFETY: the map is read-only; a file changed underneath us while mapped is the
            // usual caveat of memory-mapped model loading (as in every safetensors loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
            let (header_len, header) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::file(path, format!("not a valid safetensors file (truncated or corrupt header?): {e}")))?;
            for name in header.offset_keys() {
                location.insert(name, i);
            }
            files.push(MappedFile { path: path.clone(), mmap, data_start: 8 + header_len, header });
        }
        let source = paths.first().cloned().unwrap_or_default();
        Ok(WeightFiles { source, files, location })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.location.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    fn view(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let Some(&i) = self.location.get(name) else {
            return Err(Error::file(&self.source, format!("missing tensor `{name}`")));
        };
        let f = &self.files[i];
        let info = f.header.info(name).expect("the location map lists the header's names");
        let (start, end) = info.data_offsets;
        let data = &f.mmap[f.data_start + start..f.data_start + end];
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), data).map_err(|e| Error::file(&f.path, format!("tensor `{name}`: {e}")))?;
        Ok((&f.path, view))
    }

    /// Lets go of the mapped pages of `data` (a tensor's bytes, already copied) so that they
    /// leave this process's resident set: a model's file no longer sits in it beside its
    /// loaded weights (for an f32 file a second copy of every weight at the peak of a load).
    /// The pages stay in the page cache, and a later read of them maps them again.
    fn release(&self, data: &[u8]) {
        #[cfg(not(unix))]
        let _ = data;
        #[cfg(unix)]
        for MappedFile { mmap, .. } in &self.files {
            let base = mmap.as_ptr() as usize;
            let start = data.as_ptr() as usize;
            if start >= base && start + data.len() <= base + mmap.len() && !data.is_empty() {
                // SAFETY: the map is a read-only shared map of a file: MADV_DONTNEED only drops
                // the page-table entries, and any later read faults the same bytes back in from
                // the file. The range lies inside the map (checked above).
                let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start - base, data.len()) };
                return;
            }
        }
    }

    /// A `__metadata__` entry of the first file (e.g. the step a checkpoint file belongs to).
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.files.first()?.header.metadata().as_ref()?.get(key).cloned()
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let (path, v) = self.view(name)?;
        to_dtype(v.dtype()).ok_or_else(|| Error::file(path, format!("tensor `{name}`: unsupported dtype {:?}", v.dtype())))
    }

    /// The dtype every matrix (2-D tensor) of the files is stored in, when they share one
    /// (None when they differ, or there is none): a bf16 checkpoint's, for example.
    pub fn matrices_dtype(&self) -> Result<Option<DType>> {
        let mut shared = None;
        for name in self.names() {
            let (_, v) = self.view(name)?;
            if v.shape().len() != 2 {
                continue;
            }
            let d = self.dtype(name)?;
            if shared.replace(d).is_some_and(|s| s != d) {
                return Ok(None);
            }
        }
        Ok(shared)
    }

    /// Loads a float tensor as f32 on the CPU, checking its shape against `shape`.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (path, v) = self.shaped_view(name, shape)?;
        let data = v.data();
        let values: Vec<f32> = match v.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec(data),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(unsupported_float(path, name, other)),
        };
        self.release(data);
        Tensor::from_vec(values, shape.to_vec())
    }

    /// Loads a float tensor as bf16 on the CPU (exact from bf16, rounded to nearest even from
    /// f32 or f16), checking its shape against `shape`. No f32 copy of it is made.
    pub fn load_bf16(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use half::bf16;
        let (path, v) = self.shaped_view(name, shape)?;
        let data = v.data();
        let values: Vec<bf16> = match v.dtype() {
            Dtype::BF16 => bytemuck::pod_collect_to_vec(data),
            Dtype::F32 => data.chunks_exact(4).map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| bf16::from_f32(half::f16::from_le_bytes([b[0], b[1]]).to_f32())).collect(),
            other => return Err(unsupported_float(path, name, other)),
        };
        self.release(data);
        let storage = crate::tensor::Storage::Cpu(crate::tensor::CpuStorage::BF16(values));
        Ok(Tensor::from_storage(storage, shape.to_vec().into(), DType::BF16, Device::Cpu))
    }

    /// A tensor's view, checked to have `shape`.
    fn shaped_view(&self, name: &str, shape: &[usize]) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let (path, v) = self.view(name)?;
        if v.shape() != shape {
            return Err(Error::file(path, format!("tensor `{name}` has shape {:?}, expected {shape:?}", v.shape())));
        }
        Ok((path, v))
    }

    /// Loads a tensor as stored (any supported dtype) on `device`, with whatever shape it has.
    pub fn load_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (path, v) = self.view(name)?;
        let dtype = to_dtype(v.dtype()).ok_or_else(|| Error::file(path, format!("tensor `{name}`: unsupported dtype {:?}", v.dtype())))?;
        let t = Tensor::from_bytes(v.data(), dtype, v.shape().to_vec(), device)?;
        self.release(v.data());
        Ok(t)
    }
}

fn unsupported_float(path: &Path, name: &str, dtype: Dtype) -> Error {
    Error::file(path, format!("tensor `{name}`: dtype {dtype:?} is not supported (f32, bf16, f16 are)"))
}

fn to_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::U8 => DType::U8,
        Dtype::I32 => DType::I32,
        _ => return None,
    })
}

/// Writes `tensors` to `path` as a safetensors file, each in its dtype, through a temporary
/// file renamed into place (an existing file is never left half-written).
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    write(path, tensors, None, metadata)
}

/// [`save`] with every float tensor written in `dtype` (rounded to nearest even, as
/// `Tensor::to_dtype` does); integer tensors keep theirs.
pub fn save_in(path: &Path, tensors: &[(String, Tensor)], dtype: DType, metadata: Option<HashMap<String, String>>) -> Result<()> {
    if !dtype.is_float() {
        return Err(Error::file(path, format!("cannot write tensors in {dtype} (f32, bf16 or f16 can be)")));
    }
    write(path, tensors, Some(dtype), metadata)
}

/// The writer's view of one tensor. Its bytes are read as the file is written, one tensor at a
/// time: a CPU tensor in its own dtype from where it lies (no copy of a model beside it),
/// anything else (a cast, a device tensor's download) made then and dropped once written. An
/// error there is kept in `failed` (the crate's `View` cannot return one) and zeros stand in,
/// so that the caller can report it and drop the temporary file.
struct Entry<'a> {
    /// The file and the tensor's name, for the error.
    path: &'a Path,
    name: &'a str,
    tensor: &'a Tensor,
    dtype: DType,
    file_dtype: Dtype,
    failed: &'a std::cell::RefCell<Option<Error>>,
}

impl safetensors::View for &Entry<'_> {
    fn dtype(&self) -> Dtype {
        self.file_dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.dtype == self.tensor.dtype() {
            if let Some(b) = self.tensor.cpu_bytes() {
                return std::borrow::Cow::Borrowed(b);
            }
        }
        match self.tensor.to_dtype(self.dtype).and_then(|t| t.to_bytes()) {
            Ok(b) => std::borrow::Cow::Owned(b),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert_with(|| Error::file(self.path, format!("tensor `{}`: {e}", self.name)));
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.elem_count() * self.dtype.size_in_bytes()
    }
}

fn write(path: &Path, tensors: &[(String, Tensor)], cast: Option<DType>, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let failed = std::cell::RefCell::new(None);
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = match cast {
            Some(d) if t.dtype().is_float() => d,
            _ => t.dtype(),
        };
        let file_dtype = match dtype {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            DType::U8 => Dtype::U8,
            DType::I32 => Dtype::I32,
            DType::NF4 => return Err(Error::file(path, format!("tensor `{name}` is NF4-quantized; safetensors files here hold dequantized weights (merge into an f32/bf16 base instead)"))),
        };
        entries.push((name.as_str(), Entry { path, name, tensor: t, dtype, file_dtype, failed: &failed }));
    }
    let tmp = path.with_extension("safetensors.tmp");
    // The crate writes through a private temporary file (mode 0600) of its own; the file gets
    // the permissions a plain create gives here (the umask's), as other writers' files do.
    let permissions = std::fs::File::create(&tmp).and_then(|f| f.metadata()).map(|m| m.permissions()).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let written = safetensors::serialize_to_file(entries.iter().map(|(n, e)| (*n, e)), metadata, &tmp)
        .map_err(|e| Error::file(&tmp, format!("cannot write: {e}")))
        .and_then(|_| std::fs::set_permissions(&tmp, permissions).map_err(|e| Error::file(&tmp, format!("cannot set permissions: {e}"))));
    if let Some(e) = failed.into_inner() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, format!("cannot rename into place: {e}")))
}
