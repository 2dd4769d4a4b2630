//! The wgpu runtime (Vulkan): one instance per process, a device per adapter created with the
//! adapter's own features and limits (lavapipe offers 32 KiB of workgroup memory where wgpu's
//! default is 16 KiB), a cache of compute pipelines keyed by kernel name, and a pool of storage
//! buffers so that an op's temporaries do not hit the allocator every call. Launches on a device
//! opened here are submitted in batches ([`batch`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use wgpu::util::DeviceExt;

use super::Device;
use crate::{Error, Result};

pub mod batch;
pub mod binds;
/// One dispatch, the buffers bound at their binding numbers ([`batch::dispatch`]).
pub use batch::dispatch as dispatch_bound;
pub use batch::{flush, is_batched, submit, submit_now, write_buffer, BATCH};

fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env()))
}

fn all_adapters() -> &'static [wgpu::Adapter] {
    static ADAPTERS: OnceLock<Vec<wgpu::Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        pollster::block_on(instance().enumerate_adapters(backends))
    })
}

/// What wgpu tells about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterDetails {
    pub name: String,
    pub backend: String,
    /// A CPU adapter (lavapipe, llvmpipe, SwiftShader).
    pub is_software: bool,
    pub shader_f16: bool,
    pub subgroups: bool,
}

/// Every adapter wgpu finds, in the order `Device::Wgpu(i)` numbers them.
pub fn adapter_details() -> Vec<AdapterDetails> {
    all_adapters()
        .iter()
        .map(|a| {
            let info = a.get_info();
            let f = a.features();
            AdapterDetails {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                is_software: info.device_type == wgpu::DeviceType::Cpu,
                shader_f16: f.contains(wgpu::Features::SHADER_F16),
                subgroups: f.contains(wgpu::Features::SUBGROUP),
            }
        })
        .collect()
}

/// One line per adapter: "name (backend)".
pub fn adapters() -> Vec<String> {
    adapter_details().into_iter().map(|a| format!("{} ({})", a.name, a.backend)).collect()
}

/// Compute pipelines of one wgpu device, keyed by kernel name. Public so a program with its own
/// wgpu device can call tuna's launchers.
pub struct KernelCache {
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
}

impl Default for KernelCache {
    fn default() -> Self {
        Self::new()
    }
}

impl KernelCache {
    pub fn new() -> Self {
        KernelCache { pipelines: Mutex::new(HashMap::new()) }
    }

    /// The pipeline for `entry` in `source`, cached under `name` (which must identify the source
    /// and entry point, e.g. `rmsnorm_fwd`). Shader errors come back as values.
    pub fn pipeline(
        &self,
        device: &wgpu::Device,
        name: &str,
        source: &str,
        entry: &str,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.lock().expect("kernel cache poisoned").get(name) {
            return Ok(p.clone());
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::wgpu(format!("creating pipeline `{name}`"), err));
        }
        let p = Arc::new(pipeline);
        self.pipelines.lock().expect("kernel cache poisoned").insert(name.to_string(), p.clone());
        Ok(p)
    }

    /// [`Self::pipeline`] for tensors stored in `precision`: with F16, the shader's `alias T`
    /// rewritten (`f16_variant`) and cached under `name::f16`. The adapter must have
    /// SHADER_F16 (`Precision::check`).
    pub fn pipeline_as(&self, device: &wgpu::Device, name: &str, source: &str, entry: &str, precision: Precision) -> Result<Arc<wgpu::ComputePipeline>> {
        match precision {
            Precision::F32 => self.pipeline(device, name, source, entry),
            Precision::F16 => {
                precision.check(device, name)?;
                let name = format!("{name}::f16");
                if let Some(p) = self.pipelines.lock().expect("kernel cache poisoned").get(&name) {
                    return Ok(p.clone());
                }
                self.pipeline(device, &name, &f16_variant(source, &["T"]), entry)
            }
        }
    }
}

/// Storage buffers kept for reuse, by size class (`size_class`: powers of two from 256 bytes), and the
/// bytes they account for.
#[derive(Default)]
struct Pool {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    /// Bytes of pool buffers handed out and not yet dropped, and their peak.
    live: AtomicU64,
    peak_live: AtomicU64,
    /// Bytes of every pool buffer that exists (handed out or kept for reuse), and their peak:
    /// the pool's device memory.
    held: AtomicU64,
    peak_held: AtomicU64,
}

