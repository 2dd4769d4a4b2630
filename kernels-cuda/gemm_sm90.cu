// arch: sm_90a
// The LoRA GEMM on Hopper's own path (H100, H200): wgmma, the warpgroup MMA that reads both
// operands from shared memory, fed by the tensor-memory accelerator (TMA,
// cp.async.bulk.tensor) through an mbarrier pipeline. It computes what `lora_gemm_*` in
// lora_gemm.cu computes, with the same conventions:
//
//   C[M, N] = alpha * (A1 . op(B1) over K1  +  A2 . op(B2) over K2) (+ bias)
//
// A1, A2 row-major [M, K1] / [M, K2]; B stored [N, K] (forward: Y = X.W^T + s.XA.B^T) or, in
// the `_kn` instances, [K, N] (dX = dY.W + s.G.A); in the `_km_kn` instances A is stored
// [K, M] too (dW = dY^T.X, over the tokens). C is written in the 16-bit type (with add_c,
// after adding what c holds, in f32), or to an f32 buffer (c32; with add_c, added to it). The launcher
// (`src/kernels/lora/sm90.rs`) sends a GEMM here only on a compute-capability 9.0 device, for
// outputs of at least one tile, with every operand's rows 16-byte aligned (TMA's rule);
// everything else (split-K, thin rank-R products, other GPUs) stays on lora_gemm.cu's mma.sync
// kernels. The `nf4_` instances read W (B1) in NF4: the
// producer warpgroup dequantizes each W tile into the stage (`nf4_tile`), never to global
// memory, while thread 0 still loads A (and the LoRA phase's B) through the TMA. This file is built for sm_90a alone
// (`arch:` line above; build.rs compiles it with -arch=compute_90a).
//
// Block: 384 threads, three warpgroups. Warpgroup 0 is the producer: one thread issues the TMA
// loads of each K tile (A: a 128 x 64 box, or two 64 x 64 boxes for the [K, M] layout; B: a
// 256 x 64 box, or four 64 x 64 boxes for the [K, N] layout) into a 4-stage ring, each stage
// completing on its `full` mbarrier by byte count. Warpgroups 1 and 2 are the consumers: each owns 64 rows of the 128 x 256 block tile
// and runs, per K tile, four wgmma.m64n256k16 (128 f32 accumulators per thread), keeps one
// batch in flight (wait_group 1) and hands the previous stage back through its `empty`
// mbarrier (one arrival per consumer warp, 8 in all). Out-of-range rows and columns of a box
// (ragged M, N, K; K2 = R < 64) are zero-filled by the TMA, so tails need no code.
//
// Shared memory: stage s holds A (16 KiB) then B (32 KiB), 1024-byte aligned, in TMA's
// 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)), which is the layout
// the descriptors below name (swizzle mode 1).
// - K-major operands (A; B stored [N, K]): rows of 64 elements (128 B), 8-row groups 1024 B
//   apart (SBO); the k16 slice ks starts 32*ks bytes into the row (LBO unused for this layout).
// - B stored [K, N] (`_kn`, imm-trans-b = 1): four boxes of 64 K-rows x 64 N (8 KiB each) side
//   by side along N (LBO = 8192, the distance between 64-wide N chunks), 8-row K groups 1024 B
//   apart (SBO); the k16 slice ks starts 16 rows = 2048 bytes further.
//
// Tile order: blocks walk the output in groups of 8 row tiles (column-major inside a group),
// so the blocks resident at once share their A rows and B columns in L2.
//
// Floor (H100 SXM, 8192 x 14336 x 4096 bf16): 962 GFLOP at the ~990 TFLOP/s dense peak is
// 0.97 ms; cuBLAS reaches ~700-750 TFLOP/s. Not yet measured (no GPU run so far).
#include "common.cuh"
#include "mma.cuh"
#include "nf4.cuh"
#include "wgmma.cuh"

#define SM90_BM 128
#define SM90_BN 256
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_THREADS 384
#define A_BYTES (SM90_BM * SM90_BK * 2)
#define B_BYTES (SM90_BN * SM90_BK * 2)
#define STAGE_BYTES (A_BYTES + B_BYTES)
#define GROUP_M 8

