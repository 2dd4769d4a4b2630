// Fused LoRA GEMM and the NF4 (QLoRA) matmul, bf16 / f16 storage, f32 accumulation, tensor
// cores through mma.sync.m16n8k16 (sm_80+). The math is `src/kernels/lora.rs`'s module doc:
//
//   forward   XA = X~.A^T  [M,R];   Y = X.W^T (+ bias) + s.XA.B^T  [M,N]
//   backward  G = dY.B  [M,R];  dA = s.G^T.X~  [R,K];  dB = s.dY^T.XA  [N,R]
//             dX = dY.W + s.G.A  [M,K]          (W gets no gradient)
//
// One GEMM over K + R: `lora_gemm_*` runs the K tiles of (X, W) and then the R tiles of
// (s.XA, B) into the same accumulators, so Y is written once and W read once per tile.
// The launcher first writes XA and s.XA, both from one product (the epilogue's second output
// c2) -- pre-scaling the second operand keeps one accumulator set. dX is the same kernel with
// B stored [K, N] (W and A read along their rows: the `_kn` instances, ldmatrix.trans),
// A1 = dY, A2 = s.G.
// Shapes: X [M,K], W [N,K], A [R,K], B [N,R], dY [M,N], all row-major, any sizes, R <= 128.
//
// NF4: W in bitsandbytes' layout (`src/kernels/nf4.rs`): code of flat element e in byte e/2
// (high nibble first), a_b = map[q_b]*absmax2[b/256] + offset per block b = e/64,
// w = NF4[code]*a_b, computed with __fmul_rn / __fadd_rn (no contraction) so that
// `nf4_dequant_*` equals `nf4::cpu::dequantize` exactly. In the GEMM the W tile is
// dequantized from global memory into the shared-memory stage (bf16 / f16), never to global.
//
// Performance plan (H100 SXM, the Llama-3-8B shapes K = 4096, N in {4096, 14336}, R = 16):
// - block tile 128 (M) x 64 (N) x 32 (K), 4 warps in 2 x 2, each warp 64 x 32 = 4 x 4 mma
//   tiles (64 f32 accumulators per thread); 3-stage cp.async pipeline (46 KiB static shared
//   memory, rows padded to 40 elements so ldmatrix is conflict-free).
// - floor at M = 2048..8192: dense bf16 peak ~990 TFLOP/s is out of reach for mma.sync (no
//   wgmma/TMA); a good mma.sync kernel reaches ~60-70% of cuBLAS. Expect ~350-500 TFLOP/s
//   against cuBLAS's ~650-750 at 8192 x 14336 x 4096. The LoRA term adds R/K = 0.4% FLOPs and
//   the XA kernel one extra read of X (M.K.2 bytes), so fused vs cuBLAS base alone should be
//   within ~3%; vs the unfused three-call path it saves the Y read-modify-write (M.N.4 bytes).
// - M = 1..16 (decode): memory bound. bf16 W 4096 x 14336 = 117 MB -> ~35 us at 3.35 TB/s;
//   NF4 is 4.13 bits/weight -> 30 MB -> ~9 us floor for `nf4_gemv_*` (one warp per output
//   column, 32 codes per lane per step from one 16-byte load where k % 32 == 0); the dense
//   `gemv_*` (M <= 4) streams the 117 MB the same way. The NF4 GEMM at large M dequantizes each
//   W element once per 128-row block (no cp.async for W): expect ~50-70% of the dense kernel.
// - the rank-R products (XA, G, dA, dB: 2.M.R.(N or K) FLOPs each) run on this GEMM too, R as
//   its N (XA, G and dB) or its M (dA). dA and dB reduce over the tokens, so both their
//   operands are stored [K, M] / [K, N]: the `_km_kn` instances read them in that layout (no
//   transposes, no transposed output). A one-thread-per-output CUDA-core kernel
//   was estimated at ~0.5-1 ms per product at M = 8192 (16 of 256 threads busy at R = 16,
//   serial 4096..8192-long dot products); the GEMM's cost is ~1/R of the big product's per
//   pass. They have few blocks (N = R: ceil(M/128); M = R: ceil(N/64)), so the launcher
//   splits their K over blockIdx.z: each slice writes its own f32 buffer, and the last block of
//   a tile to finish sums them in order (deterministic, in the same launch). s is applied in
//   f32 by the epilogue's `alpha`.
//
// Launch geometry: lora_gemm_*: grid (ceil(N/64), ceil(M/128), split-K slices), block 128.
// gemv_m*_* and nf4_gemv_m*_*: block 256 (8 warps, one column each), grid ceil(N/8).
// nf4_dequant_*: one thread per element, grid-stride.
#include "common.cuh"
#include "mma.cuh"
#include "nf4.cuh"