impl Pool {
    fn add(now: &AtomicU64, peak: &AtomicU64, bytes: u64) {
        let v = now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        peak.fetch_max(v, Ordering::Relaxed);
    }
}

/// Device memory in tuna's storage-buffer pool (tensors and scratch; uniforms and a few small
/// kernel-private buffers are not counted), in bytes of whole size classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    /// In use now, and the most in use at once since the last `reset_peak_memory`.
    pub live: u64,
    pub peak_live: u64,
    /// Allocated from the device now (in use or kept for reuse), and its peak.
    pub held: u64,
    pub peak_held: u64,
}

/// Free buffers the pool keeps per size class: at least [`POOL_KEEP_PER_CLASS`], and small
/// classes up to [`POOL_KEEP_BYTES_PER_CLASS`] in all. A decoding step frees more than 8 small
/// tensors of one class at once (a layer's activations for one token); with 8 kept, the rest
/// were released and made again at the next token, each with new bind groups (16 buffers and
/// ~37 bind groups a token for the `llama-gqa` fixture).
const POOL_KEEP_PER_CLASS: usize = 8;
const POOL_KEEP_BYTES_PER_CLASS: u64 = 16 << 20;

fn pool_keeps(class: u64) -> usize {
    POOL_KEEP_PER_CLASS.max((POOL_KEEP_BYTES_PER_CLASS / class.max(1)) as usize)
}

/// A storage buffer from the pool; it goes back to the pool when dropped.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Weak<Pool>,
}

impl PooledBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buffer.take(), self.pool.upgrade()) {
            let size = buf.size();
            pool.live.fetch_sub(size, Ordering::Relaxed);
            let mut free = pool.free.lock().expect("pool poisoned");
            let class = free.entry(size).or_default();
            if class.len() < pool_keeps(size) {
                class.push(buf);
            } else {
                pool.held.fetch_sub(size, Ordering::Relaxed);
                drop(free);
                binds::forget(&buf);
            }
        }
    }
}

/// An open wgpu device: adapter, device, queue, kernel cache and buffer pool.
pub struct WgpuRuntime {
    pub index: usize,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub kernels: KernelCache,
    pool: Arc<Pool>,
    /// The most bytes one storage binding may span on this device (the adapter's
    /// `max_storage_buffer_binding_size`: 128 MiB on lavapipe, up to 4 GiB on desktop GPUs).
    max_binding: u64,
    /// The first validation error the device reported since the last check (a launch wgpu
    /// refused); reads and synchronizations return it instead of values computed without it.
    /// It belongs to the device, not to a thread: the next read on any thread reports it.
    errors: Arc<Mutex<Option<String>>>,
}