// CUtensorMap as the driver encodes it (cuTensorMapEncodeTiled on the host): 128 opaque bytes.
struct __align__(64) TensorMap {
    u64 opaque[16];
};

#ifdef TUNA_CUDA_EMU  // compiled as host C++ (tools/cuda-emu): the emulator's mbarriers and TMA
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) { emu::mbar_init(bar, count); }
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) { emu::mbar_arrive(bar, bytes); }
__device__ __forceinline__ void mbar_arrive(u64* bar) { emu::mbar_arrive(bar, 0); }
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) { emu::mbar_wait(bar, parity); }
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void tma_load(u32 dst, const TensorMap* map, int c0, int c1, u64* bar) { emu::tma_load_2d(dst, map, c0, c1, bar); }
#else
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Arrives once and adds `bytes` to the transactions the current phase waits for.
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// One 2-D box of `map` at element coordinates (c0 innermost, c1) into shared memory at `dst`,
// completing on `bar`.
__device__ __forceinline__ void tma_load(u32 dst, const TensorMap* map, int c0, int c1, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}
// Makes the mbarrier initializations visible to the other threads and to the async proxy.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    fence_proxy_async();
}
#endif

// The B tile of K tile k0 (columns n0..n0+255 of C): one 256 x 64 box of B stored [N, K], or
// for B stored [K, N] four 64 x 64 boxes side by side along N (8 KiB apart).
template <bool KN>
__device__ __forceinline__ void tma_load_b(u32 b_s, const TensorMap* tb, int n0, int k0, u64* bar) {
    if (KN) {
#pragma unroll
        for (int j = 0; j < SM90_BN / 64; j++) tma_load(b_s + j * 8192, tb, n0 + 64 * j, k0, bar);
    } else {
        tma_load(b_s, tb, k0, n0, bar);
    }
}

// d += A.B for a 64 x 256 x 16 slice: A and B from shared memory (descriptors), f32 accumulate,
// A transposed (stored [K, M]) when TA is 1, B (stored [K, N]) when TB is 1.
#ifdef TUNA_CUDA_EMU
template <int TA, int TB> __device__ __forceinline__ void wgmma_256(Bf16, float* d, u64 da, u64 db) { emu::wgmma(true, d, 256, da, nullptr, db, TA, TB); }
template <int TA, int TB> __device__ __forceinline__ void wgmma_256(F16, float* d, u64 da, u64 db) { emu::wgmma(false, d, 256, da, nullptr, db, TA, TB); }
#else
#define WGMMA_256(TYPE)                                                                              \
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " " WG_D128           \
                 ", %128, %129, 1, 1, 1, %130, %131;"                                                \
                 : ACC32(0), ACC32(32), ACC32(64), ACC32(96)                                          \
                 : "l"(da), "l"(db), "n"(TA), "n"(TB))
template <int TA, int TB> __device__ __forceinline__ void wgmma_256(Bf16, float* d, u64 da, u64 db) { WGMMA_256("bf16"); }
template <int TA, int TB> __device__ __forceinline__ void wgmma_256(F16, float* d, u64 da, u64 db) { WGMMA_256("f16"); }
#endif

