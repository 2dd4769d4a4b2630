//! Casts between f32, f16 and bf16 on one device against the CPU (the `half` crate's
//! conversions), bit for bit; shared by `tests/ops_devices.rs` and `tools/gpu-check`.

use crate::kernels::cast::cpu::widen;
use crate::testing::Rng;
use crate::{DType, Device, Tensor};

/// Source bit patterns of `dtype`: the edge cases of every conversion (signed zeros,
/// infinities, NaNs, f32 and f16 subnormals, the f16 overflow boundary 65504 / 65520, ties of
/// each rounding) and then random bit patterns, so every exponent is covered; `n` at least the
/// edge cases, odd lengths welcome.
pub fn cast_inputs(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    match dtype {
        DType::F32 => {
            let edges: [f32; 20] = [
                0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-45, -3e-39, 65504.0, 65519.996, 65520.0, -65520.0,
                5.960_464_5e-8, 2.980_232_2e-8, 2.980_233e-8, 6.103_515_6e-5, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 1.0 + 1.0 / 256.0, 3.4e38, 1.0,
            ];
            let mut v: Vec<f32> = edges.to_vec();
            v.extend((v.len()..n).map(|_| f32::from_bits(rng.next_u64() as u32)));
            bytemuck::cast_slice(&v).to_vec()
        }
        _ => {
            let edges: [u16; 10] = [0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x0001, 0x83ff, 0x7bff, 0x7f80, 0x3c01];
            let mut v: Vec<u16> = edges.to_vec();
            v.extend((v.len()..n).map(|_| rng.next_u64() as u16));
            bytemuck::cast_slice(&v).to_vec()
        }
    }
}

/// Every cast between two different float types of `n` elements on `dev` equals the CPU's bit
/// for bit (a NaN need only stay a NaN).
pub fn check_cast(dev: Device, n: usize, seed: u64) -> Result<(), String> {
    let types = [DType::F32, DType::F16, DType::BF16];
    for from in types {
        let src = cast_inputs(from, n, seed);
        let n = src.len() / from.size_in_bytes();
        let t = Tensor::from_bytes(&src, from, [n], &Device::Cpu).map_err(|e| e.to_string())?;
        let on_dev = t.to_device(&dev).map_err(|e| e.to_string())?;
        for to in types.into_iter().filter(|&t| t != from) {
            let want = widen(&t.to_dtype(to).and_then(|x| x.to_bytes()).map_err(|e| e.to_string())?, to);
            let got = on_dev.to_dtype(to).and_then(|x| x.to_bytes()).map_err(|e| format!("{from} -> {to} on {dev}: {e}"))?;
            let got = widen(&got, to);
            let input = widen(&src, from);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                if !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())) {
                    return Err(format!("{from} -> {to} on {dev}, element {i} of {n} (input {:e}): got {g:e} ({:#x}), want {w:e} ({:#x})", input[i], g.to_bits(), w.to_bits()));
                }
            }
            if got.len() != n {
                return Err(format!("{from} -> {to} on {dev}: {} elements, want {n}", got.len()));
            }
        }
    }
    Ok(())
}