impl WgpuRuntime {
    fn open(index: usize) -> Result<Self> {
        let adapters = all_adapters();
        let adapter = adapters.get(index).cloned().ok_or_else(|| Error::DeviceUnavailable {
            device: Device::Wgpu(index),
            reason: if adapters.is_empty() {
                "wgpu found no adapter (is a Vulkan driver such as Mesa's lavapipe installed? \
                 Debian: apt-get install mesa-vulkan-drivers libvulkan1)"
                    .into()
            } else {
                format!("wgpu found {} adapter(s)", adapters.len())
            },
        })?;
        // The adapter's own features and limits, less experimental features (which need an
        // explicit opt-in token).
        let features = adapter.features() - wgpu::Features::all_experimental_mask();
        let desc = wgpu::DeviceDescriptor {
            label: Some("tuna"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::DeviceUnavailable { device: Device::Wgpu(index), reason: e.to_string() })?;
        // wgpu's default handler panics on a validation error; record it instead, so the next
        // read or synchronization returns it as an error.
        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let slot = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut first = slot.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(e.to_string());
            }
        }));
        let max_binding = device.limits().max_storage_buffer_binding_size;
        Ok(WgpuRuntime { index, adapter, device, queue, kernels: KernelCache::new(), pool: Arc::default(), max_binding, errors })
    }

    /// The device's first validation error since the last call, as an error naming `context`.
    fn take_error(&self, context: &str) -> Result<()> {
        take_error(self.index, &self.device, &self.errors, context)
    }

    /// The most bytes one tensor may take here: every kernel binds a tensor's buffer whole
    /// (the binding limit, in whole 256-byte steps like the pool's sizes).
    pub fn max_tensor_bytes(&self) -> u64 {
        self.max_binding & !255
    }

    /// An error naming `what` when a tensor of `bytes` bytes cannot be bound by a kernel here.
    pub fn check_tensor_bytes(&self, bytes: usize, what: &str) -> Result<()> {
        let max = self.max_tensor_bytes();
        if bytes as u64 > max {
            return Err(Error::InvalidArgument(format!(
                "{what}: {bytes} bytes in one tensor, but wgpu:{} ({}) binds at most {max} bytes per buffer (max_storage_buffer_binding_size); use a smaller model or another device",
                self.index,
                self.adapter.get_info().name,
            )));
        }
        Ok(())
    }

    pub fn has_f16(&self) -> bool {
        self.device.features().contains(wgpu::Features::SHADER_F16)
    }

    /// A storage buffer of at least `bytes` bytes (contents unspecified), from the pool.
    pub fn alloc(&self, bytes: usize) -> PooledBuffer {
        let class = size_class(bytes, self.max_binding);
        let reused = self.pool.free.lock().expect("pool poisoned").get_mut(&class).and_then(|v| v.pop());
        if let Some(buffer) = reused {
            Pool::add(&self.pool.live, &self.pool.peak_live, class);
            return PooledBuffer { buffer: Some(buffer), pool: Arc::downgrade(&self.pool) };
        }
        // A buffer the device cannot make (out of memory, or past its largest buffer) comes
        // back invalid: its error is recorded for the next read, and the buffer is never
        // pooled, so later allocations of its size are tried afresh.
        let invalid = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuna storage"),
            size: class,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let (oom, invalid) = (pollster::block_on(oom.pop()), pollster::block_on(invalid.pop()));
        if let Some(e) = oom.or(invalid) {
            // The launches that bind it will be refused: each goes alone (`batch`).
            batch::pause(&self.device);
            let mut first = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| format!("allocating {class} bytes: {e}"));
            return PooledBuffer { buffer: Some(buffer), pool: Weak::new() };
        }
        Pool::add(&self.pool.live, &self.pool.peak_live, class);
        Pool::add(&self.pool.held, &self.pool.peak_held, class);
        PooledBuffer { buffer: Some(buffer), pool: Arc::downgrade(&self.pool) }
    }

    /// The pool's memory now and at its peaks.
    pub fn memory(&self) -> MemoryStats {
        let p = &self.pool;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MemoryStats { live: get(&p.live), peak_live: get(&p.peak_live), held: get(&p.held), peak_held: get(&p.peak_held) }
    }

    /// Starts the peaks over from the present values.
    pub fn reset_peak_memory(&self) {
        let p = &self.pool;
        p.peak_live.store(p.live.load(Ordering::Relaxed), Ordering::Relaxed);
        p.peak_held.store(p.held.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// A zero-filled storage buffer.
    pub fn alloc_zeros(&self, bytes: usize) -> PooledBuffer {
        let buf = self.alloc(bytes);
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.clear_buffer(buf.buffer(), 0, None);
        submit(&self.device, &self.queue, enc);
        buf
    }

    pub fn upload(&self, bytes: &[u8]) -> PooledBuffer {
        let buf = self.alloc(bytes.len());
        // write_buffer needs a multiple of 4 bytes.
        if bytes.len().is_multiple_of(4) {
            write_buffer(&self.device, &self.queue, buf.buffer(), 0, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4), 0);
            write_buffer(&self.device, &self.queue, buf.buffer(), 0, &padded);
        }
        buf
    }

    /// Copies the first `bytes` bytes of a buffer back to the host (waits for the queue).
    pub fn download(&self, buf: &wgpu::Buffer, bytes: usize) -> Result<Vec<u8>> {
        let out = download(&self.device, &self.queue, buf, bytes)?;
        self.take_error("a read")?;
        Ok(out)
    }

    /// Starts copying the first `bytes` bytes of `buf` to the host ([`read_later`]).
    pub fn read_later(&self, buf: &wgpu::Buffer, bytes: usize) -> Result<PendingRead> {
        let mut p = read_later(&self.device, &self.queue, buf, bytes)?;
        p.errors = Some((self.index, self.errors.clone()));
        Ok(p)
    }

    /// A uniform buffer holding `params`.
    pub fn uniform<T: bytemuck::Pod>(&self, params: &T) -> wgpu::Buffer {
        uniform(&self.device, params)
    }

    pub fn synchronize(&self) -> Result<()> {
        flush(&self.device, &self.queue);
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::wgpu("device poll", e))?;
        self.take_error("a synchronization")
    }
}

