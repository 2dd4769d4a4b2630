// The CUDA C++ subset tuna's sm_80 kernels use, for compiling them as host C++ (g++ -include
// emu.h). Each CUDA thread of a block runs as a fiber; blocks run one after another. Warp
// instructions (shuffles, ballots, ldmatrix, mma.sync) complete when the last lane of the warp
// arrives, for all 32 lanes at once, as on the hardware; cp.async copies land at the
// cp.async.wait_group that waits for them, the latest moment the PTX rules allow. A barrier that
// some threads never reach, or a warp instruction a lane never reaches, is a deadlock the
// emulator reports with the kernel's name instead of hanging.
//
// Races: fibers switch only at barriers and warp instructions, and the scheduler (runtime.cpp)
// runs warps as far apart as the barriers allow, in alternating orders, so a missing barrier
// shows as a wrong value. Every load and store in a kernel is checked for its type's alignment
// (g++'s -fsanitize=alignment, its handler in runtime.cpp): a uint4 access off a 16-byte
// boundary fails the launch, as the GPU faults on it. Not emulated: timing.
//
// The sm_90a kernels (gemm_sm90.cu, flash_attention_sm90.cu) run when the emulated device is
// compute capability 9.0 (TUNA_CUDA_EMU_CC=90): wgmma as a warpgroup instruction reading its
// operands through the shared-memory descriptors, TMA tensor copies through the tensor map the
// emulated cuTensorMapEncodeTiled packed, mbarriers with arrival and transaction counts. The
// asynchronous parts happen at the two ends of what PTX allows, in turn: in odd blocks a TMA
// copy lands at the first wait on its mbarrier and a wgmma reads its operands and writes its
// accumulators at issue; in even blocks the copy lands at issue and the wgmma runs at the
// wait_group that waits for it. A missing wait shows in the first, a stage handed back before
// the wgmma reading it completed in the second.
#pragma once
#include <math.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define TUNA_CUDA_EMU 1
#ifndef TUNA_CUDA_EMU_SCAN  // build.sh finds the kernels by preprocessing with __global__ kept
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// Static locals are shared by every thread of the block: blocks run one at a time.
#define __shared__ static

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };  // 16-byte aligned, as CUDA's
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace emu {
// The running fiber's coordinates, set by the scheduler before it resumes a fiber.
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
void sync_block();
bool sync_block_or(bool pred);
// A warp instruction: this lane's `in` (`bytes` bytes) joins the warp's; when every lane has
// arrived, `op` computes all 32 outputs from the 32 inputs; this lane's output is copied to
// `out`.
typedef void (*WarpOp)(const unsigned char* in, unsigned char* out, int bytes_in, int bytes_out, long arg);
void warp_op(const void* in, int bytes_in, void* out, int bytes_out, WarpOp op, long arg);
unsigned char* dynamic_smem();
void cp_async(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }
inline int __syncthreads_or(int pred) { return emu::sync_block_or(pred != 0); }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
namespace emu {
// The 32-bit shared-window address of a byte of dynamic shared memory (what the sm_90a
// kernels put in descriptors, TMA destinations and st.shared), and back, checked against the
// launch's dynamic shared memory.
unsigned shared_addr(const void* p);
unsigned char* shared_ptr(unsigned addr, int bytes);
void st_shared(unsigned addr, const void* src, int bytes);  // st.shared of 4 to 16 bytes, aligned
}  // namespace emu
inline unsigned __cvta_generic_to_shared(const void* p) { return emu::shared_addr(p); }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// CUDA's integer min/max, for any mix of integer types (as its overloads resolve them).
template <typename A, typename B> inline typename std::common_type<A, B>::type min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }

// Atomics: fibers switch only at barriers and warp instructions, so a plain update is atomic.
inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
inline unsigned atomicMax(unsigned* p, unsigned v) { unsigned old = *p; if (v > old) *p = v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p = old + v; return old; }
// Blocks run one after another, so every store of an earlier block is visible: a fence and an
// L2 load are plain.
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }

namespace emu {
template <typename T> void shfl_xor_op(const unsigned char* in, unsigned char* out, int bi, int bo, long mask) {
    for (int l = 0; l < 32; l++) std::memcpy(out + l * bo, in + (l ^ (int)mask) * bi, sizeof(T));
}
inline void ballot_op(const unsigned char* in, unsigned char* out, int bi, int bo, long) {
    unsigned m = 0;
    for (int l = 0; l < 32; l++) m |= (unsigned)(in[l * bi] != 0) << l;
    for (int l = 0; l < 32; l++) std::memcpy(out + l * bo, &m, 4);
}
void check_full_mask(unsigned mask, const char* what);
}  // namespace emu

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    emu::check_full_mask(mask, "__shfl_xor_sync");
    T r;
    emu::warp_op(&v, sizeof(T), &r, sizeof(T), emu::shfl_xor_op<T>, lane_mask & 31);
    return r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    emu::check_full_mask(mask, "__ballot_sync");
    unsigned char p = pred != 0;
    unsigned r;
    emu::warp_op(&p, 1, &r, 4, emu::ballot_op, 0);
    return r;
}

