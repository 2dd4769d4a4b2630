//! The CUDA runtime: a cudarc context and stream per device, and a module cache that loads the
//! PTX build.rs embedded (the highest arch not above the device's) or, when the crate was built
//! without nvcc, compiles the embedded source with NVRTC on first use.
//!
//! cudarc loads libcuda and libnvrtc at run time and *panics* when they are missing, so every
//! entry point here checks `is_culib_present` first and turns absence into an error value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, PinnedHostSlice};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::Device;
use crate::{Error, Result};

/// One `kernels-cuda/*.cu` file as build.rs embedded it.
#[derive(Debug)]
pub struct CudaModuleSource {
    /// File stem: `rmsnorm` for `kernels-cuda/rmsnorm.cu`.
    pub name: &'static str,
    /// The source with local `#include "x.cuh"` lines inlined, ready for NVRTC.
    pub source: &'static str,
    /// PTX compiled by nvcc at build time, as (compute capability * 10, text); empty when the
    /// crate was built without nvcc.
    pub ptx: &'static [(u32, &'static str)],
    /// Machine code ptxas made of that PTX, as (compute capability * 10, cubin), when the
    /// crate was built with TUNA_SASS=1; empty otherwise.
    pub sass: &'static [(u32, &'static [u8])],
    /// `Some(90)` for a module built for `sm_90a` alone (wgmma, TMA tensor copies: the file's
    /// first line is `// arch: sm_90a`): it loads only on a compute capability 9.0 device.
    pub only_cc: Option<u32>,
}

include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));

/// Every embedded CUDA module.
pub fn modules() -> &'static [CudaModuleSource] {
    CUDA_MODULES
}

/// Looks a module up by name.
pub fn module_source(name: &str) -> Result<&'static CudaModuleSource> {
    CUDA_MODULES.iter().find(|m| m.name == name).ok_or_else(|| Error::Cuda {
        context: format!("module `{name}`"),
        message: "no such file in kernels-cuda/".into(),
    })
}

/// Whether the CUDA driver library (libcuda) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (libnvrtc) can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of CUDA devices, or an error saying why there are none to count.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::DeviceUnavailable {
            device: Device::Cuda(0),
            reason: "the CUDA driver library (libcuda) was not found on this machine".into(),
        });
    }
    let n = CudaContext::device_count().map_err(|e| Error::cuda("cuDeviceGetCount", e))?;
    Ok(n.max(0) as usize)
}

/// The device's name as the driver reports it.
pub fn device_name(ordinal: usize) -> Result<String> {
    let rt = runtime(ordinal)?;
    let name = rt.ctx.name().map_err(|e| Error::cuda("cuDeviceGetName", e))?;
    let (major, minor) = rt.compute_capability;
    Ok(format!("{name} (sm_{major}{minor})"))
}

/// PTX for a module at a compute capability: the embedded PTX of the highest arch not above
/// `cc`, or NVRTC's output for `compute_<cc>` when nothing embedded fits.
pub fn ptx_for(module: &CudaModuleSource, cc: u32) -> Result<String> {
    check_target(module, cc)?;
    if let Some((_, ptx)) = module.ptx.iter().filter(|(arch, _)| *arch <= cc).max_by_key(|(a, _)| *a) {
        return Ok((*ptx).to_string());
    }
    compile_with_nvrtc(module, cc)
}

/// Embedded machine code a device of compute capability `cc` runs as it is: code for arch `a`
/// runs on `cc` of the same major version with `a <= cc` (sm_80 on an sm_86 or sm_89 GPU; sm_90
/// and sm_90a on 9.0 only). The newest such arch, or None (the driver then compiles the PTX).
pub fn sass_for(module: &CudaModuleSource, cc: u32) -> Option<&'static [u8]> {
    module.sass.iter().filter(|(a, _)| a / 10 == cc / 10 && *a <= cc).max_by_key(|(a, _)| *a).map(|(_, code)| *code)
}