/// The pool's size class for `bytes`: the next power of two (at least 256), except where that
/// would exceed what one binding may span while `bytes` does not (NVIDIA's Vulkan driver allows
/// 2^32 - 1): then `bytes` in 256-byte steps, so the buffer stays bindable. (A tensor within
/// 255 bytes of such a limit gets the limit rounded down to 256, which it then exceeds: the
/// upload's check refuses it against the same rounded limit.)
fn size_class(bytes: usize, max_binding: u64) -> u64 {
    let class = (bytes.max(256) as u64).next_power_of_two();
    if class > max_binding && bytes as u64 <= max_binding {
        (bytes as u64).next_multiple_of(256).min(max_binding & !255)
    } else {
        class
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_stay_bindable() {
        assert_eq!(size_class(0, 1 << 27), 256);
        assert_eq!(size_class(1000, 1 << 27), 1024);
        assert_eq!(size_class(1 << 27, 1 << 27), 1 << 27);
        // Past half of a limit that is no power of two: the exact size, not 4 GiB.
        let nvidia = u32::MAX as u64;
        assert_eq!(size_class(3_000_000_001, nvidia), 3_000_000_256);
        // Never past the limit rounded down to 256 bytes (a binding's size must be a multiple of 4).
        assert_eq!(size_class((u32::MAX - 300) as usize, nvidia), nvidia & !255);
        assert_eq!(size_class(u32::MAX as usize - 255, nvidia), nvidia & !255);
        assert_eq!(size_class(1 << 30, nvidia), 1 << 30);
        // A tensor over the limit keeps its class (the upload refuses it first).
        assert_eq!(size_class((1 << 27) + 1, 1 << 27), 1 << 28);
    }
}

/// Takes the first validation error recorded for device `index` (see `WgpuRuntime::errors`).
/// Reporting it ends the pause of the device's batch that the refusal began.
fn take_error(index: usize, device: &wgpu::Device, errors: &Mutex<Option<String>>, context: &str) -> Result<()> {
    let taken = errors.lock().unwrap_or_else(|p| p.into_inner()).take();
    match taken {
        Some(e) => {
            batch::resume(device);
            Err(Error::wgpu(format!("wgpu:{index} refused earlier work ({context} reports it)"), e))
        }
        None => Ok(()),
    }
}

/// Uniform buffers made so far, by device and contents (see [`uniform`]).
type UniformCache = HashMap<wgpu::Device, HashMap<Vec<u8>, wgpu::Buffer>>;
static UNIFORMS: std::sync::LazyLock<Mutex<UniformCache>> = std::sync::LazyLock::new(Mutex::default);
/// How many uniform buffers a device keeps before the cache starts over.
const UNIFORMS_KEPT: usize = 4096;

/// A uniform buffer holding `params`. A kernel's parameters repeat from step to step (the same
/// shapes), and shaders only read them, so one buffer serves every dispatch given the same
/// bytes on a device: made once, where each dispatch made one (a buffer, its staging copy and
/// their tracking in wgpu). A device's cache starts over when it holds `UNIFORMS_KEPT`
/// (decoding's lengths change with every token).
pub fn uniform<T: bytemuck::Pod>(device: &wgpu::Device, params: &T) -> wgpu::Buffer {
    let bytes = bytemuck::bytes_of(params);
    let mut cache = UNIFORMS.lock().unwrap_or_else(|p| p.into_inner());
    let mine = cache.entry(device.clone()).or_default();
    if let Some(buf) = mine.get(bytes) {
        return buf.clone();
    }
    if mine.len() >= UNIFORMS_KEPT {
        mine.clear();
    }
    let buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("tuna params"), contents: bytes, usage: wgpu::BufferUsages::UNIFORM });
    mine.insert(bytes.to_vec(), buf.clone());
    buf
}

