// The sm_90a instructions of the emulated device (emu.h says what they model): the shared-memory
// window, the async proxy's fences, mbarriers, TMA tensor copies and wgmma.
#include <algorithm>
#include <cstdio>

#include "launch.h"

namespace emu {
using namespace rt;

namespace {
bool in_dynamic_smem(const void* p) {
    const unsigned char* b = (const unsigned char*)p;
    return b >= L->dyn_smem && b < L->dyn_smem + DYN_SMEM;
}
// The running thread as `unfenced_by` records it: 1 + its index in the block.
unsigned short writer_tag() { return (unsigned short)(L->current - L->fibers.data() + 1); }
}  // namespace

// A generic-proxy write by the running thread: unfenced until its next fence.proxy.async.
void rt::generic_write(void* p, unsigned bytes) {
    if (!in_dynamic_smem(p)) return;  // static shared memory: no async reader
    const unsigned off = (unsigned)((unsigned char*)p - L->dyn_smem);
    std::fill_n(&L->unfenced_by[off], bytes, writer_tag());
    L->current->unfenced.emplace_back(off, bytes);
}

void fence_proxy_async() {
    Fiber& f = *L->current;
    const unsigned short me = writer_tag();
    for (auto [off, bytes] : f.unfenced)
        for (unsigned i = 0; i < bytes; i++)
            if (L->unfenced_by[off + i] == me) L->unfenced_by[off + i] = 0;
    f.unfenced.clear();
}

unsigned shared_addr(const void* p) {
    if (!in_dynamic_smem(p)) fail("the shared-window address of memory outside dynamic shared memory (not emulated)");
    return SHARED_BASE + (unsigned)((const unsigned char*)p - L->dyn_smem);
}

unsigned char* shared_ptr(unsigned addr, int bytes) {
    if (addr < SHARED_BASE || addr - SHARED_BASE + (unsigned long)bytes > L->dyn_bytes) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "shared memory access of %d bytes at window address %u, outside the launch's %u bytes of dynamic shared memory (from %u)", bytes,
                      addr, L->dyn_bytes, SHARED_BASE);
        fail(buf);
    }
    return L->dyn_smem + (addr - SHARED_BASE);
}

void st_shared(unsigned addr, const void* src, int bytes) {
    if (addr % bytes) fail("misaligned st.shared of " + std::to_string(bytes) + " bytes at window address " + std::to_string(addr));
    unsigned char* p = shared_ptr(addr, bytes);
    std::memcpy(p, src, bytes);
    generic_write(p, bytes);
}

