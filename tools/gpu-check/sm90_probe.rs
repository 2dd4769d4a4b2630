//! An exact probe of Hopper's GEMM path, for reading a layout bug off the first failed run:
//! `C = A·op(B)` with A an identity (`[M, K]`, ones on the diagonal) and B small distinct
//! integers (exact in bf16, and the sums of one product each exact in f32), so C must equal B
//! (or its transpose) bit for bit: `C[m, n] = B[n, m]` for B stored `[N, K]`, `B[m, n]` for B
//! stored `[K, N]`, and 0 for the rows m ≥ K. A mismatch names its (row, column) and the B
//! position the wrong value came from, which points at a swizzle, descriptor or fragment error.
//! Sizes are ragged (M 200, N 296, K 136; rows 16-byte aligned, as the path needs) so the TMA's
//! zero fill and the epilogue's bounds are in it too. The caller forces the path
//! (`device::cuda::hopper::Mode::Force`); the probe fails if the GEMM did not take it.

use half::bf16;
use tuna::device::cuda::CudaRuntime;
use tuna::kernels::lora::cuda::{self, GemmOut, Half};

/// B's value at flat index i: distinct modulo 251, at most 250 (exact in bf16).
fn pattern(i: usize) -> f32 {
    (i % 251) as f32
}

/// Runs the probe with B stored `[K, N]` (`b_kn`) or `[N, K]`; Err lists the first mismatches.
pub fn probe(rt: &CudaRuntime, b_kn: bool) -> Result<(), String> {
    let (m, n, k) = (200usize, 296usize, 136usize);
    let e = |e: cudarc::driver::DriverError| format!("{e:?}");
    let s = &rt.stream;
    let a: Vec<u16> = (0..m * k).map(|i| bf16::from_f32(if i / k == i % k { 1.0 } else { 0.0 }).to_bits()).collect();
    let b: Vec<u16> = (0..n * k).map(|i| bf16::from_f32(pattern(i)).to_bits()).collect();
    let (da, db) = (s.clone_htod(&a).map_err(e)?, s.clone_htod(&b).map_err(e)?);
    let mut dc = s.alloc_zeros::<u16>(m * n).map_err(e)?;
    let ldb = if b_kn { n } else { k };
    let before = tuna::kernels::lora::sm90::launched();
    cuda::matmul(s, &rt.modules, Half::Bf16, (&da.slice(..), k), (&db.slice(..), ldb), GemmOut::Half(&mut dc.slice_mut(..)), (m, n, k), b_kn).map_err(|e| e.to_string())?;
    if tuna::kernels::lora::sm90::launched() == before {
        return Err("the GEMM did not take the sm90 path".into());
    }
    let c: Vec<f32> = s.clone_dtoh(&dc).map_err(e)?.into_iter().map(|h| bf16::from_bits(h).to_f32()).collect();
    // The flat index of B that C[r, col] reads.
    let source = |r: usize, col: usize| if b_kn { r * n + col } else { col * k + r };
    let mut bad = Vec::new();
    for r in 0..m {
        for col in 0..n {
            let want = if r < k { pattern(source(r, col)) } else { 0.0 };
            let got = c[r * n + col];
            if got != want {
                bad.push((r, col, want, got));
            }
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = bad
        .iter()
        .take(6)
        .map(|&(r, col, want, got)| {
            // Where in B (its row, column) the wrong value could have come from.
            let from: Vec<String> = (0..n * k).filter(|&i| pattern(i) == got).take(2).map(|i| if b_kn { format!("B[{}, {}]", i / n, i % n) } else { format!("B[{}, {}]", i / k, i % k) }).collect();
            format!("C[{r}, {col}] = {got} (want {want}; {got} is at {})", from.join(" or "))
        })
        .collect();
    Err(format!("{} of {} wrong: {}", bad.len(), m * n, shown.join("; ")))
}