/// A module built for one architecture alone cannot run anywhere else.
fn check_target(module: &CudaModuleSource, cc: u32) -> Result<()> {
    match module.only_cc {
        Some(only) if only != cc => Err(Error::Cuda {
            context: format!("module `{}`", module.name),
            message: format!("built for sm_{only}a alone; this device is compute capability {}.{}", cc / 10, cc % 10),
        }),
        _ => Ok(()),
    }
}

/// Compiles a module's embedded source with NVRTC for `compute_<cc>` (`compute_90a` for a
/// module tied to sm_90a). Needs libnvrtc but no GPU.
pub fn compile_with_nvrtc(module: &CudaModuleSource, cc: u32) -> Result<String> {
    check_target(module, cc)?;
    if !nvrtc_present() {
        return Err(Error::Cuda {
            context: format!("NVRTC compile of `{}`", module.name),
            message: "libnvrtc was not found (install the CUDA 13.0 NVRTC library or build with nvcc)".into(),
        });
    }
    let arch: &'static str = match cc {
        90 if module.only_cc == Some(90) => "compute_90a",
        c if c >= 120 => "compute_120",
        c if c >= 100 => "compute_100",
        c if c >= 90 => "compute_90",
        c if c >= 89 => "compute_89",
        c if c >= 86 => "compute_86",
        _ => "compute_80",
    };
    let opts = CompileOptions { arch: Some(arch), name: Some(format!("{}.cu", module.name)), ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.source, opts)
        .map_err(|e| Error::cuda(format!("NVRTC compile of `{}` for {arch}", module.name), e))?;
    Ok(ptx.to_src())
}

/// Loaded modules of one context, keyed by module name, and the kernels looked up in them.
/// Public so that a program with its own cudarc context can call tuna's launchers.
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    cc: u32,
    loaded: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels by (module, function): a launch costs a map lookup, not a driver call.
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    /// The dynamic shared memory each kernel was allowed so far (`function_with_smem`).
    smem_limits: Mutex<HashMap<(&'static str, String), usize>>,
    /// While profiling (`start_profile`): an event per kernel lookup on the default stream.
    profile: Mutex<Option<Vec<(String, CudaEvent)>>>,
    /// The device's multiprocessors (launchers size split-K grids by it).
    sms: usize,
    /// Split-K's tile counters, one buffer per stream that ran a split GEMM, zeroed once when
    /// made: the GEMM's last block of each tile leaves its counter at zero again. The stream
    /// is held beside its buffer, so its handle cannot be reused while the buffer lives.
    split_counters: Mutex<Vec<(Arc<CudaStream>, CudaSlice<u32>)>>,
}

/// One kernel's share of a profiled stretch of work (`ModuleCache::finish_profile`).
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// `module::function`.
    pub name: String,
    pub ms: f64,
    /// Lookups (launches, but for a kernel launched in a loop after one lookup).
    pub lookups: usize,
}