#define BM 128
#define BN 64
#define BK 32
#define PAD 8
#define STAGES 3
#define THREADS 128

// One operand of the two-phase GEMM: row-major [rows, ld] storage.
struct Operand {
    const unsigned short* p;
    int ld;
};

// C = alpha * (the products) in f32 goes to exactly one of c (rounded, after the bias; with
// add_c, after adding what c holds: dX summed over the linears that read one input, rounded
// once per product) and c32 (f32; with add_c, added to what it holds: a sum over launches);
// c2, when given, gets alpha2 * C rounded (no bias): XA and s.XA from one product.
struct GemmArgs {
    Operand a1, b1, a2, b2;  // b1/b2: [N, K] (B_KN = false) or [K, N] (B_KN = true)
    const unsigned short* bias;  // [N] or null
    unsigned short* c;           // [M, N] or null
    float* c32;                  // [M, N] or null
    unsigned short* c2;          // [M, N] or null
    int m, n, k1, k2;
    int split;                   // > 0: K tiles per blockIdx.z slice, see below
    float alpha, alpha2;
    float* parts;                // split > 0: gridDim.z slices of [M, N] f32
    unsigned* tile_done;         // split > 0: a counter per output tile, zero on entry and on exit
    int add_c;                   // nonzero: c += C (read, added in f32, rounded once), or c32 += C
};

// Stores C[row, col] = v (f32, alpha applied, no bias yet) where GemmArgs says.
template <typename T>
__device__ __forceinline__ void store_c(const GemmArgs& g, int row, int col, float v) {
    const long i = (long)row * g.n + col;
    if (g.c2 != nullptr) g.c2[i] = T::from_f32(g.alpha2 * v);
    if (g.bias != nullptr) v += T::to_f32(g.bias[col]);
    if (g.c32 != nullptr) g.c32[i] = g.add_c ? g.c32[i] + v : v;
    else g.c[i] = T::from_f32(g.add_c ? v + T::to_f32(g.c[i]) : v);
}

// Split-K's sum, in the kernel: every block of an output tile has written its slice of
// `parts`; the last of them to finish (counted on the tile's `tile_done`) resets the counter,
// sums the slices in z order and stores C. The same sum in the same order on every run, with
// no second launch. The fences order each thread's slice stores before the count, and the
// count before the last block's loads (which read L2, __ldcg: its L1 never held those lines,
// but other blocks wrote them).
template <typename T>
__device__ __forceinline__ void sum_split_tile(const GemmArgs& g, int m0, int n0) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    unsigned* done = g.tile_done + blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) {
        last = atomicAdd(done, 1u) == gridDim.z - 1;
        // Every block of the tile has counted: the last one leaves the counter at zero for
        // the next launch on the stream, so the launcher keeps one buffer instead of zeroing.
        if (last) *done = 0u;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const long mn = (long)g.m * g.n;
    // Not unrolled: unrolled, these loops raised nf4_lora_gemm_kn_bf16 from 127 to 167
    // registers on sm_90 (ptxas -v), which would cost it a resident block per SM.
#pragma unroll 1
    for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
        const int row = m0 + i / BN, col = n0 + i % BN;
        if (row >= g.m || col >= g.n) continue;
        float v = 0.0f;
#pragma unroll 1
        for (int z = 0; z < (int)gridDim.z; z++) v += __ldcg(g.parts + z * mn + (long)row * g.n + col);
        store_c<T>(g, row, col, v);
    }
}

// Shared-memory stage: A tile [BM][BK+PAD] (m-major) or [BK][BM+PAD] (A stored [K, M], the
// smaller); B tile [BN][BK+PAD] (n-major) or [BK][BN+PAD].
#define A_STAGE (BM * (BK + PAD))
#define B_STAGE (BN * (BK + PAD))