// The NF4 W tile of K tile k0, dequantized by the producer warpgroup's 128 threads into stage
// memory at `dst` in the layout the TMA would have written (128-byte swizzle): W is [wrows,
// wcols] flat (wrows = N, wcols = K for the forward; wrows = K, wcols = N for dX, where the
// GEMM's K runs over W's rows). The tile is ROWS x COLS of W from (r0, c0), COLS along W's
// rows, stored as COLS / 64 boxes of ROWS x 64 side by side (one box in the forward: 256 x 64;
// four in dX: 64 x 64 each). Each thread writes 16-byte chunks of 8 consecutive weights: one
// u32 of codes and one block scale when the 8 lie inside W with K % 8 == 0, else weight by
// weight (zero outside W), the arithmetic of `nf4_at` either way.
// Two f32 rounded to the 16-bit type in one instruction, `lo` in the low half (finite values:
// the same bits as T::from_f32).
#ifdef TUNA_CUDA_EMU
template <typename T> __device__ __forceinline__ u32 pack2(T, float lo, float hi) { return (u32)T::from_f32(lo) | ((u32)T::from_f32(hi) << 16); }
#else
__device__ __forceinline__ u32 pack2(Bf16, float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 pack2(F16, float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void nf4_tile(u32 dst, const Nf4& q, const float* map, const float* code, int wrows, int wcols, int r0, int c0) {
    constexpr int CHUNKS = ROWS * COLS / 8, PER_ROW = COLS / 8;
    const bool wide = (wcols & 7) == 0 && ((u64)q.packed & 3) == 0;
#pragma unroll 4
    for (int ch = threadIdx.x; ch < CHUNKS; ch += 128) {
        const int r = ch / PER_ROW, c8 = ch % PER_ROW;
        const int gr = r0 + r, gc = c0 + c8 * 8;
        u32 h[4] = {0u, 0u, 0u, 0u};
        if (gr < wrows && wide && gc + 8 <= wcols) {
            const long e = (long)gr * wcols + gc;
            const u32 codes = *reinterpret_cast<const u32*>(q.packed + (e >> 1));
            const long b = e >> 6;
            const float a = __fadd_rn(__fmul_rn(map[q.absmax[b]], q.absmax2[b >> 8]), q.offset);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const u32 byte = (codes >> (8 * j)) & 0xffu;
                h[j] = pack2(T{}, __fmul_rn(code[byte >> 4], a), __fmul_rn(code[byte & 0xfu], a));
            }
        } else if (gr < wrows) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float v = gc + j < wcols ? nf4_at(q, map, code, (long)gr * wcols + gc + j) : 0.0f;
                h[j >> 1] |= (u32)T::from_f32(v) << (16 * (j & 1));
            }
        }
        const u32 at = dst + (c8 / 8) * (ROWS * 128) + swizzled(r, c8 % 8);
        st_shared_v4(at, h);
    }
}