impl ModuleCache {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
        let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| Error::cuda("multiprocessor count", e))?;
        Ok(ModuleCache {
            sms: sms.max(1) as usize,
            ctx: ctx.clone(),
            cc: (major * 10 + minor) as u32,
            loaded: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            smem_limits: Mutex::new(HashMap::new()),
            profile: Mutex::new(None),
            split_counters: Mutex::new(Vec::new()),
        })
    }

    /// The device's compute capability times 10 (90 for an H100).
    pub fn compute_capability(&self) -> u32 {
        self.cc
    }

    /// The device's multiprocessor count.
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// Runs `launch` with split-K tile counters for `stream`: at least `n` u32s, all zero, that
    /// the launched kernel must leave zero. The lock is held through `launch`, and work on one
    /// stream runs in order, so no two kernels count on the same buffer at once; a kernel on
    /// another stream gets that stream's buffer. Replaces a memset before every split GEMM.
    pub(crate) fn with_split_counters<R>(&self, stream: &Arc<CudaStream>, n: usize, launch: impl FnOnce(&mut CudaSlice<u32>) -> Result<R>) -> Result<R> {
        let mut all = self.split_counters.lock().expect("split-K counters poisoned");
        let have = all.iter().position(|(s, _)| Arc::ptr_eq(s, stream));
        if have.is_none_or(|i| all[i].1.len() < n) {
            // At least two per multiprocessor: a GEMM splits only when its grid is smaller.
            let len = n.max(2 * self.sms);
            let fresh = stream.alloc_zeros::<u32>(len).map_err(|e| Error::cuda(format!("allocating {len} split-K tile counters"), e))?;
            match have {
                // The old buffer is freed in stream order, after the kernels that used it.
                Some(i) => all[i].1 = fresh,
                None => all.push((stream.clone(), fresh)),
            }
        }
        let i = have.unwrap_or(all.len() - 1);
        launch(&mut all[i].1)
    }

    /// `stream`'s split-K tile counters, read back (none if no split GEMM ran on it): all zero
    /// once its work is done, which the LoRA checks assert.
    pub(crate) fn read_split_counters(&self, stream: &Arc<CudaStream>) -> Result<Vec<u32>> {
        let all = self.split_counters.lock().expect("split-K counters poisoned");
        match all.iter().find(|(s, _)| Arc::ptr_eq(s, stream)) {
            Some((_, c)) => stream.clone_dtoh(c).map_err(|e| Error::cuda("reading split-K tile counters", e)),
            None => Ok(Vec::new()),
        }
    }

    /// Starts timing kernels: from now on every kernel lookup records an event on the
    /// context's default stream (the stream tuna's launchers use), so the time between two
    /// events is the kernel launched after the first, with any copies or memsets queued
    /// before the next. A kernel launched several times after one lookup (a loop) takes in
    /// the later launches; work queued by other means (cuBLAS, copies alone) counts toward
    /// the kernel before it, and so does time the GPU waits for the host (a read-back, a slow
    /// launch loop): compare the sum with the step's wall time. For finding where a step's time
    /// goes, not for benchmarks.
    pub fn start_profile(&self) {
        *self.profile.lock().expect("profile poisoned") = Some(Vec::new());
    }

    /// Stops timing: waits for the stream and returns each kernel's total time, largest first.
    pub fn finish_profile(&self) -> Result<Vec<KernelTime>> {
        let Some(mut marks) = self.profile.lock().expect("profile poisoned").take() else {
            return Err(Error::InvalidArgument("finish_profile without start_profile".into()));
        };
        marks.push(("end".into(), self.event()?));
        let mut totals: Vec<KernelTime> = Vec::new();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1).map_err(|e| Error::cuda("reading a profile event", e))? as f64;
            match totals.iter_mut().find(|t| t.name == w[0].0) {
                Some(t) => {
                    t.ms += ms;
                    t.lookups += 1;
                }
                None => totals.push(KernelTime { name: w[0].0.clone(), ms, lookups: 1 }),
            }
        }
        totals.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(totals)
    }

    fn event(&self) -> Result<CudaEvent> {
        self.ctx.default_stream().record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| Error::cuda("recording a profile event", e))
    }

    /// The kernel `function` of module `module`, loading (and if need be compiling) it once.
    pub fn function(&self, module: &'static str, function: &str) -> Result<CudaFunction> {
        if let Some(marks) = self.profile.lock().expect("profile poisoned").as_mut() {
            marks.push((format!("{module}::{function}"), self.event()?));
        }
        let key = (module, function.to_string());
        if let Some(f) = self.functions.lock().expect("function cache poisoned").get(&key) {
            return Ok(f.clone());
        }
        let m = {
            let mut loaded = self.loaded.lock().expect("module cache poisoned");
            match loaded.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = self.load(module_source(module)?)?;
                    loaded.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m.load_function(function).map_err(|e| Error::cuda(format!("kernel `{module}::{function}`"), e))?;
        // A thread that raced this one to the same kernel keeps its handle: one handle per
        // kernel, so a limit `function_with_smem` raised on it holds for every caller.
        Ok(self.functions.lock().expect("function cache poisoned").entry(key).or_insert(f).clone())
    }
}