// Loads a rows x BK tile of a [rows_total, cols_total] row-major operand starting at (r0, k0)
// into `dst` (pitch BK + PAD). 16-byte cp.async when every row start is 16-byte aligned
// (ld % 8 == 0), else element loads; out-of-range elements become 0.
template <int ROWS>
__device__ __forceinline__ void load_rows(unsigned short* dst, Operand op, int rows_total, int cols_total, int r0, int k0) {
    const bool vec = (op.ld % 8) == 0 && ((unsigned long)op.p % 16) == 0;
    if (vec) {
#pragma unroll
        for (int i = threadIdx.x; i < ROWS * (BK / 8); i += THREADS) {
            const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
            const int gr = r0 + r, gc = k0 + c;
            int bytes = 0;
            if (gr < rows_total && gc < cols_total) bytes = 2 * min(8, cols_total - gc);
            const unsigned short* src = bytes > 0 ? op.p + (long)gr * op.ld + gc : op.p;
            cp_async16(dst + r * (BK + PAD) + c, src, bytes);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * BK; i += THREADS) {
            const int r = i / BK, c = i % BK;
            const int gr = r0 + r, gc = k0 + c;
            dst[r * (BK + PAD) + c] = (gr < rows_total && gc < cols_total) ? op.p[(long)gr * op.ld + gc] : (unsigned short)0;
        }
    }
}

// Loads a BK x COLS tile of a [k_total, cols_total] row-major operand at (k0, c0) into `dst`
// (pitch COLS + PAD): B stored [K, N] (COLS = BN) or A stored [K, M] (COLS = BM).
template <int COLS>
__device__ __forceinline__ void load_kn(unsigned short* dst, Operand op, int k_total, int cols_total, int k0, int c0) {
    const bool vec = (op.ld % 8) == 0 && ((unsigned long)op.p % 16) == 0;
    if (vec) {
#pragma unroll
        for (int i = threadIdx.x; i < BK * (COLS / 8); i += THREADS) {
            const int r = i / (COLS / 8), c = (i % (COLS / 8)) * 8;
            const int gr = k0 + r, gc = c0 + c;
            int bytes = 0;
            if (gr < k_total && gc < cols_total) bytes = 2 * min(8, cols_total - gc);
            const unsigned short* src = bytes > 0 ? op.p + (long)gr * op.ld + gc : op.p;
            cp_async16(dst + r * (COLS + PAD) + c, src, bytes);
        }
    } else {
        for (int i = threadIdx.x; i < BK * COLS; i += THREADS) {
            const int r = i / COLS, c = i % COLS;
            const int gr = k0 + r, gc = c0 + c;
            dst[r * (COLS + PAD) + c] = (gr < k_total && gc < cols_total) ? op.p[(long)gr * op.ld + gc] : (unsigned short)0;
        }
    }
}

// The NF4 W tile, dequantized: W is [N, K] flat (element (n, k) at n*K + k). For the forward
// (B_KN false) the tile is rows n0.. of k0..k0+BK, stored [BN][BK+PAD]; for dX (B_KN true) the
// GEMM's K runs over W's rows: rows k0..k0+BK of W, columns n0..n0+BN, stored [BK][BN+PAD].
template <typename T, bool B_KN>
__device__ __forceinline__ void load_nf4(unsigned short* dst, const Nf4& q, const float* map, const float* code, int wrows, int wcols, int t0, int t1) {
    constexpr int R = B_KN ? BK : BN, C = B_KN ? BN : BK;
    for (int i = threadIdx.x; i < R * C; i += THREADS) {
        const int r = i / C, c = i % C;
        const int gr = t0 + r, gc = t1 + c;
        float v = 0.0f;
        if (gr < wrows && gc < wcols) v = nf4_at(q, map, code, (long)gr * wcols + gc);
        dst[r * (C + PAD) + c] = T::from_f32(v);
    }
}