namespace {
// The 128-byte swizzle, a function of the shared address: its 16-byte piece (bits 4-6) is XORed
// with its 128-byte row within 1024 bytes (bits 7-9).
unsigned swizzle128(unsigned addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

Mbarrier& mbarrier(const void* bar) {
    auto it = L->mbarriers.find(bar);
    if (it == L->mbarriers.end()) fail("an mbarrier used before mbarrier.init (or not in shared memory)");
    return it->second;
}

void complete_tx(Mbarrier& b, long long bytes) {
    b.tx -= bytes;
    if (b.pending == 0 && b.tx == 0) {
        b.phase++;
        b.pending = b.count;
    }
}

void land_copy(const TmaCopy& c, Mbarrier& b) {
    const TensorMap2d& m = c.map;
    const unsigned es = m.elem_bytes;
    for (unsigned r = 0; r < m.box[1]; r++)
        for (unsigned e = 0; e < m.box[0]; e++) {
            const long long x = (long long)c.c0 + e, y = (long long)c.c1 + r;
            unsigned addr = c.dst + (r * m.box[0] + e) * es;
            if (m.swizzle_bytes == 128) addr = swizzle128(addr);
            unsigned char* dst = shared_ptr(addr, es);
            std::fill_n(&L->unfenced_by[dst - L->dyn_smem], es, 0);  // the async proxy's own write
            if (x >= 0 && y >= 0 && (unsigned long long)x < m.dim[0] && (unsigned long long)y < m.dim[1])
                std::memcpy(dst, (const unsigned char*)m.addr + y * m.stride + x * es, es);
            else
                std::memset(dst, 0, es);  // out of the tensor: zero (OOB fill none)
        }
    complete_tx(b, (long long)m.box[0] * m.box[1] * es);
}

}  // namespace

void rt::land(Mbarrier& b) {
    std::vector<TmaCopy> copies;
    copies.swap(b.inflight);
    for (const TmaCopy& c : copies) land_copy(c, b);
}

void mbar_init(unsigned long long* bar, unsigned count) {
    if ((uintptr_t)bar & 7) misaligned("mbarrier", bar);
    if (count == 0 || count >= (1u << 20)) fail("mbarrier.init with count " + std::to_string(count));
    Mbarrier& b = L->mbarriers[bar];
    b = Mbarrier();
    b.count = b.pending = count;
}

void mbar_arrive(unsigned long long* bar, unsigned tx_bytes) {
    Mbarrier& b = mbarrier(bar);
    if (b.pending == 0) fail("more arrivals on an mbarrier than its count in one phase");
    b.tx += tx_bytes;
    b.pending--;
    complete_tx(b, 0);
}

void mbar_wait(unsigned long long* bar, unsigned parity) {
    Mbarrier& b = mbarrier(bar);
    Fiber& f = *L->current;
    land(b);  // copies that complete on it land now at the latest
    if ((b.phase & 1) != (parity & 1)) return;
    f.mbar = &b;
    f.parity = parity & 1;
    f.state = AT_MBARRIER;
    yield();
}

void tma_load_2d(unsigned dst, const void* map, int c0, int c1, unsigned long long* bar) {
    TmaCopy c{dst, {}, c0, c1};
    std::memcpy(&c.map, map, sizeof c.map);
    if (std::memcmp(c.map.magic, MAP_MAGIC, sizeof MAP_MAGIC) != 0) fail("cp.async.bulk.tensor with a tensor map cuTensorMapEncodeTiled did not make");
    const unsigned align = c.map.swizzle_bytes == 128 ? 1024 : 128;
    if (dst % align) fail("cp.async.bulk.tensor to window address " + std::to_string(dst) + ", not " + std::to_string(align) + "-byte aligned");
    shared_ptr(dst, (int)(c.map.box[0] * c.map.box[1] * c.map.elem_bytes));  // the box fits
    Mbarrier& b = mbarrier(bar);
    if (L->late_copies) b.inflight.push_back(c);
    else land_copy(c, b);
}

namespace {
// The shared address of element (mn, k) of a wgmma operand from its descriptor: K-major (trans
// 0): rows of the M or N dimension 128 bytes apart in groups of 8, groups SBO apart, K
// contiguous; MN-major (trans 1): 64-element chunks of the M or N dimension LBO apart, K rows
// 128 bytes apart in groups of 8, groups SBO apart. Both in the 128-byte swizzle (CUTLASS's
// canonical GMMA layouts, cute/atom/mma_traits_sm90_gmma.hpp).
unsigned operand_addr(unsigned long long desc, int mn, int k, int trans) {
    const unsigned start = (unsigned)(desc & 0x3FFF) << 4, lbo = (unsigned)((desc >> 16) & 0x3FFF) << 4, sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4;
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) fail("a wgmma descriptor other than the 128-byte swizzle with base offset 0 (not emulated)");
    const unsigned logical = trans ? start + (k % 8) * 128 + (k / 8) * sbo + (mn / 64) * lbo + (mn % 64) * 2 : start + (mn % 8) * 128 + (mn / 8) * sbo + k * 2;
    return swizzle128(logical);
}

float operand(bool bf16, unsigned addr) {
    unsigned short h;
    const unsigned char* p = shared_ptr(addr, 2);
    for (int i = 0; i < 2; i++)
        if (unsigned writer = L->unfenced_by[p - L->dyn_smem + i])
            fail("a wgmma reads shared memory (window address " + std::to_string(addr) + ") that thread " + std::to_string(writer - 1) +
                 " wrote by st.shared or cp.async with no fence.proxy.async after");
    std::memcpy(&h, p, 2);
    return bf16 ? __uint_as_float((unsigned)h << 16) : f16_to_f32(h);
}

// D (64 x n) += A (64 x 16) . B (16 x n), the 16 rows of one warp. Accumulators in the m64nN
// layout: lane l of warp quarter q holds d[4j + i] at row 16q + l/4 + 8 (i / 2), column 8j +
// 2 (l % 4) + i % 2. A from registers: mma.m16n8k16's A fragment of those 16 rows.
void run_wgmma(const Wgmma& op) {
    const WgInstr& in = op.in;
    const int r0 = 16 * op.quarter;
    static thread_local float A[16][16], B[16][256];
    for (int l = 0; l < 32 && in.a_regs; l++)
        for (int i = 0; i < 4; i++)
            for (int h = 0; h < 2; h++) {
                const int row = l / 4 + 8 * (i & 1), col = 2 * (l % 4) + h + 8 * (i >> 1);
                const unsigned short v = (unsigned short)(op.a[l][i] >> (16 * h));
                A[row][col] = in.bf16 ? __uint_as_float((unsigned)v << 16) : f16_to_f32(v);
            }
    for (int m = 0; m < 16 && !in.a_regs; m++)
        for (int k = 0; k < 16; k++) A[m][k] = operand(in.bf16, operand_addr(in.da, r0 + m, k, in.trans_a));
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < in.n; n++) B[k][n] = operand(in.bf16, operand_addr(in.db, n, k, in.trans_b));
    for (int l = 0; l < 32; l++)
        for (int j = 0; j < in.n / 8; j++)
            for (int i = 0; i < 4; i++) {
                const int row = l / 4 + 8 * (i >> 1), col = 8 * j + 2 * (l % 4) + (i & 1);
                float acc = op.d[l][4 * j + i];
                for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
                op.d[l][4 * j + i] = acc;
            }
}

