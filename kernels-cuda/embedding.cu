// Embedding gather (forward) and its scatter-add (backward).
//
//   forward:  y[t, :] = table[ids[t], :]
//   backward: dtable[v, :] += sum over t with ids[t] == v of dy[t, :]   (ids get no gradient)
//
// Shapes: table, dtable [V, E]; ids [T] i32; y, dy [T, E]. Storage f32 or bf16 (the backward
// sums in f32). An id outside [0, V) reads as a zero row and scatters nothing; the host
// checks ids before they reach a kernel (kernels::embedding::check_ids).
//
// Backward without atomics, deterministic: the first token t of each distinct id (its
// "head") owns dtable row ids[t] and adds the rows of dy of every token with that id, in
// token order, so the sums (and their rounding) are the same on every run and the same as the
// CPU path's. One block of EMB_BLOCK threads per token (grid.x = T):
//   1. head check: the block scans ids[0..t) in chunks of EMB_BLOCK (__syncthreads_or) and
//      exits at the first chunk holding its id;
//   2. the head scans ids[t..T) in chunks; each chunk's matches are compacted, in order, into
//      a shared list (warp ballots plus per-warp counts), and each thread adds the listed rows
//      of dy into its columns of dtable[v, :] (threads stride over E).
// Cost: O(T^2 / EMB_BLOCK) id reads per block at worst (cached, coalesced) and one read of
// each dy row; a frequent id costs its head one pass over its rows, with independent loads.
#include "common.cuh"

#define EMB_BLOCK 256

template <typename T>
__device__ void embedding_fwd(const T* __restrict__ table, const int* __restrict__ ids, T* __restrict__ y, int tokens,
                              int vocab, int E) {
    const long t = blockIdx.x;
    if (t >= tokens) return;
    const int v = ids[t];
    const bool ok = v >= 0 && v < vocab;
    for (int e = threadIdx.x; e < E; e += blockDim.x) y[t * E + e] = ok ? table[(long)v * E + e] : T(0);
}

// Writes the j of every thread with `hit` into list[0..count) in thread order; returns count
// (in every thread). blockDim.x == EMB_BLOCK.
__device__ __forceinline__ int block_compact(bool hit, int j, int* list, int* warp_counts) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < EMB_BLOCK / 32; ++w) {
        const int c = warp_counts[w];
        before += w < warp ? c : 0;
        total += c;
    }
    if (hit) list[before + __popc(ballot & ((1u << lane) - 1u))] = j;
    __syncthreads();
    return total;
}

template <typename T>
__device__ void embedding_bwd(const T* __restrict__ dy, const int* __restrict__ ids, T* __restrict__ dtable, int tokens,
                              int vocab, int E) {
    __shared__ int list[EMB_BLOCK];
    __shared__ int warp_counts[EMB_BLOCK / 32];
    const int t = blockIdx.x;
    if (t >= tokens) return;
    const int v = ids[t];
    if (v < 0 || v >= vocab) return;
    // 1. Not the first token with this id: that token's block owns the row.
    for (int base = 0; base < t; base += EMB_BLOCK) {
        const int j = base + threadIdx.x;
        if (__syncthreads_or(j < t && ids[j] == v)) return;
    }
    // 2. The head: add the matching rows of dy, chunk by chunk, in token order.
    T* row = dtable + (long)v * E;
    for (int base = t; base < tokens; base += EMB_BLOCK) {
        const int j = base + threadIdx.x;
        const int count = block_compact(j < tokens && ids[j] == v, j, list, warp_counts);
        if (count == 0) continue;
        for (int e = threadIdx.x; e < E; e += EMB_BLOCK) {
            float acc = Elem<T>::load(row, e);
            for (int k = 0; k < count; ++k) acc += Elem<T>::load(dy, (long)list[k] * E + e);
            Elem<T>::store(row, e, acc);
        }
        __syncthreads();  // the list is rewritten by the next chunk
    }
}

// ---- entry points -------------------------------------------------------------------------
extern "C" __global__ void embedding_fwd_f32(const float* table, const int* ids, float* y, int T, int V, int E) {
    embedding_fwd<float>(table, ids, y, T, V, E);
}
extern "C" __global__ void embedding_fwd_bf16(const bf16_bits* table, const int* ids, bf16_bits* y, int T, int V, int E) {
    embedding_fwd<bf16_bits>(table, ids, y, T, V, E);
}
extern "C" __global__ void __launch_bounds__(EMB_BLOCK) embedding_bwd_f32(const float* dy, const int* ids, float* dtable, int T, int V, int E) {
    embedding_bwd<float>(dy, ids, dtable, T, V, E);
}
extern "C" __global__ void __launch_bounds__(EMB_BLOCK) embedding_bwd_bf16(const bf16_bits* dy, const int* ids, bf16_bits* dtable, int T, int V, int E) {
    embedding_bwd<bf16_bits>(dy, ids, dtable, T, V, E);
}