// C = A1.op(B1) + A2.op(B2) (+ bias). Prologue: fill STAGES-1 stages. Main loop: wait for
// stage kt, issue the load of stage kt + STAGES - 1, run BK/16 mma steps on stage kt.
// Epilogue: alpha, bias, convert, bounds-checked store (or, with c32, added to an f32 C: dW
// summed over chunks of rows, or a split-K slice).
//
// Warp w (0..3) owns rows (w / 2) * 64 .. +64 and columns (w % 2) * 32 .. +32 of the block
// tile: acc[mi][ni][0..3] is the m16n8 accumulator of rows mi*16, columns ni*8, laid out as
// mma's D: c0, c1 at (g, 2t), (g, 2t+1); c2, c3 at (g+8, 2t), (g+8, 2t+1); g = lane/4, t = lane%4.
//
// A_KM: A1 and A2 stored [K, M] (row k holds A's column k), loaded as [BK][BM+PAD] and read
// with ldmatrix.trans, as B is in the B_KN layout. The rank-R gradients use it: dA = (s.G)^T.X~
// and dB = s.dY^T.XA read their token-major operands where they lie, with no transpose.
template <typename T, bool A_KM, bool B_KN, bool NF4>
__device__ __forceinline__ void lora_gemm_body(const GemmArgs& g, const Nf4& q) {
    __shared__ __align__(16) unsigned short As[STAGES][A_STAGE];
    __shared__ __align__(16) unsigned short Bs[STAGES][B_STAGE];
    __shared__ float tables[NF4 ? 272 : 1];
    if (NF4) {
        for (int i = threadIdx.x; i < 272; i += THREADS) tables[i] = q.tables[i];
        __syncthreads();
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 1) * 64, wn = (warp & 1) * 32;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tiles1 = (g.k1 + BK - 1) / BK, tiles = tiles1 + (g.k2 + BK - 1) / BK;
    // Split-K: block z runs K tiles [kt0, kt1) into its own [M, N] slice of `parts`, and the
    // tile's last block sums them (sum_split_tile), for thin outputs with few blocks.
    const int kt0 = g.split > 0 ? blockIdx.z * g.split : 0;
    const int kt1 = g.split > 0 ? min(tiles, kt0 + g.split) : tiles;

    auto load_stage = [&](int kt, int s) {
        if (kt >= kt1) return;
        const bool second = kt >= tiles1;
        const int k0 = (second ? kt - tiles1 : kt) * BK;
        const int kk = second ? g.k2 : g.k1;
        if (A_KM) load_kn<BM>(As[s], second ? g.a2 : g.a1, kk, g.m, k0, m0);
        else load_rows<BM>(As[s], second ? g.a2 : g.a1, g.m, kk, m0, k0);
        if (NF4 && !second) {
            if (B_KN) load_nf4<T, true>(Bs[s], q, tables, tables + 256, g.k1, g.n, k0, n0);
            else load_nf4<T, false>(Bs[s], q, tables, tables + 256, g.n, g.k1, n0, k0);
        } else if (B_KN) {
            load_kn<BN>(Bs[s], second ? g.b2 : g.b1, kk, g.n, k0, n0);
        } else {
            load_rows<BN>(Bs[s], second ? g.b2 : g.b1, g.n, kk, n0, k0);
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    // Prologue.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        load_stage(kt0 + s, s);
        cp_async_commit();
    }
    // Main loop: the i-th K tile of this block (kt0 + i) sits in stage i % STAGES.
    for (int i = 0; i < kt1 - kt0; i++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage i visible to all; stage i-1 no longer read
        load_stage(kt0 + i + STAGES - 1, (i + STAGES - 1) % STAGES);
        cp_async_commit();
        const unsigned short* as = As[i % STAGES];
        const unsigned short* bs = Bs[i % STAGES];
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            u32 af[4][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                // The four 8x8 pieces of the m16k16 fragment: (m 0-7, k 0-7), (m 8-15, k 0-7),
                // (m 0-7, k 8-15), (m 8-15, k 8-15); lanes 8j..8j+7 give piece j's row addresses.
                if (A_KM) {
                    ldmatrix_x4_trans(af[mi], as + (ks + (lane & 7) + (lane >> 4) * 8) * (BM + PAD) + wm + mi * 16 + ((lane >> 3) & 1) * 8);
                } else {
                    ldmatrix_x4(af[mi], as + (wm + mi * 16 + (lane & 15)) * (BK + PAD) + ks + (lane >> 4) * 8);
                }
            }
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {  // two n8 tiles per ldmatrix.x4
                u32 r[4];
                if (B_KN) {
                    ldmatrix_x4_trans(r, bs + (ks + (lane & 7) + ((lane >> 3) & 1) * 8) * (BN + PAD) + wn + nj * 16 + (lane >> 4) * 8);
                } else {
                    ldmatrix_x4(r, bs + (wn + nj * 16 + (lane & 7) + (lane >> 4) * 8) * (BK + PAD) + ks + ((lane >> 3) & 1) * 8);
                }
                bf[nj * 2][0] = r[0];
                bf[nj * 2][1] = r[1];
                bf[nj * 2 + 1][0] = r[2];
                bf[nj * 2 + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) T::mma(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: C, or this block's split-K slice (written whole: no zeroing needed).
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    float* part = g.split > 0 ? g.parts + (long)blockIdx.z * g.m * g.n : nullptr;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = m0 + wm + mi * 16 + gr + (e >> 1) * 8;
                const int col = n0 + wn + ni * 8 + gc + (e & 1);
                if (row < g.m && col < g.n) {
                    const float v = g.alpha * acc[mi][ni][e];
                    if (part != nullptr) part[(long)row * g.n + col] = v;
                    else store_c<T>(g, row, col, v);
                }
            }
        }
    }
    if (g.split > 0) sum_split_tile<T>(g, m0, n0);
}

#define GEMM_PARAMS                                                                                    \
    const unsigned short *a1, int lda1, const unsigned short *b1, int ldb1, const unsigned short *a2, \
        int lda2, const unsigned short *b2, int ldb2, const unsigned short *bias, unsigned short *c, float *c32, unsigned short *c2, \
        int m, int n, int k1, int k2, int split, float alpha, float alpha2, float *parts, unsigned *tile_done, int add_c
#define GEMM_ARGS GemmArgs{{a1, lda1}, {b1, ldb1}, {a2, lda2}, {b2, ldb2}, bias, c, c32, c2, m, n, k1, k2, split, alpha, alpha2, parts, tile_done, add_c}

// Dense: B1, B2 stored [N, K] (forward) or [K, N] (_kn, dX).
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_bf16(GEMM_PARAMS) {
    lora_gemm_body<Bf16, false, false, false>(GEMM_ARGS, Nf4{});
}
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_f16(GEMM_PARAMS) {
    lora_gemm_body<F16, false, false, false>(GEMM_ARGS, Nf4{});
}
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_kn_bf16(GEMM_PARAMS) {
    lora_gemm_body<Bf16, false, true, false>(GEMM_ARGS, Nf4{});
}
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_kn_f16(GEMM_PARAMS) {
    lora_gemm_body<F16, false, true, false>(GEMM_ARGS, Nf4{});
}
// A stored [K, M] and B stored [K, N]: C = A^T.B over the rows of both (the rank-R gradients).
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_km_kn_bf16(GEMM_PARAMS) {
    lora_gemm_body<Bf16, true, true, false>(GEMM_ARGS, Nf4{});
}
extern "C" __global__ void __launch_bounds__(THREADS) lora_gemm_km_kn_f16(GEMM_PARAMS) {
    lora_gemm_body<F16, true, true, false>(GEMM_ARGS, Nf4{});
}
// NF4: B1 = W from `packed` (b1 unused), forward and dX.
extern "C" __global__ void __launch_bounds__(THREADS) nf4_lora_gemm_bf16(GEMM_PARAMS, NF4_PARAMS) {
    lora_gemm_body<Bf16, false, false, true>(GEMM_ARGS, NF4_ARGS);
}
extern "C" __global__ void __launch_bounds__(THREADS) nf4_lora_gemm_f16(GEMM_PARAMS, NF4_PARAMS) {
    lora_gemm_body<F16, false, false, true>(GEMM_ARGS, NF4_ARGS);
}
extern "C" __global__ void __launch_bounds__(THREADS) nf4_lora_gemm_kn_bf16(GEMM_PARAMS, NF4_PARAMS) {
    lora_gemm_body<Bf16, false, true, true>(GEMM_ARGS, NF4_ARGS);
}
extern "C" __global__ void __launch_bounds__(THREADS) nf4_lora_gemm_kn_f16(GEMM_PARAMS, NF4_PARAMS) {
    lora_gemm_body<F16, false, true, true>(GEMM_ARGS, NF4_ARGS);
}


// NF4 quantization, the two passes over the weights of `nf4::cuda::quantize` (the host does
// each block's scale 1/absmax, a final partial block and the double quantization):
// nf4_absmax: absmax[b] = max |x[e]| over block b (64 elements, the last may be short).
// nf4_codes: byte i holds the codes of elements 2i (high nibble) and 2i+1; the code of e is the
// number of NF4 midpoints below clamp(x[e] * inv[e / 64], -1, 1) (one rounded product, no
// contraction: the CPU's arithmetic, so the CPU's bytes). Grid-stride, one thread per block /
// byte.
template <typename E>
__device__ __forceinline__ void nf4_absmax_body(const E* x, float* absmax, long len, long blocks) {
    for (long b = (long)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += (long)gridDim.x * blockDim.x) {
        const long end = min(len, b * 64 + 64);
        float a = 0.0f;
        for (long e = b * 64; e < end; e++) a = fmaxf(a, fabsf(Elem<E>::load(x, e)));
        absmax[b] = a;
    }
}

template <typename E>
__device__ __forceinline__ void nf4_codes_body(const E* x, const float* inv, const float* mids, unsigned char* packed, long len) {
    const long bytes = (len + 1) / 2;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < bytes; i += (long)gridDim.x * blockDim.x) {
        unsigned int byte = 0;
        for (int j = 0; j < 2; j++) {
            const long e = 2 * i + j;
            if (e < len) {
                const float s = fminf(fmaxf(__fmul_rn(Elem<E>::load(x, e), inv[e >> 6]), -1.0f), 1.0f);
                unsigned int code = 0;
                for (int m = 0; m < 15; m++) code += mids[m] < s ? 1u : 0u;
                byte |= code << (j == 0 ? 4 : 0);
            }
        }
        packed[i] = (unsigned char)byte;
    }
}

