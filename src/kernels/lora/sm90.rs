//! Hopper's path for the LoRA GEMM family: `kernels-cuda/gemm_sm90.cu` (wgmma fed by TMA
//! through an mbarrier ring, a 128 × 256 block tile), taken by `cuda::gemm` on a compute
//! capability 9.0 device (H100, H200) for the big products: the base and fused LoRA forward
//! (B stored `[N, K]`), dX (B stored `[K, N]`), f32-accumulated outputs such as dW, and the
//! same with an NF4 W (QLoRA: the producer warpgroup dequantizes W's tile into the stage). What
//! it does not take stays on the mma.sync kernels of `lora_gemm.cu`: outputs of
//! fewer tiles than half the multiprocessors (the rank-R products, decoding), a second scaled
//! output (XA and s·XA), and operands whose rows are not 16-byte aligned (TMA's rule). A stored
//! `[K, M]` (dW = dYᵀ·X, `_km_kn`) it reads as stored, MN-major, as it reads B stored `[K, N]`.
//!
//! `device::cuda::hopper::set_mode` (or `TUNA_SM90` in the environment: `0` off, `force`)
//! picks the path for a process, `set_part(Part::Gemm, false)` (`TUNA_SM90_OFF=gemm`) turns the
//! GEMM path alone off: gpu-check runs the LoRA cases with the path forced onto every GEMM it can read
//! (small and ragged shapes included) and with it off, and times both kernels.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUtensorMap};
use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::cuda::{launch_err, to_i32, Gemm, GemmOut, Half};
use crate::device::cuda::hopper::{self, Mode, Part};
use crate::device::cuda::ModuleCache;
use crate::kernels::nf4::cuda::Nf4Device;
use crate::Result;

/// Block tile (rows, columns), K tile and threads of `gemm_sm90_*`; see gemm_sm90.cu.
pub(crate) const TILE: (usize, usize) = (128, 256);
const BK: usize = 64;
const THREADS: u32 = 384;
const STAGES: usize = 4;
/// Dynamic shared memory: the stages (A 128 × 64 and B 256 × 64, 16-bit) and 1 KiB so the
/// kernel can align stage 0 to the 1024 bytes the 128-byte swizzle repeats over.
const SMEM_BYTES: usize = STAGES * (TILE.0 + TILE.1) * BK * 2 + 1024;

static LAUNCHED: AtomicUsize = AtomicUsize::new(0);

/// GEMMs this process ran on the sm_90a kernels (so a test can tell the path was taken).
pub fn launched() -> usize {
    LAUNCHED.load(Ordering::Relaxed)
}

/// A CUtensorMap as a kernel argument (`const __grid_constant__ TensorMap`): 128 bytes, passed
/// by value.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(CUtensorMap);

// SAFETY: plain bytes; the kernel declares the parameter as a 128-byte, 64-byte-aligned struct.
unsafe impl DeviceRepr for TensorMap {}

/// One operand as TMA reads it: a row-major `[rows, cols]` matrix with row stride `ld`
/// elements, in boxes of `box_rows` × 64 elements, swizzled by 128 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Box2d {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub box_rows: u32,
}

impl Box2d {
    /// The cuTensorMapEncodeTiled arguments: (global dims innermost first, the row stride in
    /// bytes, box dims innermost first).
    fn encode_args(&self) -> ([u64; 2], [u64; 1], [u32; 2]) {
        ([self.cols as u64, self.rows as u64], [(self.ld * 2) as u64], [BK as u32, self.box_rows])
    }
}

/// The four operands' boxes of a GEMM `[m, n]` over k1 then k2 with row strides `ld` (A1, B1,
/// A2, B2): A `[m, k]` or (a_km) `[k, m]`, B `[n, k]` or (kn) `[k, n]`; A1, B1 again when k2 is
/// 0 (never read).
pub(crate) fn boxes((m, n, k1, k2): (usize, usize, usize, usize), (a_km, kn): (bool, bool), ld: [usize; 4]) -> [Box2d; 4] {
    let a = |k: usize, ld: usize| match a_km {
        false => Box2d { rows: m, cols: k, ld, box_rows: TILE.0 as u32 },
        true => Box2d { rows: k, cols: m, ld, box_rows: BK as u32 },
    };
    let b = |k: usize, ld: usize| match kn {
        false => Box2d { rows: n, cols: k, ld, box_rows: TILE.1 as u32 },
        true => Box2d { rows: k, cols: n, ld, box_rows: BK as u32 },
    };
    let (a1, b1) = (a(k1, ld[0]), b(k1, ld[1]));
    match k2 {
        0 => [a1, b1, a1, b1],
        k2 => [a1, b1, a(k2, ld[2]), b(k2, ld[3])],
    }
}