impl ModuleCache {
    /// Loads a module: its embedded machine code for this device where there is some, else its
    /// PTX (compiled by the driver). Machine code the driver refuses (a driver older than the
    /// ptxas that made it, say) falls back to the PTX, and an error then names both failures.
    fn load(&self, src: &'static CudaModuleSource) -> Result<Arc<CudaModule>> {
        let sass_error = match sass_for(src, self.cc) {
            Some(code) => match self.ctx.load_module(Ptx::from_binary(code.to_vec())) {
                Ok(m) => return Ok(m),
                Err(e) => Some(e),
            },
            None => None,
        };
        let ptx = ptx_for(src, self.cc)?;
        self.ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
            let also = sass_error.map_or(String::new(), |s| format!(" (and its machine code for compute capability {}.{}: {s:?})", self.cc / 10, self.cc % 10));
            Error::Cuda { context: format!("loading module `{}` from PTX", src.name), message: format!("{e:?}{also}") }
        })
    }
}

impl ModuleCache {
    /// `function`, allowed `bytes` of dynamic shared memory: the driver's limit is raised past
    /// 48 KiB once per kernel, not at every launch.
    pub fn function_with_smem(&self, module: &'static str, function: &str, bytes: usize) -> Result<CudaFunction> {
        let f = self.function(module, function)?;
        let key = (module, function.to_string());
        let mut limits = self.smem_limits.lock().expect("shared memory limits poisoned");
        if limits.get(&key).is_none_or(|&have| have < bytes) {
            let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            let v = i32::try_from(bytes).map_err(|_| Error::InvalidArgument(format!("kernel `{module}::{function}`: {bytes} bytes of shared memory")))?;
            f.set_attribute(attr, v).map_err(|e| Error::cuda(format!("kernel `{module}::{function}`: raising the shared memory limit to {bytes} bytes"), e))?;
            limits.insert(key, bytes);
        }
        Ok(f)
    }
}

/// An open CUDA device: context, the stream tuna's ops run on, and the module cache.
pub struct CudaRuntime {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub modules: ModuleCache,
    pub compute_capability: (i32, i32),
    /// Page-locked buffers for `read_later`, kept for the next read of the same size (a
    /// training step reads the same few values every step).
    readback: Mutex<Vec<PinnedHostSlice<u8>>>,
}

impl CudaRuntime {
    fn open(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::DeviceUnavailable {
                device: Device::Cuda(ordinal),
                reason: format!("this machine has {count} CUDA device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda(format!("creating a context on cuda:{ordinal}"), e))?;
        let compute_capability = ctx.compute_capability().map_err(|e| Error::cuda("compute capability", e))?;
        let stream = ctx.default_stream();
        let modules = ModuleCache::new(&ctx)?;
        let rt = CudaRuntime { ordinal, ctx, stream, modules, compute_capability, readback: Mutex::new(Vec::new()) };
        // Best effort: a device without a stream-ordered pool allocates directly anyway.
        let _ = rt.keep_freed_memory();
        Ok(rt)
    }

    /// Lets the allocation pool keep freed memory across synchronizations (release threshold
    /// u64::MAX; the default, 0, hands it back to the driver at every synchronization, so each
    /// training step would map its activations afresh), as PyTorch's caching allocator does.
    /// `memory` counts memory in use, not what the pool keeps.
    fn keep_freed_memory(&self) -> Result<()> {
        let pool = self.mem_pool()?;
        let mut max = u64::MAX;
        // SAFETY: RELEASE_THRESHOLD is a 64-bit value.
        unsafe { cudarc::driver::sys::cuMemPoolSetAttribute(pool, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut max as *mut u64).cast()) }
            .result()
            .map_err(|e| Error::cuda("cuMemPoolSetAttribute", e))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::cuda("stream synchronize", e))
    }