extern "C" __global__ void nf4_absmax_f32(const float* x, float* absmax, long len, long blocks) { nf4_absmax_body<float>(x, absmax, len, blocks); }
extern "C" __global__ void nf4_absmax_bf16(const bf16_bits* x, float* absmax, long len, long blocks) { nf4_absmax_body<bf16_bits>(x, absmax, len, blocks); }
extern "C" __global__ void nf4_codes_f32(const float* x, const float* inv, const float* mids, unsigned char* packed, long len) {
    nf4_codes_body<float>(x, inv, mids, packed, len);
}
extern "C" __global__ void nf4_codes_bf16(const bf16_bits* x, const float* inv, const float* mids, unsigned char* packed, long len) {
    nf4_codes_body<bf16_bits>(x, inv, mids, packed, len);
}

// ---- GEMV (M <= 16: decoding and tiny batches) ---------------------------------------------
// Y[m, n] = sum_k X[m, k] W[n, k] + XA_s[m, :].B[n, :] (+ bias), W dense (16-bit) or NF4, with a
// warp per output column n: lanes stride over K, each reads its W elements once (NF4: decodes
// them) and multiplies them into all M rows (M accumulators), then a warp sum. MAXM is the
// accumulators a thread holds: an instance for one row (decoding), with the fewest registers
// so the most warps fit on a multiprocessor, and one for up to 4 (dense) or 16 (NF4) rows. The
// wide paths give each lane different weights than the one-weight path, so their sums differ
// by rounding (within the tests' f32 bound).