/// Whether a GEMM of these sizes is worth this kernel's 128 × 256 tiles on `sms`
/// multiprocessors: at least half of them get a block, and K spans a K tile.
pub(crate) fn big_enough(m: usize, n: usize, k1: usize, sms: usize) -> bool {
    let tiles = m.div_ceil(TILE.0) * n.div_ceil(TILE.1);
    m >= TILE.0 && n >= TILE.1 && k1 >= BK && 2 * tiles >= sms
}

fn aligned(ptr: u64, ld: usize) -> bool {
    ptr.is_multiple_of(16) && ld.is_multiple_of(8)
}

fn encode(ptr: u64, b: &Box2d, dt: Half) -> Option<TensorMap> {
    let (dims, strides, boxes) = b.encode_args();
    let elem_strides = [1u32, 1];
    let ty = match dt {
        Half::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        Half::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every array holds rank (2) or rank - 1 entries as the call requires; the address
    // is a live device allocation of at least (rows - 1)·ld + cols elements (checked by the
    // GEMM's callers), 16-byte aligned with a 16-byte multiple row stride (checked by `gemm`).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    // SAFETY: on success the driver filled the map.
    (r == sys::CUresult::CUDA_SUCCESS).then(|| TensorMap(unsafe { map.assume_init() }))
}

/// Whether the device and the mode send a GEMM of these sizes to this path (when its operands
/// allow).
fn wanted(modules: &ModuleCache, m: usize, n: usize, k1: usize) -> bool {
    let on = match hopper::mode_for(Part::Gemm) {
        Mode::Off => false,
        Mode::Auto => big_enough(m, n, k1, modules.multiprocessors()),
        Mode::Force => true,
    };
    on && modules.compute_capability() == 90
}

/// Runs the GEMM on `gemm_sm90_*` (`nf4_gemm_sm90_*` with W from `nf4`) when the device, the
/// mode, the operands and the sizes allow (see the module doc); Ok(false) when it is not taken,
/// so the caller runs the mma.sync kernel instead.
pub(crate) fn gemm(stream: &Arc<CudaStream>, modules: &ModuleCache, dt: Half, g: &Gemm, c: &mut GemmOut<'_, '_>, nf4: Option<&Nf4Device>) -> Result<bool> {
    if !wanted(modules, g.m, g.n, g.k1) || matches!(c, GemmOut::HalfScaled(..)) || g.b1.is_some() == nf4.is_some() || g.k1 == 0 {
        return Ok(false);
    }
    let (a1p, _a1g) = g.a1.0.device_ptr(stream);
    // B1: the dense weight, or none with NF4 (the producer dequantizes W; A1's map stands in).
    let b1 = g.b1.map(|(b, ld)| (b.device_ptr(stream), ld));
    let (a2p, _a2g) = g.a2.0.device_ptr(stream);
    let (b2p, _b2g) = g.b2.0.device_ptr(stream);
    let mut ops = vec![(a1p, g.a1.1)];
    if let Some(((p, _), ld)) = &b1 {
        ops.push((*p, *ld));
    }
    if g.k2 > 0 {
        ops.extend([(a2p, g.a2.1), (b2p, g.b2.1)]);
    }
    if !ops.iter().all(|&(p, ld)| aligned(p, ld)) {
        return Ok(false);
    }
    let layout = match (g.a_km, g.kn) {
        (true, _) => "_km_kn",
        (false, true) => "_kn",
        (false, false) => "",
    };
    let name = format!("{}gemm_sm90{layout}_{}", if nf4.is_some() { "nf4_" } else { "" }, dt.suffix());
    let i = |what: &str, v: usize| to_i32(&name, what, v);
    let (m, n, k1, k2) = (i("m", g.m)?, i("n", g.n)?, i("k1", g.k1)?, i("k2", g.k2)?);
    let ldb1 = b1.as_ref().map_or(g.a1.1, |b| b.1);
    let [ba1, bb1, ba2, bb2] = boxes((g.m, g.n, g.k1, g.k2), (g.a_km, g.kn), [g.a1.1, ldb1, g.a2.1, g.b2.1]);
    // cuTensorMapEncodeTiled only validates and packs: a refusal (a layout the TMA cannot
    // read) sends the GEMM to the mma.sync kernel, counted in `refused`.
    let refuse = || {
        hopper::note_refused();
        Ok(false)
    };
    let Some(ta1) = encode(a1p, &ba1, dt) else { return refuse() };
    let tb1 = match &b1 {
        Some(((p, _), _)) => match encode(*p, &bb1, dt) {
            Some(t) => t,
            None => return refuse(),
        },
        None => ta1,
    };
    let (ta2, tb2) = match g.k2 {
        0 => (ta1, tb1),
        _ => match (encode(a2p, &ba2, dt), encode(b2p, &bb2, dt)) {
            (Some(a), Some(b)) => (a, b),
            _ => return refuse(),
        },
    };
    let maps = [ta1, tb1, ta2, tb2];
    let f = modules.function_with_smem("gemm_sm90", &name, SMEM_BYTES);
    let f = match f {
        Ok(f) => f,
        // In Auto the mma.sync kernels stand in for the rest of the process (a driver that
        // cannot load sm_90a code); forced, the failure is the answer.
        Err(_) if hopper::mode_for(Part::Gemm) == Mode::Auto => {
            hopper::turn_off_after_failure(Part::Gemm);
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let tiles = g.m.div_ceil(TILE.0) * g.n.div_ceil(TILE.1);
    let cfg = LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
    let null = 0u64;
    let mut bld = stream.launch_builder(&f);
    for map in &maps {
        bld.arg(map);
    }
    match g.bias {
        Some(b) => bld.arg(b),
        None => bld.arg(&null),
    };
    let add_c = c.add_c();
    match c {
        GemmOut::Half(c) | GemmOut::HalfAdd(c) => bld.arg(&mut **c).arg(&null),
        GemmOut::F32(c) | GemmOut::AddF32(c) => bld.arg(&null).arg(&mut **c),
        GemmOut::HalfScaled(..) => unreachable!("declined above"),
    };
    bld.arg(&m).arg(&n).arg(&k1).arg(&k2).arg(&g.alpha).arg(&add_c);
    if let Some(q) = nf4 {
        q.push_args(&mut bld);
    }
    // SAFETY: argument order and types match gemm_sm90_*; the tensor maps address the operands
    // the caller checked against (m, n, k1, k2) and their row strides; c holds m·n elements.
    unsafe { bld.launch(cfg) }.map_err(launch_err(&name))?;
    LAUNCHED.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_enough_needs_a_full_tile_and_half_the_multiprocessors() {
        assert!(big_enough(8192, 4096, 4096, 132));
        assert!(!big_enough(8192, 16, 4096, 132), "N = R: the rank-R product");
        assert!(!big_enough(16, 4096, 4096, 132), "decoding");
        assert!(!big_enough(4096, 4096, 32, 132), "K under one tile");
        // 4 x 8 tiles = 32 blocks: under half of 132.
        assert!(!big_enough(512, 2048, 4096, 132));
        // 8 x 16 = 128 blocks: enough.
        assert!(big_enough(1024, 4096, 4096, 132));
    }

    #[test]
    fn boxes_follow_the_operand_layouts() {
        let ab = |rows, cols, ld, box_rows| Box2d { rows, cols, ld, box_rows };
        // Forward: X [300, 200], W [520, 200]; LoRA: s.XA [300, 16], B [520, 16].
        let fwd = boxes((300, 520, 200, 16), (false, false), [200, 200, 16, 16]);
        assert_eq!(fwd, [ab(300, 200, 200, 128), ab(520, 200, 200, 256), ab(300, 16, 16, 128), ab(520, 16, 16, 256)]);
        // dX: dY [300, 520] against W [520, 200] read as [K, N]; s.G [300, 16], A [16, 200].
        let dx = boxes((300, 200, 520, 16), (false, true), [520, 200, 16, 200]);
        assert_eq!(dx, [ab(300, 520, 520, 128), ab(520, 200, 200, 64), ab(300, 16, 16, 128), ab(16, 200, 200, 64)]);
        // No second phase: the first operands stand in.
        let plain = boxes((300, 520, 200, 0), (false, false), [200, 200, 0, 0]);
        assert_eq!(plain[2], plain[0]);
        assert_eq!(plain[3], plain[1]);
        // dW = dYᵀ·X over 700 tokens: dY [700, 520] read as [K, M], X [700, 200] as [K, N].
        let dw = boxes((520, 200, 700, 0), (true, true), [520, 200, 0, 0]);
        assert_eq!(dw[..2], [ab(700, 520, 520, 64), ab(700, 200, 200, 64)]);
    }

    #[test]
    fn encode_args_are_innermost_first_in_bytes() {
        let b = Box2d { rows: 300, cols: 200, ld: 264, box_rows: 128 };
        assert_eq!(b.encode_args(), ([200, 300], [528], [64, 128]));
    }
}
