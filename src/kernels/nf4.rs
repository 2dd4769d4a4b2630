//! NF4, the 4-bit NormalFloat of QLoRA (Dettmers et al., 2023), stored exactly as
//! bitsandbytes stores it (`quantize_4bit(quant_type="nf4", blocksize=64,
//! compress_statistics=True)`), so weights quantized here and there are interchangeable:
//!
//! - the flattened weight is cut into blocks of 64; each block keeps its absmax `a_b`;
//! - each element becomes the index of the nearest of the 16 `NF4` values to `x / a_b`
//!   (full blocks multiply by `1 / a_b`, a final partial block divides, as bitsandbytes does;
//!   a value exactly between two codes takes the lower one);
//! - two indices per byte, the first element in the high nibble;
//! - double quantization: `offset = mean(a)`, then `a - offset` is quantized in blocks of 256
//!   to 8-bit indices into bitsandbytes' signed dynamic map (`dynamic_map`), with one f32
//!   absmax per 256-block.
//!
//! Dequantization: `a_b = map[q_b] · absmax2[b / 256] + offset`, `w = NF4[code] · a_b` (f32).
//! Memory per weight: 4 bits + 8/64 + 32/(64·256) ≈ 4.127 bits.
//!
//! Tested byte for byte against bitsandbytes (`tools/fixtures/make_nf4_fixture.py`).

use crate::{Error, Result};

/// The 16 NF4 values (bitsandbytes' table), ascending. Written with the digits bitsandbytes
/// publishes (f64); rounded to f32 they are its f32 table exactly (tested).
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Weights per absmax.
pub const BLOCK: usize = 64;
/// Absmax values per second-level absmax.
pub const BLOCK2: usize = 256;

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for exponents
/// `e = 0..7`, the midpoints of `2^e + 1` evenly spaced points in [0.1, 1], scaled by
/// `10^(e - 6)`, with both signs; then 0 and 1; sorted. 127 + 127 + 2 = 256 values.
pub fn dynamic_map() -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for e in 0..7i32 {
        let n = (1usize << e) + 1;
        let scale = 10f32.powi(e - 6);
        let points: Vec<f32> = (0..n).map(|i| linspace_point(0.1, 1.0, n, i)).collect();
        for w in points.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            v.push(scale * mean);
            v.push(-(scale * mean));
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(f32::total_cmp);
    v.try_into().expect("256 values")
}

/// Point i of `torch.linspace(start, end, n)` in f32, computed as torch does: the step in f32,
/// then `start + step·i` for the first half and `end - step·(n-1-i)` for the second, each with
/// one rounding (the last bits differ from other orders).
fn linspace_point(start: f32, end: f32, n: usize, i: usize) -> f32 {
    let step = (end - start) / (n - 1) as f32;
    if i < n / 2 {
        step.mul_add(i as f32, start)
    } else {
        (-step).mul_add((n - 1 - i) as f32, end)
    }
}

/// An NF4-quantized tensor of `len` elements (bitsandbytes' layout and double quantization).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub len: usize,
    /// `ceil(len / 2)` bytes, two 4-bit indices each (first element in the high nibble).
    pub packed: Vec<u8>,
    /// One 8-bit index into `dynamic_map()` per block of 64.
    pub absmax: Vec<u8>,
    /// One f32 scale per 256 absmax values.
    pub absmax2: Vec<f32>,
    /// The mean absmax, subtracted before the 8-bit quantization.
    pub offset: f32,
}

impl Nf4Tensor {
    pub fn blocks(&self) -> usize {
        self.len.div_ceil(BLOCK)
    }

    /// Bytes held (packed codes, absmax indices, second-level scales, offset).
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.len() + 4 * self.absmax2.len() + 4
    }

    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.bytes() as f64 / self.len.max(1) as f64
    }

    /// Checks the parts' lengths against `len`, naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        let blocks = self.blocks();
        let want = [(self.packed.len(), self.len.div_ceil(2), "packed bytes"), (self.absmax.len(), blocks, "absmax values"), (self.absmax2.len(), blocks.div_ceil(BLOCK2), "second-level absmax values")];
        for (have, need, what) in want {
            if have != need {
                return Err(Error::InvalidArgument(format!("NF4 tensor of {} elements: {have} {what}, expected {need}", self.len)));
            }
        }
        Ok(())
    }
}

/// Index of the nearest code to `x`, given the midpoints of the sorted code (ties to the lower
/// index), as `torch.bucketize` over the midpoints does.
fn nearest(mids: &[f32], x: f32) -> usize {
    mids.partition_point(|&m| m < x)
}

fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Blockwise absmax quantization of `x` against a sorted `code`: returns (indices, absmax per
/// block). Full blocks scale by `1 / absmax`, a final partial block divides by it, values are
/// clamped to [-1, 1], and an all-zero block uses absmax 1e-38 to scale (it stores 0).
fn quantize_blocks(x: &[f32], code: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints(code);
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let a = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        let a = a.max(1e-38);
        let full = chunk.len() == block;
        let inv = 1.0 / a;
        q.extend(chunk.iter().map(|&v| {
            let s = if full { v * inv } else { v / a };
            nearest(&mids, s.clamp(-1.0, 1.0)) as u8
        }));
    }
    (q, absmax)
}

/// Double quantization of the 64-block absmax values: the NF4 tensor of `len` elements with
/// the packed codes `packed`.
fn double_quantize(len: usize, packed: Vec<u8>, absmax: &[f32]) -> Nf4Tensor {
    // bitsandbytes takes the mean in f32 with torch's summation; an f64 sum rounded to f32
    // agrees to the last bit or so, and the offset is stored, so dequantization is exact
    // either way.
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (q2, absmax2) = quantize_blocks(&centred, &dynamic_map(), BLOCK2);
    Nf4Tensor { len, packed, absmax: q2, absmax2, offset }
}

/// The per-block scales a device quantizer multiplies by: `1 / absmax` (1e-38 for an all-zero
/// block), as `quantize_blocks` computes them.
fn block_scales(absmax: &[f32]) -> Vec<f32> {
    absmax.iter().map(|a| 1.0 / a.max(1e-38)).collect()
}

/// The host's half of quantizing on a device (`wgsl::quantize`, `cuda::quantize`): the device
/// made every 64-block's absmax, then every element's code with the scale of `block_scales`
/// (a rounded f32 product compared with the midpoints: the CPU's arithmetic, so the same
/// bytes). Here: the codes of a final partial block, which the CPU divides by its absmax,
/// from its values `tail`; then the double quantization.
fn finish_device_quantize(len: usize, mut packed: Vec<u8>, absmax: &[f32], tail: &[f32]) -> Nf4Tensor {
    packed.truncate(len.div_ceil(2));
    let start = len - len % BLOCK;
    debug_assert_eq!(tail.len(), len - start);
    let (codes, _) = quantize_blocks(tail, &NF4, BLOCK);
    for (j, c) in codes.into_iter().enumerate() {
        let e = start + j;
        let byte = &mut packed[e / 2];
        *byte = if e.is_multiple_of(2) { (c << 4) | (*byte & 0xf) } else { (*byte & 0xf0) | c };
    }
    double_quantize(len, packed, absmax)
}

/// Quantizes a float tensor (flattened) where it lives: on the CPU by `cpu::quantize`, on a
/// GPU by the device passes (`wgsl::quantize`: f32 or f16; `cuda::quantize`: f32 or bf16),
/// which give the same bytes; only the absmax values and the result cross to the host.
pub fn quantize_tensor(t: &crate::Tensor) -> Result<Nf4Tensor> {
    use crate::tensor::Storage;
    use crate::DType;
    match (t.storage(), t.dtype()) {
        (Storage::Wgpu { rt, buf }, dt) => {
            let pr = crate::ops::gpu::wgpu_precision(dt).ok_or(Error::UnsupportedDType { op: "nf4 quantize (wgsl)", dtype: dt })?;
            wgsl::quantize(rt, buf.buffer(), t.elem_count(), pr)
        }
        (Storage::Cuda { rt, .. }, DType::F32) => cuda::quantize::<f32>(&rt.stream, &rt.modules, &crate::ops::cuda::view(t)),
        (Storage::Cuda { rt, .. }, DType::BF16) => cuda::quantize::<u16>(&rt.stream, &rt.modules, &crate::ops::cuda::view(t)),
        (Storage::Cuda { .. }, dt) => Err(Error::UnsupportedDType { op: "nf4 quantize (cuda)", dtype: dt }),
        // A CPU f32 tensor is read in place (no copy of the weight).
        (Storage::Cpu(_), DType::F32) => Ok(cpu::quantize(t.cpu_f32("nf4 quantize")?)),
        _ => Ok(cpu::quantize(&t.to_vec_f32()?)),
    }
}

pub mod cpu;

/// WGSL over wgpu's types: NF4 weights on the device and their dequantization
/// (`kernels-wgsl/nf4_gemm.wgsl`). The fused LoRA products with W in NF4 are `lora::wgsl`'s
/// with `lora::wgsl::Weight::Nf4`.
pub mod wgsl {
    use wgpu::util::DeviceExt;