// AKM: A1 and A2 stored [K, M] (dense B stored [K, N] only: dW = dY^T.X over the tokens): A's
// K tile arrives as two 64 x 64 boxes side by side along M, one per consumer warpgroup, read
// MN-major (imm-trans-a 1) with the descriptor B's [K, N] layout uses.
template <typename T, bool AKM, bool KN, bool NF4>
__device__ __forceinline__ void gemm_sm90_body(const TensorMap* ta1, const TensorMap* tb1, const TensorMap* ta2, const TensorMap* tb2, const unsigned short* bias, unsigned short* c, float* c32, int m, int n, int k1, int k2, float alpha, int add_c, const Nf4& q) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) u64 full[SM90_STAGES], empty[SM90_STAGES];
    __shared__ float tables[NF4 ? 272 : 1];
    if (NF4)
        for (int i = threadIdx.x; i < 272; i += SM90_THREADS) tables[i] = q.tables[i];
    const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // the launcher adds 1 KiB of slack

    // This block's output tile, in groups of GROUP_M row tiles.
    const int tiles_m = (m + SM90_BM - 1) / SM90_BM, tiles_n = (n + SM90_BN - 1) / SM90_BN;
    const int per_group = GROUP_M * tiles_n, first = (blockIdx.x / per_group) * GROUP_M;
    const int rows = min(tiles_m - first, GROUP_M), in_group = blockIdx.x % per_group;
    const int m0 = (first + in_group % rows) * SM90_BM, n0 = (in_group / rows) * SM90_BN;
    const int tiles1 = (k1 + SM90_BK - 1) / SM90_BK, tiles = tiles1 + (k2 + SM90_BK - 1) / SM90_BK;

    if (threadIdx.x == 0) {
        for (int s = 0; s < SM90_STAGES; s++) {
            mbar_init(&full[s], NF4 ? 129 : 1);  // NF4: + one arrival per producer thread
            mbar_init(&empty[s], 8);
        }
        mbar_init_fence();
    }
    __syncthreads();

    const int wg = threadIdx.x / 128;
    if (wg == 0) {
        // Producer: tile kt goes to stage kt % STAGES once the consumers released the tile
        // that stage held before (kt - STAGES), i.e. once phase kt / STAGES - 1 of its `empty`
        // barrier completed.
        // Dense: thread 0 alone issues the TMA loads of A and B. NF4: all 128 threads; thread
        // 0 issues the TMA loads (A; B too in the LoRA phase), every thread dequantizes its
        // share of the W tile in the first phase, makes its stores visible to the tensor cores
        // (the async proxy) and arrives.
        const bool issuer = threadIdx.x == 0;
        if (NF4 || issuer) {
            for (int kt = 0; kt < tiles; kt++) {
                const int s = kt % SM90_STAGES;
                if (kt >= SM90_STAGES) mbar_wait(&empty[s], (u32)((kt / SM90_STAGES - 1) & 1));
                const u32 a_s = base + s * STAGE_BYTES, b_s = a_s + A_BYTES;
                const bool second = kt >= tiles1, dequant = NF4 && !second;
                const int k0 = (second ? kt - tiles1 : kt) * SM90_BK;
                if (issuer) {
                    mbar_expect_tx(&full[s], dequant ? A_BYTES : STAGE_BYTES);
                    if (AKM) {
                        for (int j = 0; j < SM90_BM / 64; j++) tma_load(a_s + j * 8192, second ? ta2 : ta1, m0 + 64 * j, k0, &full[s]);
                    } else {
                        tma_load(a_s, second ? ta2 : ta1, k0, m0, &full[s]);
                    }
                    if (!dequant) tma_load_b<KN>(b_s, second ? tb2 : tb1, n0, k0, &full[s]);
                }
                if (NF4) {
                    if (dequant) {
                        if (KN) nf4_tile<T, SM90_BK, SM90_BN>(b_s, q, tables, tables + 256, k1, n, k0, n0);
                        else nf4_tile<T, SM90_BN, SM90_BK>(b_s, q, tables, tables + 256, n, k1, n0, k0);
                        fence_proxy_async();
                    }
                    mbar_arrive(&full[s]);
                }
            }
        }
        return;
    }

    // Consumers: warpgroup 1 takes rows 0..63 of the tile, warpgroup 2 rows 64..127.
    const int cw = wg - 1, lane = threadIdx.x & 31;
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; i++) d[i] = 0.0f;
    wgmma_operand_fence<128>(d);  // the zeros stay above the first wgmma
    for (int kt = 0; kt < tiles; kt++) {
        const int s = kt % SM90_STAGES;
        mbar_wait(&full[s], (u32)((kt / SM90_STAGES) & 1));
        // This warpgroup's 64 rows of A: 64 rows of 128 bytes (K-major), or its own 64 x 64 box
        // (AKM): 8 KiB in either layout.
        const u32 a_s = base + s * STAGE_BYTES + cw * 8192, b_s = base + s * STAGE_BYTES + A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < SM90_BK / 16; ks++) {
            const u64 da = AKM ? smem_desc(a_s + ks * 2048, 8192, 1024) : smem_desc(a_s + ks * 32, 16, 1024);
            const u64 db = KN ? smem_desc(b_s + ks * 2048, 8192, 1024) : smem_desc(b_s + ks * 32, 16, 1024);
            wgmma_256<AKM ? 1 : 0, KN ? 1 : 0>(T{}, d, da, db);
        }
        wgmma_commit();
        wgmma_wait<1>();  // tile kt - 1's products are done: its stage may be refilled
        if (kt > 0 && lane == 0) mbar_arrive(&empty[(kt - 1) % SM90_STAGES]);
    }
    wgmma_wait<0>();
    wgmma_operand_fence<128>(d);  // the epilogue's reads stay below the wait

    // Epilogue. Thread t of the warpgroup (warp w, lane l) holds, for each 8-column slice j,
    // d[4j], d[4j+1] at row 16w + l/4, columns 8j + 2(l%4) and +1, and d[4j+2], d[4j+3] 8 rows
    // below (mma.sync's C layout, repeated along N).
    const int t = threadIdx.x & 127;
    const int r0 = m0 + cw * 64 + (t >> 5) * 16 + (lane >> 2);
    const bool pairs = c32 == nullptr && (n & 1) == 0 && ((u64)c & 3) == 0;