/// Copies the first `bytes` bytes of `buf` (which needs COPY_SRC) to the host.
pub fn download(device: &wgpu::Device, queue: &wgpu::Queue, buf: &wgpu::Buffer, bytes: usize) -> Result<Vec<u8>> {
    if bytes == 0 {
        return Ok(Vec::new());
    }
    read_later(device, queue, buf, bytes)?.wait()
}

/// Submits a copy of the first `bytes` bytes of `buf` (which needs COPY_SRC) into a mappable
/// buffer, behind the work already recorded (which it submits too); [`PendingRead::wait`]
/// collects it. Work submitted afterwards (a kernel that overwrites `buf`, or a new tensor in
/// its pooled buffer) cannot change what it reads.
pub fn read_later(device: &wgpu::Device, queue: &wgpu::Queue, buf: &wgpu::Buffer, bytes: usize) -> Result<PendingRead> {
    let padded = bytes.next_multiple_of(4).max(4) as u64;
    if bytes > 0 && padded > buf.size() {
        return Err(Error::InvalidArgument(format!("wgpu read: {bytes} bytes (copied as {padded}) from a buffer of {}", buf.size())));
    }
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tuna readback"),
        size: padded,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    if bytes > 0 {
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, padded);
    }
    let submission = submit_now(device, queue, Some(enc));
    let (tx, mapped) = std::sync::mpsc::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    Ok(PendingRead { device: device.clone(), staging, bytes, submission, mapped, errors: None })
}

/// A copy to the host submitted by [`read_later`].
pub struct PendingRead {
    device: wgpu::Device,
    staging: wgpu::Buffer,
    bytes: usize,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    /// The runtime's record of refused work (set when the runtime started the read).
    errors: Option<(usize, Arc<Mutex<Option<String>>>)>,
}

impl PendingRead {
    /// Waits for the copy's submission (not for work submitted after it) and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(self.submission), timeout: None })
            .map_err(|e| Error::wgpu("device poll", e))?;
        self.mapped
            .recv()
            .map_err(|e| Error::wgpu("readback", e))?
            .map_err(|e| Error::wgpu("mapping a readback buffer", e))?;
        let view = self.staging.slice(..).get_mapped_range().map_err(|e| Error::wgpu("readback view", e))?;
        let out = view[..self.bytes].to_vec();
        drop(view);
        self.staging.unmap();
        if let Some((index, errors)) = &self.errors {
            take_error(*index, &self.device, errors, "a read")?;
        }
        Ok(out)
    }
}

/// Splits `groups` workgroups into an (x, y) grid within the 65535-per-dimension limit; kernels
/// recover the linear index as `y * num_workgroups.x + x` and skip indices past the end.
pub fn grid(groups: u32) -> (u32, u32) {
    const MAX: u32 = 65535;
    if groups <= MAX {
        (groups.max(1), 1)
    } else {
        (MAX, groups.div_ceil(MAX))
    }
}

/// Storage precision of a WGSL kernel's tensors (its arithmetic is f32 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// Needs the adapter's SHADER_F16 (`WgpuRuntime::has_f16`).
    F16,
}

impl Precision {
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }

    /// A clear error where `device` cannot run this precision.
    pub fn check(self, device: &wgpu::Device, op: &str) -> Result<()> {
        if self == Precision::F16 && !device.features().contains(wgpu::Features::SHADER_F16) {
            return Err(Error::InvalidArgument(format!("{op}: f16 needs an adapter with SHADER_F16, and this one has none")));
        }
        Ok(())
    }
}

/// A shader whose storage types are aliases (`alias T = f32;` as written) with some of them
/// rewritten to f16, and `enable f16;` prepended. Each alias must be declared in `source`.
pub fn f16_variant(source: &str, aliases: &[&str]) -> String {
    let mut s = source.to_string();
    for a in aliases {
        let decl = format!("alias {a} = f32;");
        debug_assert!(s.contains(&decl), "the shader declares no `{decl}`");
        s = s.replacen(&decl, &format!("alias {a} = f16;"), 1);
    }
    format!("enable f16;\n{s}")
}

