// Hopper (sm_90a) warpgroup MMA helpers shared by gemm_sm90.cu and flash_attention_sm90.cu:
// shared-memory matrix descriptors in the 128-byte swizzle, the wgmma fence / commit / wait,
// and the accumulator operand lists of the m64nN shapes the kernels use.
//
// Layout both kernels keep in shared memory (the one TMA's 128-byte swizzle writes): a tile is
// stored as chunks of 64 16-bit columns; a chunk is rows of 128 bytes, its 16-byte piece c of
// row r at piece c ^ (r % 8), 1024-byte aligned (the swizzle repeats every 8 rows).
// - K-major operand (its rows run along the MMA's K: A; B stored [N, K]): descriptor with SBO
//   1024 (8-row groups), LBO unused; the k16 slice ks of a chunk starts 32 * (ks % 4) bytes in.
// - MN-major B (stored [K, N], N contiguous; imm-trans-b 1): LBO = the byte distance between
//   64-column chunks along N, SBO 1024 (8 K-rows); the k16 slice ks starts 16 rows (2048
//   bytes) further.
// Accumulators of m64nN (f32): thread t of the warpgroup (warp w = t / 32, lane l) holds, for
// each 8-column slice j, d[4j], d[4j+1] at row 16w + l/4, columns 8j + 2(l%4) and +1, and
// d[4j+2], d[4j+3] 8 rows below: mma.sync's m16n8 C layout, one warp per 16 rows.
#pragma once
#include "common.cuh"

typedef unsigned long long u64;

// Start address, leading and stride byte offsets (each stored >> 4), swizzle mode 1 (128 B).
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | (1ull << 62);
}

// Byte offset of the 16-byte piece `piece` (0..7) of row `r` in a swizzled 128-byte-row chunk.
__device__ __forceinline__ u32 swizzled(int r, int piece) { return (u32)(r * 128 + ((piece ^ (r & 7)) << 4)); }

#ifdef TUNA_CUDA_EMU  // compiled as host C++ (tools/cuda-emu): the emulator's warpgroup instructions
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { emu::wgmma_commit(); }
template <int N> __device__ __forceinline__ void wgmma_wait() { emu::wgmma_wait(N); }
// Hands the generic proxy's shared-memory writes to the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { emu::fence_proxy_async(); }
// 4 or 16 bytes to a shared-window address.
__device__ __forceinline__ void st_shared_u32(u32 addr, u32 v) { emu::st_shared(addr, &v, 4); }
__device__ __forceinline__ void st_shared_v4(u32 addr, const u32* v) { emu::st_shared(addr, v, 16); }
#else
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void st_shared_u32(u32 addr, u32 v) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory"); }
__device__ __forceinline__ void st_shared_v4(u32 addr, const u32* v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]) : "memory");
}
#endif

// "+f" operands of 8 / 32 accumulators from d[i].
#define ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define ACC32(i) ACC8(i), ACC8(i + 8), ACC8(i + 16), ACC8(i + 24)

// The register lists of 32, 64 and 128 accumulators (operands %0 ...).
#define WG_D32                                                      \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"       \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define WG_D64                                                      \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"       \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define WG_D128                                                                     \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                       \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"              \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"              \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"              \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"              \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"              \
    "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"  \
    "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}"

// Keeps the compiler from moving reads or writes of N accumulators across this point: to it they
// are plain registers, which a wgmma asm statement names as operands only where it issues, not
// where the hardware finishes writing them (at the wait).
#ifdef TUNA_CUDA_EMU  // the accumulators are memory the emulator writes through a pointer
template <int N> __device__ __forceinline__ void wgmma_operand_fence(float*) {}
#else
template <int N> __device__ __forceinline__ void wgmma_operand_fence(float* d);
template <> __device__ __forceinline__ void wgmma_operand_fence<32>(float* d) { asm volatile("" : ACC32(0)::"memory"); }
template <> __device__ __forceinline__ void wgmma_operand_fence<64>(float* d) { asm volatile("" : ACC32(0), ACC32(32)::"memory"); }
template <> __device__ __forceinline__ void wgmma_operand_fence<128>(float* d) { asm volatile("" : ACC32(0), ACC32(32), ACC32(64), ACC32(96)::"memory"); }
#endif