    /// The device's default memory pool, which serves cudarc's stream-ordered allocations
    /// (`cuMemAllocAsync`, used where the device supports pools: every sm_80+ GPU).
    fn mem_pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool> {
        use cudarc::driver::sys;
        if !self.ctx.has_async_alloc() {
            return Err(Error::Cuda { context: "memory pool".into(), message: format!("cuda:{} has no stream-ordered allocator", self.ordinal) });
        }
        self.ctx.bind_to_thread().map_err(|e| Error::cuda("binding the context", e))?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: writes one pool handle for a valid device.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) }.result().map_err(|e| Error::cuda("cuDeviceGetDefaultMemPool", e))?;
        Ok(pool)
    }

    /// Bytes in use in the allocation pool now and at their peak since the last
    /// `reset_peak_memory` (the pool's `USED_MEM_CURRENT` / `USED_MEM_HIGH`): every tensor and
    /// scratch buffer tuna allocates, not the context or the loaded modules.
    pub fn memory(&self) -> Result<(u64, u64)> {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        let pool = self.mem_pool()?;
        let get = |attr: A| -> Result<u64> {
            let mut v = 0u64;
            // SAFETY: both attributes are 64-bit counters.
            unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }.result().map_err(|e| Error::cuda("cuMemPoolGetAttribute", e))?;
            Ok(v)
        };
        Ok((get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?, get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?))
    }

    /// Starts a new peak for `memory` (the pool's high-water mark back to 0).
    pub fn reset_peak_memory(&self) -> Result<()> {
        let pool = self.mem_pool()?;
        let mut zero = 0u64;
        // SAFETY: USED_MEM_HIGH may only be reset to 0, given as a 64-bit value.
        unsafe { cudarc::driver::sys::cuMemPoolSetAttribute(pool, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut zero as *mut u64).cast()) }
            .result()
            .map_err(|e| Error::cuda("cuMemPoolSetAttribute", e))?;
        Ok(())
    }

    /// Device memory for `bytes` bytes, not initialized: for outputs a kernel writes in full.
    pub fn alloc_uninit(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: device memory holds no Rust values; every bit pattern is a valid u8, and the
        // callers' kernels write every byte before it is read.
        unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| Error::cuda(format!("allocating {bytes} bytes"), e))
    }

    /// Device memory for `bytes` bytes, zeroed.
    pub fn alloc_zeros(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| Error::cuda(format!("allocating {bytes} bytes"), e))
    }

    pub fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.alloc_zeros(0);
        }
        self.stream.clone_htod(bytes).map_err(|e| Error::cuda(format!("copying {} bytes to cuda:{}", bytes.len(), self.ordinal), e))
    }

    pub fn download(&self, buf: &CudaSlice<u8>, bytes: usize) -> Result<Vec<u8>> {
        // The first `bytes` only (a buffer may hold more: a KV cache keeps room for later
        // rows); at least one byte, as an empty copy is not asked of the driver.
        let n = bytes.clamp(1, buf.len());
        let mut v = self.stream.clone_dtoh(&buf.slice(..n)).map_err(|e| Error::cuda(format!("copying from cuda:{}", self.ordinal), e))?;
        v.truncate(bytes);
        Ok(v)
    }

    /// Queues a copy of `src` to the host behind the work already on the stream, into
    /// page-locked memory, and returns without waiting; [`PendingRead::wait`] collects it. (A
    /// copy into pageable memory would hold the host until the stream drains.) Work queued
    /// afterwards cannot change what it reads.
    pub fn read_later(self: &Arc<Self>, src: &CudaView<u8>) -> Result<PendingRead> {
        let bytes = src.len();
        if bytes == 0 {
            return Ok(PendingRead { rt: self.clone(), host: None });
        }
        // cudarc copies as many bytes as the destination holds, so a buffer is reused only for
        // a read of exactly its size.
        let reused = {
            let mut pool = self.readback.lock().expect("readback pool poisoned");
            pool.iter().position(|b| b.len() == bytes).map(|i| pool.swap_remove(i))
        };
        let mut host = match reused {
            Some(h) => h,
            // SAFETY: the copy below writes every byte before `wait` reads any.
            None => unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(|e| Error::cuda(format!("allocating {bytes} page-locked bytes"), e))?,
        };
        let e = |what: &str| {
            let what = format!("{what} (cuda:{})", self.ordinal);
            move |err| Error::cuda(what, err)
        };
        // Our own event behind the copy: cudarc records the page-locked buffer's event only
        // when it manages several streams, and this runtime uses one.
        let queued = self.stream.memcpy_dtoh(src, &mut host).map_err(e("copying to the host")).and_then(|()| self.stream.record_event(None).map_err(e("recording a readback event")));
        match queued {
            Ok(done) => Ok(PendingRead { rt: self.clone(), host: Some((host, done)) }),
            Err(err) => {
                // No event to wait on: the buffer is freed only once the stream is idle.
                let _ = self.stream.synchronize();
                Err(err)
            }
        }
    }
}

