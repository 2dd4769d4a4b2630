//! cuBLAS as the peer the CUDA GEMM benchmarks are measured against (`tools/gpu-check`'s
//! `gemm_bench` and `cargo bench --bench lora`): row-major bf16 products with f32 compute, the
//! setting of the model's linears.

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as bsys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::{Error, Result};

/// A cuBLAS handle on one stream.
pub struct Cublas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

fn blas_err(context: &str) -> impl Fn(blas::CublasError) -> Error + '_ {
    move |e| Error::Cuda { context: context.into(), message: format!("{e:?}") }
}

impl Cublas {
    /// A handle whose work goes on `stream`. An error, not a panic, when libcublas is not on
    /// the library path.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only probes whether the library loads.
        if !unsafe { bsys::is_culib_present() } {
            return Err(Error::InvalidArgument(
                "libcublas was not found: no cuBLAS peer (put a pip `nvidia-cublas` or a CUDA toolkit's lib directory on LD_LIBRARY_PATH)".into(),
            ));
        }
        Ok(Cublas { blas: CudaBlas::new(stream.clone()).map_err(blas_err("cublasCreate"))?, stream: stream.clone() })
    }

    /// Row-major `C[m, n] = alpha·A[m, k]·op(B) + beta·C` in bf16 (raw bits) with f32 compute:
    /// B is `[n, k]` read transposed when `b_nk` (the forward's `X·Wᵀ`), else `[k, n]` (the
    /// backward's `dX = dY·W`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(&self, a: &CudaSlice<u16>, b: &CudaSlice<u16>, c: &mut CudaSlice<u16>, (m, n, k): (usize, usize, usize), b_nk: bool, alpha: f32, beta: f32) -> Result<()> {
        self.gemm_ex(a, b, c, (m, n, k), (false, b_nk), alpha, beta)
    }

    /// Row-major `C[m, n] = Aᵀ·B` in bf16 with f32 compute, A stored `[k, m]` and B `[k, n]`: a
    /// weight's gradient `dW = dYᵀ·X` over k tokens.
    pub fn gemm_bf16_tn(&self, a: &CudaSlice<u16>, b: &CudaSlice<u16>, c: &mut CudaSlice<u16>, (m, n, k): (usize, usize, usize)) -> Result<()> {
        self.gemm_ex(a, b, c, (m, n, k), (true, false), 1.0, 0.0)
    }

    /// The call both take: A `[m, k]`, or `[k, m]` read transposed (`a_km`); B as `gemm_bf16`'s.
    /// cuBLAS is column-major, so this asks it for `Cᵀ = op(B)ᵀ·op(A)ᵀ`, each row-major buffer
    /// being its matrix's transpose to cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(&self, a: &CudaSlice<u16>, b: &CudaSlice<u16>, c: &mut CudaSlice<u16>, (m, n, k): (usize, usize, usize), (a_km, b_nk): (bool, bool), alpha: f32, beta: f32) -> Result<()> {
        for (name, len, need) in [("A", a.len(), m * k), ("B", b.len(), n * k), ("C", c.len(), m * n)] {
            if len < need {
                return Err(Error::InvalidArgument(format!("cublas gemm [{m}, {n}, {k}]: {name} holds {len} elements, needs {need}")));
            }
        }
        let dim = |v: usize| i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("cublas gemm [{m}, {n}, {k}]: {v} does not fit an i32")));
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        let s = &self.stream;
        let (ap, _ga) = a.device_ptr(s);
        let (bp, _gb) = b.device_ptr(s);
        let (cp, _gc) = c.device_ptr_mut(s);
        let (op_b, ldb) = if b_nk { (bsys::cublasOperation_t::CUBLAS_OP_T, ki) } else { (bsys::cublasOperation_t::CUBLAS_OP_N, ni) };
        let (op_a, lda) = if a_km { (bsys::cublasOperation_t::CUBLAS_OP_T, mi) } else { (bsys::cublasOperation_t::CUBLAS_OP_N, ki) };
        // SAFETY: the buffers hold at least m·k, n·k and m·n elements (checked above) and live
        // on the handle's stream; alpha and beta are f32, as CUBLAS_COMPUTE_32F requires.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op_b,
                op_a,
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                bp as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                ldb,
                ap as *const _,
                bsys::cudaDataType::CUDA_R_16BF,
                lda,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                bsys::cudaDataType::CUDA_R_16BF,
                ni,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(blas_err("cublasGemmEx"))
        }
    }
}