// acc[i] += X[i, kk .. kk + 8] . w for the m rows: one 16-byte load of x per row.
template <typename T, int MAXM>
__device__ __forceinline__ void gemv_rows8(float (&acc)[MAXM], const unsigned short* x, int m, int k, int kk, const float (&w)[8]) {
#pragma unroll
    for (int i = 0; i < MAXM; i++) {
        if (i < m) {
            const uint4 xv = *reinterpret_cast<const uint4*>(x + (long)i * k + kk);
            const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                acc[i] += T::to_f32((unsigned short)(xw[j] & 0xffffu)) * w[2 * j];
                acc[i] += T::to_f32((unsigned short)(xw[j] >> 16)) * w[2 * j + 1];
            }
        }
    }
}

// The LoRA term (r > 0), the warp sums, the bias and the stores of column `col`.
template <typename T, int MAXM>
__device__ __forceinline__ void gemv_finish(float (&acc)[MAXM], const unsigned short* xa_s, const unsigned short* bm, const unsigned short* bias, unsigned short* y, int m, int n, int r, int col, int lane) {
    for (int rr = lane; rr < r; rr += 32) {
        const float bv = T::to_f32(bm[(long)col * r + rr]);
#pragma unroll
        for (int i = 0; i < MAXM; i++)
            if (i < m) acc[i] += T::to_f32(xa_s[(long)i * r + rr]) * bv;
    }
#pragma unroll
    for (int i = 0; i < MAXM; i++) {
        const float v = warp_sum(acc[i]);
        if (lane == 0 && i < m) y[(long)i * n + col] = T::from_f32(v + (bias != nullptr ? T::to_f32(bias[col]) : 0.0f));
    }
}