/// Records one dispatch of `pipeline` into `enc`, each buffer bound at its binding number
/// (entry points may use only some of a shader's bindings). On a device tuna opened, the bind
/// group is kept for the next dispatch of the same pipeline and buffers ([`binds`]).
pub fn encode(
    device: &wgpu::Device,
    enc: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[(u32, &wgpu::Buffer)],
    workgroups: (u32, u32, u32),
) {
    record(enc, pipeline, &binds::bind_group(device, pipeline, buffers), workgroups);
}

/// Records one dispatch of `pipeline` with `group` into `enc`.
fn record(enc: &mut wgpu::CommandEncoder, pipeline: &wgpu::ComputePipeline, group: &wgpu::BindGroup, workgroups: (u32, u32, u32)) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, group, &[]);
    pass.dispatch_workgroups(workgroups.0, workgroups.1, workgroups.2);
}

/// [`dispatch_bound`] with `buffers[i]` at binding `i`.
pub fn dispatch(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[&wgpu::Buffer],
    workgroups: (u32, u32, u32),
) {
    let bound: Vec<(u32, &wgpu::Buffer)> = buffers.iter().enumerate().map(|(i, b)| (i as u32, *b)).collect();
    dispatch_bound(device, queue, pipeline, &bound, workgroups);
}

static RUNTIMES: OnceLock<Mutex<HashMap<usize, Arc<WgpuRuntime>>>> = OnceLock::new();

/// The runtime of wgpu adapter `index`, opened once per process.
pub fn runtime(index: usize) -> Result<Arc<WgpuRuntime>> {
    let mut map = RUNTIMES.get_or_init(Default::default).lock().expect("wgpu runtimes poisoned");
    if let Some(rt) = map.get(&index) {
        return Ok(rt.clone());
    }
    let rt = Arc::new(WgpuRuntime::open(index)?);
    batch::enable(&rt.device);
    map.insert(index, rt.clone());
    Ok(rt)
}

/// The runtime tuna opened for `device`, if it opened it.
fn runtime_of(device: &wgpu::Device) -> Option<Arc<WgpuRuntime>> {
    let map = RUNTIMES.get()?.lock().expect("wgpu runtimes poisoned");
    map.values().find(|rt| rt.device == *device).cloned()
}

/// A storage buffer of at least `bytes` bytes (at least 4; contents unspecified) for a
/// launcher's temporaries: from the pool where tuna opened `device`, so that a launch does not
/// make a buffer each call (an allocation, and wgpu's tracking until the work is done); on a
/// program's own device, a buffer of its own. The launch may drop it as soon as it has recorded
/// its dispatches: later work on the queue that reuses the buffer runs after them.
pub fn scratch(device: &wgpu::Device, bytes: usize) -> PooledBuffer {
    if let Some(rt) = runtime_of(device) {
        return rt.alloc(bytes);
    }
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("tuna scratch"),
        size: bytes.next_multiple_of(4).max(4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    PooledBuffer { buffer: Some(buffer), pool: Weak::new() }
}

/// [`scratch`] filled with zeros (a clear recorded behind the work before it).
pub fn scratch_zeros(device: &wgpu::Device, queue: &wgpu::Queue, bytes: usize) -> PooledBuffer {
    let buf = scratch(device, bytes);
    let mut enc = device.create_command_encoder(&Default::default());
    enc.clear_buffer(buf.buffer(), 0, None);
    submit(device, queue, enc);
    buf
}

/// Stand-in buffers for bindings an entry point declares but a launch does not use (an absent
/// optional input), 16 bytes each, made once per device. `slot` tells them apart where a launch
/// needs several: one buffer may not be bound both read-only and read-write in one dispatch.
pub fn stand_in(device: &wgpu::Device, slot: usize) -> wgpu::Buffer {
    type StandIns = HashMap<(wgpu::Device, usize), wgpu::Buffer>;
    static STAND_INS: std::sync::LazyLock<Mutex<StandIns>> = std::sync::LazyLock::new(Mutex::default);
    let mut all = STAND_INS.lock().unwrap_or_else(|p| p.into_inner());
    all.entry((device.clone(), slot))
        .or_insert_with(|| {
            device.create_buffer(&wgpu::BufferDescriptor { label: Some("tuna unused binding"), size: 16, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false })
        })
        .clone()
}