/// A copy to the host queued by [`CudaRuntime::read_later`].
pub struct PendingRead {
    rt: Arc<CudaRuntime>,
    /// The page-locked buffer and the event recorded behind the copy into it.
    host: Option<(PinnedHostSlice<u8>, CudaEvent)>,
}

impl PendingRead {
    /// Waits for the copy (the event behind it, not the whole stream) and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        let Some((h, done)) = &self.host else { return Ok(Vec::new()) };
        let e = |err| Error::cuda(format!("reading back from cuda:{}", self.rt.ordinal), err);
        done.synchronize().map_err(e)?;
        Ok(h.as_slice().map_err(e)?.to_vec())
        // Drop hands the buffer back.
    }
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        // A step reads one loss per piece and its gradient norm; grad_accum x shards pieces
        // rarely reach this.
        const KEPT: usize = 64;
        if let Some((h, done)) = self.host.take() {
            let mut pool = self.rt.readback.lock().expect("readback pool poisoned");
            if pool.len() < KEPT {
                // A later copy into it comes after this one on the same stream.
                pool.push(h);
            } else {
                // Freed only once no copy is writing into it.
                let _ = done.synchronize();
                drop(h);
            }
        }
    }
}

/// The runtime of CUDA device `ordinal`, opened once per process.
pub fn runtime(ordinal: usize) -> Result<Arc<CudaRuntime>> {
    static RUNTIMES: OnceLock<Mutex<HashMap<usize, Arc<CudaRuntime>>>> = OnceLock::new();
    let mut map = RUNTIMES.get_or_init(Default::default).lock().expect("cuda runtimes poisoned");
    if let Some(rt) = map.get(&ordinal) {
        return Ok(rt.clone());
    }
    let rt = Arc::new(CudaRuntime::open(ordinal)?);
    map.insert(ordinal, rt.clone());
    Ok(rt)
}