// NF4's wide steps: each lane takes 8 * WORDS consecutive weights per step, WORDS u32s of codes
// (4 bytes, little end first, high nibble first in each byte) from one load (16 bytes when
// WORDS is 4) and one absmax (the weights lie in one block of 64: the step starts at a
// multiple of 8 * WORDS). A warp has 128 * WORDS bytes of codes in flight per step: with one
// column per warp, that is what keeps enough memory requests in flight to approach the copy
// bandwidth at M = 1.
template <typename T, int MAXM, int WORDS>
__device__ __forceinline__ void gemv_nf4_wide(float (&acc)[MAXM], const unsigned short* x, const Nf4& q, const float* tables, long w0, int m, int k, int lane) {
    constexpr int PER = 8 * WORDS;
    for (int kk = lane * PER; kk < k; kk += 32 * PER) {
        const long e = w0 + kk;
        u32 words[WORDS];
        if constexpr (WORDS == 4) {
            const uint4 c = *reinterpret_cast<const uint4*>(q.packed + (e >> 1));
            words[0] = c.x, words[1] = c.y, words[2] = c.z, words[3] = c.w;
        } else {
            words[0] = *reinterpret_cast<const u32*>(q.packed + (e >> 1));
        }
        const long b = e >> 6;
        const float a = __fadd_rn(__fmul_rn(tables[q.absmax[b]], q.absmax2[b >> 8]), q.offset);
#pragma unroll
        for (int wd = 0; wd < WORDS; wd++) {
            float w[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const u32 byte = (words[wd] >> (8 * (j >> 1))) & 0xffu;
                w[j] = __fmul_rn(tables[256 + ((j & 1) ? (byte & 0xfu) : (byte >> 4))], a);
            }
            gemv_rows8<T, MAXM>(acc, x, m, k, kk + 8 * wd, w);
        }
    }
}

template <typename T, int MAXM>
__device__ __forceinline__ void gemv_nf4_body(const unsigned short* x, const unsigned short* xa_s, const unsigned short* bm, const unsigned short* bias, unsigned short* y, int m, int n, int k, int r, const Nf4& q) {
    __shared__ float tables[272];
    for (int i = threadIdx.x; i < 272; i += blockDim.x) tables[i] = q.tables[i];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    float acc[MAXM];
#pragma unroll
    for (int i = 0; i < MAXM; i++) acc[i] = 0.0f;
    const long w0 = (long)col * k;  // flat index of W[col, 0]
    // 32 weights a lane a step where K % 32 == 0 (every row of codes then starts 16-byte
    // aligned), 8 where K % 8 == 0, else one.
    const bool x16 = ((unsigned long long)x & 15) == 0;
    if (x16 && (k & 31) == 0 && ((unsigned long long)q.packed & 15) == 0) {
        gemv_nf4_wide<T, MAXM, 4>(acc, x, q, tables, w0, m, k, lane);
    } else if (x16 && (k & 7) == 0 && ((unsigned long long)q.packed & 3) == 0) {
        gemv_nf4_wide<T, MAXM, 1>(acc, x, q, tables, w0, m, k, lane);
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            const float w = nf4_at(q, tables, tables + 256, w0 + kk);
#pragma unroll
            for (int i = 0; i < MAXM; i++)
                if (i < m) acc[i] += T::to_f32(x[(long)i * k + kk]) * w;
        }
    }
    gemv_finish<T, MAXM>(acc, xa_s, bm, bias, y, m, n, r, col, lane);
}

// Dense W: 8 * WORDS weights a lane a step from WORDS 16-byte loads (1 KiB a warp at WORDS 2).
// Where the tensor-core GEMM would run one 128-row tile for these few rows, with few blocks
// (split along K), this streams W once with every multiprocessor's warps.
template <typename T, int MAXM, int WORDS>
__device__ __forceinline__ void gemv_dense_wide(float (&acc)[MAXM], const unsigned short* x, const unsigned short* wr, int m, int k, int lane) {
    constexpr int PER = 8 * WORDS;
    for (int kk = lane * PER; kk < k; kk += 32 * PER) {
        uint4 wv[WORDS];
#pragma unroll
        for (int wd = 0; wd < WORDS; wd++) wv[wd] = *reinterpret_cast<const uint4*>(wr + kk + 8 * wd);
#pragma unroll
        for (int wd = 0; wd < WORDS; wd++) {
            const u32 ww[4] = {wv[wd].x, wv[wd].y, wv[wd].z, wv[wd].w};
            float w[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                w[2 * j] = T::to_f32((unsigned short)(ww[j] & 0xffffu));
                w[2 * j + 1] = T::to_f32((unsigned short)(ww[j] >> 16));
            }
            gemv_rows8<T, MAXM>(acc, x, m, k, kk + 8 * wd, w);
        }
    }
}