    use super::{block_scales, dynamic_map, finish_device_quantize, midpoints, Nf4Tensor, BLOCK, NF4};
    use crate::device::wgpu::{dispatch_bound, grid, KernelCache, Precision, WgpuRuntime};
    use crate::kernels::lora::wgsl::{check_buffers, pass, to_u32, GemmUniform};
    use crate::Result;

    pub const SOURCE: &str = wgsl_source!("nf4_gemm.wgsl");

    /// An NF4 tensor on a wgpu device: the packed codes and absmax indices as bytes (padded to
    /// whole u32 words), the second-level scales, and the 256 dynamic-map values followed by the
    /// 16 NF4 values.
    pub struct Nf4Buffers {
        pub len: usize,
        pub packed: wgpu::Buffer,
        pub absmax: wgpu::Buffer,
        pub absmax2: wgpu::Buffer,
        pub tables: wgpu::Buffer,
        pub offset: f32,
    }

    fn storage(device: &wgpu::Device, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4).max(16), 0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: &padded, usage: wgpu::BufferUsages::STORAGE })
    }

    /// Uploads `q` (validated first).
    pub fn upload(device: &wgpu::Device, q: &Nf4Tensor) -> Result<Nf4Buffers> {
        q.validate()?;
        to_u32("nf4 upload", "length", q.len)?;
        let mut tables = dynamic_map().to_vec();
        tables.extend_from_slice(&NF4);
        Ok(Nf4Buffers {
            len: q.len,
            packed: storage(device, "nf4 packed", &q.packed),
            absmax: storage(device, "nf4 absmax", &q.absmax),
            absmax2: storage(device, "nf4 absmax2", bytemuck::cast_slice(&q.absmax2)),
            tables: storage(device, "nf4 tables", bytemuck::cast_slice(&tables)),
            offset: q.offset,
        })
    }

    pub const QUANT_SOURCE: &str = wgsl_source!("nf4_quant.wgsl");

    /// Quantizes the first `len` values of `x` (f32, or f16 with `Precision::F16`) to NF4 on the
    /// device, byte for byte as `cpu::quantize` (see `nf4_quant.wgsl` and
    /// `finish_device_quantize`).
    pub fn quantize(rt: &WgpuRuntime, x: &wgpu::Buffer, len: usize, precision: Precision) -> Result<Nf4Tensor> {
        const OP: &str = "nf4_quantize (wgsl)";
        precision.check(&rt.device, OP)?;
        let bytes = precision.bytes();
        crate::kernels::check_len(OP, "x", x.size() as usize / bytes, len)?;
        let len32 = to_u32(OP, "length", len)?;
        let (blocks, words) = (len.div_ceil(BLOCK), len.div_ceil(8));
        if len == 0 {
            return Ok(super::cpu::quantize(&[]));
        }
        static F16: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (source, suffix) = match precision {
            Precision::F32 => (QUANT_SOURCE, ""),
            Precision::F16 => (F16.get_or_init(|| crate::device::wgpu::f16_variant(QUANT_SOURCE, &["TX"])).as_str(), "::f16"),
        };
        let u = rt.uniform(&[len32, blocks as u32, 0u32, 0u32]);
        let absmax = rt.alloc(4 * blocks);
        let pipe = rt.kernels.pipeline(&rt.device, &format!("nf4_absmax{suffix}"), source, "nf4_absmax")?;
        let (gx, gy) = grid(to_u32(OP, "workgroups", blocks.div_ceil(256))?);
        dispatch_bound(&rt.device, &rt.queue, &pipe, &[(0, &u), (1, x), (2, absmax.buffer())], (gx, gy, 1));
        let a: Vec<f32> = bytemuck::pod_collect_to_vec(&rt.download(absmax.buffer(), 4 * blocks)?);
        let inv = rt.upload(bytemuck::cast_slice(&block_scales(&a)));
        let mids = rt.upload(bytemuck::cast_slice(&midpoints(&NF4)));
        let packed = rt.alloc(4 * words);
        let pipe = rt.kernels.pipeline(&rt.device, &format!("nf4_codes{suffix}"), source, "nf4_codes")?;
        let (gx, gy) = grid(to_u32(OP, "workgroups", words.div_ceil(256))?);
        dispatch_bound(&rt.device, &rt.queue, &pipe, &[(0, &u), (1, x), (3, inv.buffer()), (4, packed.buffer()), (5, mids.buffer())], (gx, gy, 1));
        let codes = rt.download(packed.buffer(), 4 * words)?;
        // The final partial block's values (copies move whole 4-byte words: start·bytes is a
        // multiple of 128, the length is rounded up inside the pooled buffer).
        let start = len - len % BLOCK;
        let tail = if start < len {
            let n = ((len - start) * bytes).next_multiple_of(4);
            let t = rt.alloc(n);
            let mut enc = rt.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(x, (start * bytes) as u64, t.buffer(), 0, n as u64);
            crate::device::wgpu::submit(&rt.device, &rt.queue, enc);
            let raw = rt.download(t.buffer(), n)?;
            match precision {
                Precision::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&raw)[..len - start].to_vec(),
                Precision::F16 => raw.chunks_exact(2).take(len - start).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect(),
            }
        } else {
            Vec::new()
        };
        Ok(finish_device_quantize(len, codes, &a, &tail))
    }

    pub(crate) fn weight_bindings(w: &Nf4Buffers) -> [(u32, &wgpu::Buffer); 4] {
        [(2, &w.packed), (3, &w.absmax), (4, &w.absmax2), (5, &w.tables)]
    }

    /// Writes the `w.len` dequantized values into `out`, exactly as `nf4::cpu::dequantize`.
    pub fn dequantize(device: &wgpu::Device, queue: &wgpu::Queue, kernels: &KernelCache, w: &Nf4Buffers, out: &wgpu::Buffer) -> Result<()> {
        check_buffers("nf4_dequant (wgsl)", &[("out", out, w.len)])?;
        let groups = w.len.div_ceil(256);
        let (gx, gy) = crate::device::wgpu::grid(to_u32("nf4_dequant (wgsl)", "workgroups", groups)?);
        if groups == 0 {
            return Ok(());
        }
        let u = GemmUniform { len: w.len as u32, offset: w.offset, ..Default::default() };
        let mut enc = device.create_command_encoder(&Default::default());
        let mut b = weight_bindings(w).to_vec();
        b.push((9, out));
        pass(device, kernels, &mut enc, ("nf4_gemm::nf4_dequant", SOURCE, "nf4_dequant"), &u, &b, (gx, gy))?;
        crate::device::wgpu::submit(device, queue, enc);
        Ok(())
    }
}