/// The process-wide switch for the kernels built for sm_90a alone (`only_cc`): which work takes
/// them on an H100/H200, and what fell back from them.
pub mod hopper {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    /// Which work takes the sm_90a kernels on a compute capability 9.0 device: the GEMM path
    /// (`kernels::lora::sm90`) and the attention forward and backward
    /// (`kernels::attention::cuda::{FwdKernel, BwdKernel}::Auto`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Mode {
        /// None: every GEMM and attention forward runs on the mma.sync kernels.
        Off,
        /// The GEMMs big enough for their tiles (`lora::sm90::big_enough`) and the attention
        /// forward at its head dims; the default.
        Auto,
        /// Every dense GEMM whose operands TMA can read, whatever its size (for tests).
        Force,
    }

    /// The sm_90a kernels a run can turn off one at a time (a GPU run whose smoke test failed
    /// one of them keeps the other).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Part {
        /// `gemm_sm90.cu`: the dense and NF4 GEMMs.
        Gemm,
        /// `flash_attention_sm90.cu`: the attention forward.
        Attention,
        /// `flash_attention_sm90.cu`: the attention backward.
        AttentionBackward,
    }

    impl Part {
        pub const ALL: [Part; 3] = [Part::Gemm, Part::Attention, Part::AttentionBackward];

        /// Its name in `TUNA_SM90_OFF`.
        pub fn name(self) -> &'static str {
            match self {
                Part::Gemm => "gemm",
                Part::Attention => "attention",
                Part::AttentionBackward => "attention-bwd",
            }
        }

        fn bit(self) -> u8 {
            1 << self as u8
        }
    }

    static MODE: AtomicU8 = AtomicU8::new(0);
    /// Bit `1 << part` set: that part is off; bit 7: read from the environment.
    static PARTS_OFF: AtomicU8 = AtomicU8::new(0);
    static REFUSED: AtomicUsize = AtomicUsize::new(0);
    const PARTS_READ: u8 = 0x80;

    /// Sets the mode for this process.
    pub fn set_mode(mode: Mode) {
        MODE.store(mode as u8 + 1, Ordering::Relaxed);
    }

    /// The mode: as set, else from `TUNA_SM90` (`0` or `off`: Off; `force`: Force; else Auto).
    pub fn mode() -> Mode {
        match MODE.load(Ordering::Relaxed) {
            1 => Mode::Off,
            2 => Mode::Auto,
            3 => Mode::Force,
            _ => {
                let mode = match std::env::var("TUNA_SM90").as_deref() {
                    Ok("0") | Ok("off") => Mode::Off,
                    Ok("force") => Mode::Force,
                    _ => Mode::Auto,
                };
                set_mode(mode);
                mode
            }
        }
    }

    /// The parts turned off, as bits: those `TUNA_SM90_OFF` names, read once, then those
    /// `set_part` or a failure turned off.
    fn parts_off() -> u8 {
        let bits = PARTS_OFF.load(Ordering::Relaxed);
        if bits & PARTS_READ != 0 {
            return bits;
        }
        let env = parse_off(&std::env::var("TUNA_SM90_OFF").unwrap_or_default());
        PARTS_OFF.fetch_or(env | PARTS_READ, Ordering::Relaxed) | env | PARTS_READ
    }

    /// The bits of the parts a `TUNA_SM90_OFF` value names (comma-separated `gemm`, `attention`,
    /// `attention-bwd`; other words are ignored).
    fn parse_off(listed: &str) -> u8 {
        Part::ALL.iter().filter(|p| listed.split(',').any(|w| w.trim() == p.name())).fold(0, |b, p| b | p.bit())
    }

    /// The mode `part` runs in: Off when that part is turned off, else `mode()`.
    pub fn mode_for(part: Part) -> Mode {
        if parts_off() & part.bit() != 0 {
            Mode::Off
        } else {
            mode()
        }
    }

    /// Turns one part on or off for this process (the mode governs the parts that are on).
    pub fn set_part(part: Part, on: bool) {
        parts_off();
        if on {
            PARTS_OFF.fetch_and(!part.bit(), Ordering::Relaxed);
        } else {
            PARTS_OFF.fetch_or(part.bit(), Ordering::Relaxed);
        }
    }

    /// GEMMs (and attention forwards) this process sent back to the mma.sync kernels because the
    /// driver refused to describe an operand to the TMA (cuTensorMapEncodeTiled failed) or, in
    /// Auto, to load or configure an sm_90a kernel (that part is then off for the rest of the
    /// process): 0 on a healthy run.
    pub fn refused() -> usize {
        REFUSED.load(Ordering::Relaxed)
    }

    /// Counts one piece of work sent back to the mma.sync kernels (`refused`).
    pub(crate) fn note_refused() {
        REFUSED.fetch_add(1, Ordering::Relaxed);
    }

    /// In Auto, a kernel of `part` that failed to load or configure turns that part off for
    /// the process, counted in `refused`.
    pub(crate) fn turn_off_after_failure(part: Part) {
        set_part(part, false);
        note_refused();
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parts_turn_off_alone() {
            assert_eq!(parse_off(""), 0);
            assert_eq!(parse_off("gemm"), Part::Gemm.bit());
            assert_eq!(parse_off("attention, gemm"), Part::Gemm.bit() | Part::Attention.bit());
            assert_eq!(parse_off("attention-bwd"), Part::AttentionBackward.bit());
            assert_eq!(parse_off("gemmx,attn"), 0);
            // The process-wide switch: one part off leaves the other in the mode.
            set_part(Part::Gemm, false);
            assert_eq!(mode_for(Part::Gemm), Mode::Off);
            if std::env::var_os("TUNA_SM90_OFF").is_none() {
                assert_eq!(mode_for(Part::Attention), mode());
            }
            set_part(Part::Gemm, true);
            assert_eq!(mode_for(Part::Gemm), mode());
        }
    }
}