template <typename T, int MAXM>
__device__ __forceinline__ void gemv_dense_body(const unsigned short* x, const unsigned short* w, const unsigned short* xa_s, const unsigned short* bm, const unsigned short* bias, unsigned short* y, int m, int n, int k, int r) {
    const int lane = threadIdx.x & 31;
    const int col = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    float acc[MAXM];
#pragma unroll
    for (int i = 0; i < MAXM; i++) acc[i] = 0.0f;
    const unsigned short* wr = w + (long)col * k;
    // 16 weights a lane a step where K % 16 == 0, 8 where K % 8 == 0 (rows of W and x then
    // start 16-byte aligned), else one.
    const bool aligned = ((unsigned long long)x & 15) == 0 && ((unsigned long long)w & 15) == 0 && (k & 7) == 0;
    if (aligned && (k & 15) == 0) {
        gemv_dense_wide<T, MAXM, 2>(acc, x, wr, m, k, lane);
    } else if (aligned) {
        gemv_dense_wide<T, MAXM, 1>(acc, x, wr, m, k, lane);
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            const float wv = T::to_f32(wr[kk]);
#pragma unroll
            for (int i = 0; i < MAXM; i++)
                if (i < m) acc[i] += T::to_f32(x[(long)i * k + kk]) * wv;
        }
    }
    gemv_finish<T, MAXM>(acc, xa_s, bm, bias, y, m, n, r, col, lane);
}

// Launch: block 256 (8 warps, one column each), grid ceil(N / 8). xa_s and bm are read only
// when r > 0.
#define GEMV_PARAMS                                                                                          \
    const unsigned short *x, const unsigned short *xa_s, const unsigned short *bm, const unsigned short *bias, \
        unsigned short *y, int m, int n, int k, int r
#define GEMV_ARGS x, xa_s, bm, bias, y, m, n, k, r
extern "C" __global__ void nf4_gemv_m1_bf16(GEMV_PARAMS, NF4_PARAMS) { gemv_nf4_body<Bf16, 1>(GEMV_ARGS, NF4_ARGS); }
extern "C" __global__ void nf4_gemv_m16_bf16(GEMV_PARAMS, NF4_PARAMS) { gemv_nf4_body<Bf16, 16>(GEMV_ARGS, NF4_ARGS); }
extern "C" __global__ void nf4_gemv_m1_f16(GEMV_PARAMS, NF4_PARAMS) { gemv_nf4_body<F16, 1>(GEMV_ARGS, NF4_ARGS); }
extern "C" __global__ void nf4_gemv_m16_f16(GEMV_PARAMS, NF4_PARAMS) { gemv_nf4_body<F16, 16>(GEMV_ARGS, NF4_ARGS); }
extern "C" __global__ void gemv_m1_bf16(GEMV_PARAMS, const unsigned short* w) { gemv_dense_body<Bf16, 1>(x, w, xa_s, bm, bias, y, m, n, k, r); }
extern "C" __global__ void gemv_m4_bf16(GEMV_PARAMS, const unsigned short* w) { gemv_dense_body<Bf16, 4>(x, w, xa_s, bm, bias, y, m, n, k, r); }
extern "C" __global__ void gemv_m1_f16(GEMV_PARAMS, const unsigned short* w) { gemv_dense_body<F16, 1>(x, w, xa_s, bm, bias, y, m, n, k, r); }
extern "C" __global__ void gemv_m4_f16(GEMV_PARAMS, const unsigned short* w) { gemv_dense_body<F16, 4>(x, w, xa_s, bm, bias, y, m, n, k, r); }

// Dequantization to f32, exactly `nf4::cpu::dequantize`.
extern "C" __global__ void nf4_dequant_f32(NF4_PARAMS, float* out, long len) {
    __shared__ float tables_s[272];
    for (int i = threadIdx.x; i < 272; i += blockDim.x) tables_s[i] = tables[i];
    __syncthreads();
    const Nf4 q = NF4_ARGS;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < len; e += (long)gridDim.x * blockDim.x)
        out[e] = nf4_at(q, tables_s, tables_s + 256, e);
}