/// CUDA launchers (`kernels-cuda/lora_gemm.cu`): dequantization, and the fused LoRA products
/// of `lora::cuda` with W in NF4 (a GEMV kernel for M <= 16 in the forward).
#[allow(clippy::too_many_arguments)]
pub mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits};

    use super::{block_scales, dynamic_map, finish_device_quantize, midpoints, Nf4Tensor, BLOCK, NF4};
    use crate::device::cuda::ModuleCache;
    use crate::kernels::check_len;
    use crate::kernels::lora::cuda::launch_err;
    use crate::kernels::lora::LoraParams;
    use crate::{Error, Result};

    /// An NF4 tensor in device memory: packed codes, absmax indices, second-level scales, and
    /// the 256 dynamic-map values followed by the 16 NF4 values.
    pub struct Nf4Device {
        pub len: usize,
        pub packed: CudaSlice<u8>,
        pub absmax: CudaSlice<u8>,
        pub absmax2: CudaSlice<f32>,
        pub tables: CudaSlice<f32>,
        pub offset: f32,
    }

    impl Nf4Device {
        /// Copies `q` (validated first) to the device.
        pub fn upload(stream: &Arc<CudaStream>, q: &Nf4Tensor) -> Result<Self> {
            q.validate()?;
            let e = |e| Error::cuda("copying an NF4 tensor to the device", e);
            let mut tables = dynamic_map().to_vec();
            tables.extend_from_slice(&NF4);
            let nonempty = |v: &[u8]| if v.is_empty() { vec![0u8] } else { v.to_vec() };
            Ok(Nf4Device {
                len: q.len,
                packed: stream.clone_htod(&nonempty(&q.packed)).map_err(e)?,
                absmax: stream.clone_htod(&nonempty(&q.absmax)).map_err(e)?,
                absmax2: stream.clone_htod(&if q.absmax2.is_empty() { vec![0.0] } else { q.absmax2.clone() }).map_err(e)?,
                tables: stream.clone_htod(&tables).map_err(e)?,
                offset: q.offset,
            })
        }

        /// The kernels' trailing NF4 arguments: packed, absmax, absmax2, tables, offset.
        pub(crate) fn push_args<'a>(&'a self, b: &mut LaunchArgs<'a>) {
            b.arg(&self.packed).arg(&self.absmax).arg(&self.absmax2).arg(&self.tables).arg(&self.offset);
        }
    }

    /// Quantizes `x` (f32, or bf16 bits as `u16`) to NF4 on the device, byte for byte as
    /// `cpu::quantize`: `nf4_absmax_*`, then `nf4_codes_*` with the host's block scales (see
    /// `finish_device_quantize`).
    pub fn quantize<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod>(stream: &Arc<CudaStream>, modules: &ModuleCache, x: &CudaView<'_, T>) -> Result<Nf4Tensor> {
        const OP: &str = "nf4_quantize (cuda)";
        let len = x.len();
        let s = match std::mem::size_of::<T>() {
            4 => "f32",
            2 => "bf16",
            n => return Err(Error::InvalidArgument(format!("{OP}: no kernel for {n}-byte elements"))),
        };
        if len == 0 {
            return Ok(super::cpu::quantize(&[]));
        }
        let e = |what: &'static str| move |err| Error::cuda(format!("{OP}: {what}"), err);
        let (blocks, nbytes) = (len.div_ceil(BLOCK), len.div_ceil(2));
        let (len64, blocks64) = (len as i64, blocks as i64);
        let cfg = |n: usize| LaunchConfig { grid_dim: (n.div_ceil(256).min(65535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut absmax = stream.alloc_zeros::<f32>(blocks).map_err(e("allocating the absmax values"))?;
        let f = modules.function("lora_gemm", &format!("nf4_absmax_{s}"))?;
        // SAFETY: matches nf4_absmax_* (x, absmax, len, blocks); x holds len elements, absmax blocks.
        unsafe { stream.launch_builder(&f).arg(x).arg(&mut absmax).arg(&len64).arg(&blocks64).launch(cfg(blocks)) }.map_err(launch_err(OP))?;
        let a = stream.clone_dtoh(&absmax).map_err(e("reading the absmax values"))?;
        let inv = stream.clone_htod(&block_scales(&a)).map_err(e("copying the block scales"))?;
        let mids = stream.clone_htod(&midpoints(&NF4)).map_err(e("copying the midpoints"))?;
        let mut packed = stream.alloc_zeros::<u8>(nbytes).map_err(e("allocating the codes"))?;
        let f = modules.function("lora_gemm", &format!("nf4_codes_{s}"))?;
        // SAFETY: matches nf4_codes_* (x, inv, mids, packed, len); inv holds one scale per
        // block, mids 15 values, packed ceil(len/2) bytes.
        unsafe { stream.launch_builder(&f).arg(x).arg(&inv).arg(&mids).arg(&mut packed).arg(&len64).launch(cfg(nbytes)) }.map_err(launch_err(OP))?;
        let codes = stream.clone_dtoh(&packed).map_err(e("reading the codes"))?;
        let start = len - len % BLOCK;
        let tail: Vec<f32> = if start < len {
            let t: Vec<T> = stream.clone_dtoh(&x.slice(start..len)).map_err(e("reading the last block"))?;
            match s {
                "f32" => bytemuck::cast_slice::<T, f32>(&t).to_vec(),
                _ => bytemuck::cast_slice::<T, u16>(&t).iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
            }
        } else {
            Vec::new()
        };
        Ok(finish_device_quantize(len, codes, &a, &tail))
    }

    /// Writes the `q.len` dequantized values into `out` (f32), exactly as `nf4::cpu::dequantize`.
    pub fn dequantize(stream: &Arc<CudaStream>, modules: &ModuleCache, q: &Nf4Device, out: &mut CudaViewMut<'_, f32>) -> Result<()> {
        check_len("nf4_dequant (cuda)", "out", out.len(), q.len)?;
        if q.len == 0 {
            return Ok(());
        }
        let f = modules.function("lora_gemm", "nf4_dequant_f32")?;
        let len = q.len as i64;
        let blocks = q.len.div_ceil(256).min(65535) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = stream.launch_builder(&f);
        q.push_args(&mut b);
        b.arg(out).arg(&len);
        // SAFETY: arguments match `nf4_dequant_f32`; `out` holds `len` elements and the NF4
        // buffers were validated against `len` on upload.
        unsafe { b.launch(cfg) }.map_err(launch_err("nf4_dequant_f32"))?;
        Ok(())
    }

    pub(crate) fn check_weight(op: &'static str, w: &Nf4Device, p: LoraParams) -> Result<()> {
        if w.len != p.n * p.k {
            return Err(Error::InvalidArgument(format!("{op}: NF4 weight holds {} elements, needs N·K = {}", w.len, p.n * p.k)));
        }
        Ok(())
    }
}