// This lane joins its warp at the warpgroup instruction `in`; the last of the 32 to arrive
// carries out the warp's part for all of them (with each lane's accumulators and A
// registers), then all go on.
void warpgroup_op(const WgInstr& in, float* d, const unsigned* a) {
    Fiber& f = *L->current;
    if (L->threads % 128) fail("a warpgroup instruction in a block of " + std::to_string(L->threads) + " threads (not whole warpgroups)");
    WgmmaWarp& w = L->wgmma_warps[f.warp];
    if (w.arrived == 0) w.cur.in = in, w.cur.quarter = f.warp % 4;
    else if (w.cur.in != in) fail("the lanes of a warp reached different warpgroup instructions or operands");
    w.cur.d[f.lane] = d;
    if (a) std::memcpy(w.cur.a[f.lane], a, 16);
    if (++w.arrived < 32) {
        f.state = AT_WARPGROUP_OP;
        f.wait_gen = w.gen;
        yield();
        return;
    }
    w.arrived = 0;
    switch (in.kind) {
        case WG_MMA:
            if (L->late_copies) run_wgmma(w.cur);  // reads its operands and writes the accumulators at once
            else w.open.push_back(w.cur);          // at the wait_group that waits for it
            break;
        case WG_COMMIT:
            w.groups.push_back(std::move(w.open));
            w.open.clear();
            break;
        case WG_WAIT:
            while ((int)w.groups.size() > in.pending) {
                for (const Wgmma& op : w.groups.front()) run_wgmma(op);
                w.groups.erase(w.groups.begin());
            }
            break;
    }
    w.gen++;
}
}  // namespace

void wgmma(bool bf16, float* d, int n, unsigned long long da, const unsigned* a, unsigned long long db, int trans_a, int trans_b) {
    if (n < 8 || n > 256 || n % 8) fail("wgmma with n = " + std::to_string(n));
    if (a && trans_a) fail("wgmma with A in registers and imm-trans-a set");
    WgInstr in{WG_MMA};
    in.bf16 = bf16, in.a_regs = a != nullptr, in.n = n, in.trans_a = trans_a, in.trans_b = trans_b, in.da = a ? 0 : da, in.db = db;
    warpgroup_op(in, d, a);
}
void wgmma_commit() { warpgroup_op(WgInstr{WG_COMMIT}, nullptr, nullptr); }
void wgmma_wait(int pending) {
    WgInstr in{WG_WAIT};
    in.pending = pending;
    warpgroup_op(in, nullptr, nullptr);
}

void red_add_v2(float* p, float a, float b) {
    if ((uintptr_t)p & 7) misaligned("red.global.add.v2.f32 address", p);
    p[0] += a;
    p[1] += b;
}

}  // namespace emu