// The tensor-core instructions of mma.cuh, by their PTX definitions (PTX ISA, "Matrix fragments
// for mma.m16n8k16" and "ldmatrix").
namespace emu {
// One 16-bit element to f32: bf16 is the high half of an f32; f16 widened exactly.
float f16_to_f32(unsigned short h);
unsigned short f32_to_f16(float f);
template <bool BF16> inline float wide(unsigned short h) { return BF16 ? __uint_as_float((unsigned)h << 16) : f16_to_f32(h); }
// Lane inputs: a[4], b[2] (u32 pairs of 16-bit values), c[4] (f32); output d[4].
template <bool BF16> void mma_op(const unsigned char* in, unsigned char* out, int bi, int bo, long) {
    // Rebuild A (16x16, row-major) and B (16x8, as B[k][n]) from the fragments.
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const unsigned* a = (const unsigned*)(in + l * bi);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; i++)
            for (int h = 0; h < 2; h++) {
                const int row = g + 8 * (i & 1), col = 2 * t + h + 8 * (i >> 1);
                A[row][col] = wide<BF16>((unsigned short)(a[i] >> (16 * h)));
            }
        for (int i = 0; i < 2; i++)
            for (int h = 0; h < 2; h++) B[2 * t + h + 8 * i][g] = wide<BF16>((unsigned short)(a[4 + i] >> (16 * h)));
    }
    for (int l = 0; l < 32; l++) {
        const float* c = (const float*)(in + l * bi + 24);
        float* d = (float*)(out + l * bo);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; i++) {
            const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            float acc = c[i];
            for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
            d[i] = acc;
        }
    }
}
// Lane inputs: one row address each (lanes 8i..8i+7 give the rows of matrix i); output r[4].
template <bool TRANS> void ldmatrix_op(const unsigned char* in, unsigned char* out, int bi, int bo, long) {
    for (int l = 0; l < 32; l++) {
        unsigned* r = (unsigned*)(out + l * bo);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; i++) {
            unsigned short v[2];
            for (int h = 0; h < 2; h++) {
                const unsigned short* row;
                int col;
                if (TRANS) { std::memcpy(&row, in + (8 * i + 2 * t + h) * bi, sizeof row); col = g; }
                else { std::memcpy(&row, in + (8 * i + g) * bi, sizeof row); col = 2 * t + h; }
                v[h] = row[col];
            }
            r[i] = (unsigned)v[0] | (unsigned)v[1] << 16;
        }
    }
}
template <bool BF16> inline void mma16816(float* d, const unsigned* a, const unsigned* b) {
    unsigned char in[40];
    std::memcpy(in, a, 16);
    std::memcpy(in + 16, b, 8);
    std::memcpy(in + 24, d, 16);
    warp_op(in, 40, d, 16, mma_op<BF16>, 0);
}
void misaligned(const char* what, const void* p);
template <bool TRANS> inline void ldmatrix_x4(unsigned* r, const void* p) {
    if ((uintptr_t)p & 15) misaligned("ldmatrix row address", p);  // a fault on the hardware
    warp_op(&p, sizeof p, r, 16, ldmatrix_op<TRANS>, 0);
}
}  // namespace emu

// Hopper (sm_90a): mbarriers, TMA tensor copies, wgmma (PTX ISA: "mbarrier",
// "cp.async.bulk.tensor", "Asynchronous Warpgroup Level Matrix Multiply-Accumulate").
namespace emu {
void mbar_init(unsigned long long* bar, unsigned count);
// One arrival, after adding `tx_bytes` to the transactions the current phase waits for.
void mbar_arrive(unsigned long long* bar, unsigned tx_bytes);
// Returns once the phase of parity `parity` has completed.
void mbar_wait(unsigned long long* bar, unsigned parity);
// cp.async.bulk.tensor.2d: the box at (c0, c1) of the tensor map `map` (host-packed, see
// cuTensorMapEncodeTiled in runtime.cpp) to shared address `dst`, completing on `bar`.
void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned long long* bar);
// wgmma.mma_async m64nNk16, f32 accumulators `d` (this thread's N / 2), scale-d and the
// operand scales 1: A from the descriptor `da` (or, when `a` is not null, from this thread's
// four registers), B from `db`; trans_a / trans_b are imm-trans-a / imm-trans-b.
void wgmma(bool bf16, float* d, int n, unsigned long long da, const unsigned* a, unsigned long long db, int trans_a, int trans_b);
void wgmma_commit();
void wgmma_wait(int pending);
void red_add_v2(float* p, float a, float b);
// fence.proxy.async: this thread's earlier st.shared and cp.async writes become readable by
// wgmma (a wgmma reading a byte still unfenced fails the launch).
void fence_proxy_async();
}  // namespace emu