#pragma unroll
    for (int j = 0; j < SM90_BN / 8; j++) {
        const int col = n0 + 8 * j + 2 * (lane & 3);
        if (col >= n) continue;
        const bool two = col + 1 < n;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias != nullptr) {
            b0 = T::to_f32(bias[col]);
            if (two) b1 = T::to_f32(bias[col + 1]);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = r0 + 8 * h;
            if (row >= m) continue;
            float v0 = alpha * d[4 * j + 2 * h] + b0, v1 = alpha * d[4 * j + 2 * h + 1] + b1;
            const long o = (long)row * n + col;
            if (c32 != nullptr) {  // f32 C, added to what it holds with add_c (dW over chunks)
                c32[o] = add_c ? c32[o] + v0 : v0;
                if (two) c32[o + 1] = add_c ? c32[o + 1] + v1 : v1;
                continue;
            }
            if (add_c) {  // c += C: dX summed over the linears that read one input
                v0 += T::to_f32(c[o]);
                if (two) v1 += T::to_f32(c[o + 1]);
            }
            if (pairs) {
                *reinterpret_cast<u32*>(c + o) = (u32)T::from_f32(v0) | ((u32)T::from_f32(v1) << 16);
            } else {
                c[o] = T::from_f32(v0);
                if (two) c[o + 1] = T::from_f32(v1);
            }
        }
    }
}

#define SM90_PARAMS                                                                                                  \
    const __grid_constant__ TensorMap ta1, const __grid_constant__ TensorMap tb1, const __grid_constant__ TensorMap ta2, \
        const __grid_constant__ TensorMap tb2, const unsigned short *bias, unsigned short *c, float *c32, int m, int n, int k1, int k2, float alpha, int add_c
#define SM90_ARGS &ta1, &tb1, &ta2, &tb2, bias, c, c32, m, n, k1, k2, alpha, add_c

// Dense: B1, B2 stored [N, K] (forward) or [K, N] (_kn, dX); A stored [K, M] too (_km_kn, dW).
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_bf16(SM90_PARAMS) { gemm_sm90_body<Bf16, false, false, false>(SM90_ARGS, Nf4{}); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_f16(SM90_PARAMS) { gemm_sm90_body<F16, false, false, false>(SM90_ARGS, Nf4{}); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_kn_bf16(SM90_PARAMS) { gemm_sm90_body<Bf16, false, true, false>(SM90_ARGS, Nf4{}); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_kn_f16(SM90_PARAMS) { gemm_sm90_body<F16, false, true, false>(SM90_ARGS, Nf4{}); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_km_kn_bf16(SM90_PARAMS) { gemm_sm90_body<Bf16, true, true, false>(SM90_ARGS, Nf4{}); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) gemm_sm90_km_kn_f16(SM90_PARAMS) { gemm_sm90_body<F16, true, true, false>(SM90_ARGS, Nf4{}); }
// NF4: W (B1) dequantized by the producer warpgroup from `packed` (tb1 unused), forward and dX.
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) nf4_gemm_sm90_bf16(SM90_PARAMS, NF4_PARAMS) { gemm_sm90_body<Bf16, false, false, true>(SM90_ARGS, NF4_ARGS); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) nf4_gemm_sm90_f16(SM90_PARAMS, NF4_PARAMS) { gemm_sm90_body<F16, false, false, true>(SM90_ARGS, NF4_ARGS); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) nf4_gemm_sm90_kn_bf16(SM90_PARAMS, NF4_PARAMS) { gemm_sm90_body<Bf16, false, true, true>(SM90_ARGS, NF4_ARGS); }
extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) nf4_gemm_sm90_kn_f16(SM90_PARAMS, NF4_PARAMS) { gemm_sm90_body<F16, false, true, true>(SM90_ARGS, NF4_ARGS); }
