// The emulated device: a fiber per CUDA thread, a scheduler per block, the sm_90a instructions
// (shared-memory window, mbarriers, TMA, wgmma), and the part of the CUDA driver API that cudarc
// and tuna call, exported under the driver's names so that the library
// built from this file loads as libcuda.so. Memory is host memory: each allocation ends at a
// guard page (an access past its 256-byte-rounded end faults at once) and starts filled with
// 0xff bytes (NaN in f32, bf16 and f16), so a kernel that reads memory nobody wrote shows NaN.
// Kernels run when launched, one launch at a time (a process-wide lock), so every stream and
// event is already complete when the host asks.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"
#include "registry.h"

// Switches stacks: saves the callee-saved registers on the current stack, stores its pointer in
// *from, and resumes the stack `to` (saved the same way, or prepared by `run_block`). x86-64
// System V; no system call, unlike swapcontext, which saves the signal mask each time.
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

enum State { READY, AT_BARRIER, AT_WARP_OP, AT_WARPGROUP_OP, AT_MBARRIER, DONE };
struct Copy { void* dst; const void* src; int bytes; };
struct Mbarrier;
struct Fiber {
    void* sp = nullptr;  // the saved stack pointer while suspended
    uint3 tid;
    int warp = 0, lane = 0;
    State state = READY;
    unsigned wait_gen = 0;
    Mbarrier* mbar = nullptr;  // AT_MBARRIER: the barrier and the parity of the phase awaited
    unsigned parity = 0;
    // Dynamic shared memory this thread wrote through the generic proxy (st.shared, cp.async)
    // since its last fence.proxy.async, as (offset, bytes).
    std::vector<std::pair<unsigned, unsigned>> unfenced;
    std::vector<Copy> open;                  // cp.async copies not yet committed
    std::vector<std::vector<Copy>> groups;   // committed groups, oldest first
};
constexpr int LANE_BYTES = 64;
struct WarpState {
    int lanes = 32, arrived = 0;
    unsigned gen = 0;
    WarpOp op = nullptr;
    long arg = 0;
    int bytes_in = 0, bytes_out = 0;
    unsigned char in[2][32 * LANE_BYTES], out[2][32 * LANE_BYTES];
};

constexpr size_t STACK = 256 << 10;
constexpr size_t DYN_SMEM = 232448;  // an H100's opt-in limit per block
// The shared-window address of dynamic shared memory's first byte: as if 1040 bytes of static
// shared memory came first, so it is not 1024-byte aligned and the kernels' own alignment of
// their swizzled tiles is exercised.
constexpr unsigned SHARED_BASE = 1040;

// A tensor map as the emulated cuTensorMapEncodeTiled packs it into the 128-byte CUtensorMap.
struct TensorMap2d {
    char magic[8];
    unsigned elem_bytes, swizzle_bytes;  // swizzle: 0 or 128
    unsigned long long addr, dim[2], stride;  // stride: bytes between rows (dim 1)
    unsigned box[2];
};
static_assert(sizeof(TensorMap2d) <= 128, "a tensor map is 128 bytes");
constexpr char MAP_MAGIC[8] = "tunaTMA";
struct TmaCopy { unsigned dst; TensorMap2d map; int c0, c1; };
// An mbarrier: arrivals pending in the current phase, its transaction count, the phases
// completed, and (in blocks that land copies late) the TMA copies that complete on it.
struct Mbarrier {
    unsigned count = 0, pending = 0, phase = 0;
    long long tx = 0;
    std::vector<TmaCopy> inflight;
};
// A warpgroup instruction: what it is and its uniform operands (every thread must agree).
enum WgKind { WG_MMA, WG_COMMIT, WG_WAIT };
struct WgInstr {
    WgKind kind;
    bool bf16 = false, a_regs = false;
    int n = 0, trans_a = 0, trans_b = 0, pending = 0;
    unsigned long long da = 0, db = 0;
    bool operator!=(const WgInstr& o) const {
        return kind != o.kind || bf16 != o.bf16 || a_regs != o.a_regs || n != o.n || trans_a != o.trans_a || trans_b != o.trans_b || pending != o.pending ||
               da != o.da || db != o.db;
    }
};
// One warp's part of a wgmma.mma_async (its 16 rows of the 64): the operands, and each lane's
// accumulators and A registers.
struct Wgmma {
    WgInstr in;
    int quarter = 0;  // the warp's place in its warpgroup: rows 16 * quarter ..
    float* d[32];
    unsigned a[32][4];
};
// A warp's wgmma state. The warpgroup instructions are .sync.aligned: they synchronize the 32
// lanes of a warp, not the 4 warps of a warpgroup, so each warp's part runs on its own (what a
// missing barrier between warps that write an operand and the wgmma reading it shows).
struct WgmmaWarp {
    int arrived = 0;
    unsigned gen = 0;
    Wgmma cur;                               // the instruction being joined
    std::vector<Wgmma> open;                 // issued, not yet committed (even blocks)
    std::vector<std::vector<Wgmma>> groups;  // committed, oldest first (even blocks)
};

struct Launch {
    const char* kernel = "";
    void (*entry)(void**) = nullptr;
    void** params = nullptr;
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    std::vector<WgmmaWarp> wgmma_warps;
    std::map<const void*, Mbarrier> mbarriers;  // by the address of their 8 bytes
    // This block's TMA copies land as late as allowed (at the first wait on their mbarrier) and
    // its wgmma operations run at issue, or the other way round: the first shows a missing
    // wait, the second a stage handed back before the operations reading it completed.
    bool late_copies = false;
    unsigned dyn_bytes = 0;  // the launch's dynamic shared memory
    // Per byte of dynamic shared memory: 1 + the thread whose generic-proxy write to it is not
    // yet fenced (fence.proxy.async), or 0. The async proxy (wgmma) must not read such a byte.
    std::vector<unsigned short> unfenced_by = std::vector<unsigned short>(DYN_SMEM);
    std::vector<void*> stacks;
    Fiber* current = nullptr;
    void* scheduler = nullptr;  // the scheduler's saved stack pointer while a fiber runs
    int threads = 0, arrived = 0;
    unsigned block_gen = 0;
    bool or_acc = false, or_result[2] = {false, false};
    std::string error;
    alignas(16) unsigned char dyn_smem[DYN_SMEM];
};
thread_local Launch* L = nullptr;  // the launch this thread is running, if any

[[noreturn]] void fatal(const std::string& msg) {
    std::fprintf(stderr, "cuda-emu: %s\n", msg.c_str());
    std::fflush(stderr);
    std::abort();
}

std::string where() {
    char buf[256];
    const Fiber* f = L->current;
    std::snprintf(buf, sizeof buf, "kernel `%s`, block (%u,%u,%u), thread (%u,%u,%u)", L->kernel, block_idx.x, block_idx.y, block_idx.z,
                  f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0);
    return buf;
}

void yield() { emu_switch(&L->current->sp, L->scheduler); }

// A fiber's first frame: runs the kernel, then returns to the scheduler for good. Copies
// issued and never waited for are dropped (the kernel does not read them).
void fiber_main() {
    L->entry(L->params);
    L->current->state = DONE;
    yield();
    fatal("a finished fiber was resumed");
}

struct sigaction previous[2];  // the handlers before ours (SIGSEGV, SIGBUS): Rust's, say

void on_fault(int sig, siginfo_t* info, void*) {
    if (!L || !L->current) {
        // Not in a kernel: hand the fault back to the previous handler (the instruction runs
        // again and faults into it).
        sigaction(sig, &previous[sig == SIGBUS], nullptr);
        return;
    }
    char buf[512];
    int n = std::snprintf(buf, sizeof buf, "cuda-emu: %s at address %p in %s\n", sig == SIGSEGV ? "invalid memory access" : "bus error", info->si_addr,
                          where().c_str());
    (void)!write(2, buf, n);
    _exit(99);
}

void install_fault_handler() {
    static thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t ss;
    ss.ss_size = 1 << 16;
    ss.ss_sp = std::malloc(ss.ss_size);
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    static bool installed = false;  // once per process; the alternate stack once per thread
    if (!installed) {
        installed = true;
        sigaction(SIGSEGV, &sa, &previous[0]);
        sigaction(SIGBUS, &sa, &previous[1]);
    }
}

void land(Mbarrier& b);

bool ready(const Fiber& f) {
    switch (f.state) {
        case READY: return true;
        case AT_BARRIER: return L->block_gen != f.wait_gen;
        case AT_WARP_OP: return L->warps[f.warp].gen != f.wait_gen;
        case AT_WARPGROUP_OP: return L->wgmma_warps[f.warp].gen != f.wait_gen;
        case AT_MBARRIER:
            land(*f.mbar);  // copies that complete on it land now at the latest
            return (f.mbar->phase & 1) != f.parity;
        default: return false;
    }
}

// Runs one block to completion; returns an empty string or what went wrong.
std::string run_block() {
    Launch& l = *L;
    const int n = l.threads;
    while ((int)l.stacks.size() < n) {
        void* s = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) fatal("no memory for a fiber stack");
        l.stacks.push_back(s);
    }
    l.fibers.assign(n, Fiber());
    l.warps.assign((n + 31) / 32, WarpState());
    for (size_t w = 0; w < l.warps.size(); w++) l.warps[w].lanes = std::min(32, n - 32 * (int)w);
    l.wgmma_warps.assign((n + 31) / 32, WgmmaWarp());
    l.mbarriers.clear();
    l.late_copies = (block_idx.x + grid_dim.x * (block_idx.y + grid_dim.y * block_idx.z)) & 1;
    l.arrived = 0;
    l.or_acc = false;
    std::memset(l.dyn_smem, 0xff, sizeof l.dyn_smem);
    std::fill(l.unfenced_by.begin(), l.unfenced_by.begin() + l.dyn_bytes, 0);
    for (int i = 0; i < n; i++) {
        Fiber& f = l.fibers[i];
        f.tid = uint3{(unsigned)(i % block_dim.x), (unsigned)(i / block_dim.x % block_dim.y), (unsigned)(i / (block_dim.x * block_dim.y))};
        f.warp = i / 32;
        f.lane = i % 32;
        // The stack as emu_switch leaves one: six saved registers, then the address it returns
        // to (fiber_main), then a zero return address for fiber_main's frame, so fiber_main
        // starts with the stack aligned as after a call.
        void** top = (void**)((char*)l.stacks[i] + STACK);
        top[-1] = nullptr;
        top[-2] = (void*)&fiber_main;
        for (int r = 3; r <= 8; r++) top[-r] = nullptr;
        f.sp = top - 8;
    }
    // Warps run as far apart as the barriers allow: each warp in turn runs until all its lanes
    // wait at a block barrier (or exit), in thread order between even barriers and in reverse
    // between odd ones, and its lanes take turns in alternating order too. A shared-memory
    // access that a missing barrier leaves unordered then sees the other warp's or lane's
    // value, or the old one, in one of the two orders.
    const int warps = (int)l.warps.size();
    for (unsigned turn = 0;;) {
        bool ran = false, all_done = true;
        const bool reverse = l.block_gen & 1;
        for (int wi = 0; wi < warps; wi++) {
            const int w = reverse ? warps - 1 - wi : wi, lo = 32 * w, hi = std::min(n, lo + 32);
            for (bool again = true; again; turn++) {
                again = false;
                for (int j = 0; j < hi - lo; j++) {
                    Fiber& f = l.fibers[turn & 1 ? hi - 1 - j : lo + j];
                    if (f.state == DONE || !ready(f)) continue;
                    f.state = READY;
                    l.current = &f;
                    thread_idx = f.tid;
                    emu_switch(&l.scheduler, f.sp);
                    l.current = nullptr;
                    if (!l.error.empty()) return l.error;
                    again = ran = true;
                }
            }
        }
        for (const Fiber& f : l.fibers) all_done &= f.state == DONE;
        if (all_done) {
            for (const WgmmaWarp& w : l.wgmma_warps)
                if (!w.open.empty() || !w.groups.empty()) return std::string("kernel `") + l.kernel + "` exited with wgmma operations never waited for (wgmma.wait_group)";
            for (const auto& b : l.mbarriers)
                if (!b.second.inflight.empty()) return std::string("kernel `") + l.kernel + "` exited with TMA copies to shared memory that no thread waited for";
            return "";
        }
        if (!ran) {
            int count[DONE + 1] = {};
            for (Fiber& f : l.fibers) count[f.state]++;
            char buf[320];
            std::snprintf(buf, sizeof buf,
                          "deadlock in kernel `%s`, block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp instruction, %d at a warpgroup "
                          "instruction, %d on an mbarrier, %d have exited",
                          l.kernel, block_idx.x, block_idx.y, block_idx.z, count[AT_BARRIER], count[AT_WARP_OP], count[AT_WARPGROUP_OP], count[AT_MBARRIER],
                          count[DONE]);
            return buf;
        }
    }
}

}  // namespace

void sync_block() {
    Fiber& f = *L->current;
    f.wait_gen = L->block_gen;
    if (++L->arrived == L->threads) {
        L->arrived = 0;
        L->or_result[L->block_gen & 1] = L->or_acc;
        L->or_acc = false;
        L->block_gen++;
        return;
    }
    f.state = AT_BARRIER;
    yield();
}

bool sync_block_or(bool pred) {
    const unsigned gen = L->block_gen;
    L->or_acc |= pred;
    sync_block();
    return L->or_result[gen & 1];
}

void check_full_mask(unsigned mask, const char* what) {
    if (mask == 0xffffffffu) return;
    L->error = std::string(what) + " with a partial mask is not emulated, " + where();
    yield();
}

void warp_op(const void* in, int bytes_in, void* out, int bytes_out, WarpOp op, long arg) {
    Fiber& f = *L->current;
    WarpState& w = L->warps[f.warp];
    if (w.lanes != 32) {
        L->error = "a warp instruction in a partial warp (" + std::to_string(w.lanes) + " threads), " + where();
        yield();
    }
    if (bytes_in > LANE_BYTES || bytes_out > LANE_BYTES) fatal("warp instruction operands too wide");
    const int p = w.gen & 1;
    if (w.arrived == 0) {
        w.op = op, w.arg = arg, w.bytes_in = bytes_in, w.bytes_out = bytes_out;
    } else if (w.op != op || w.arg != arg || w.bytes_in != bytes_in) {
        L->error = "the lanes of a warp reached different warp instructions (divergence), " + where();
        yield();
    }
    std::memcpy(w.in[p] + f.lane * bytes_in, in, bytes_in);
    const unsigned gen = w.gen;
    if (++w.arrived == 32) {
        op(w.in[p], w.out[p], bytes_in, bytes_out, arg);
        w.arrived = 0;
        w.gen++;
    } else {
        f.state = AT_WARP_OP;
        f.wait_gen = gen;
        yield();
    }
    std::memcpy(out, w.out[p] + f.lane * bytes_out, bytes_out);
}

void misaligned(const char* what, const void* p) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " %p", p);
    L->error = std::string("misaligned ") + what + buf + ", " + where();
    yield();
}

unsigned char* dynamic_smem() { return L->dyn_smem; }

void cp_async(void* dst, const void* src, int src_bytes) {
    if (src_bytes < 0 || src_bytes > 16) fatal("cp.async with a source size outside 0..16, " + where());
    if (((uintptr_t)dst | (uintptr_t)src) & 15) misaligned("cp.async address (16 bytes need 16-byte alignment)", ((uintptr_t)dst & 15) ? dst : src);
    L->current->open.push_back(Copy{dst, src, src_bytes});
}
void cp_async_commit() {
    Fiber& f = *L->current;
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
namespace {
// A generic-proxy write by the running thread: unfenced until its next fence.proxy.async.
void generic_write(void* p, unsigned bytes) {
    const unsigned char* b = (const unsigned char*)p;
    if (b < L->dyn_smem || b >= L->dyn_smem + DYN_SMEM) return;  // static shared memory: no async reader
    Fiber& f = *L->current;
    const unsigned off = (unsigned)(b - L->dyn_smem), me = (unsigned)(&f - L->fibers.data()) + 1;
    for (unsigned i = 0; i < bytes; i++) L->unfenced_by[off + i] = (unsigned short)me;
    f.unfenced.emplace_back(off, bytes);
}
}  // namespace

void fence_proxy_async() {
    Fiber& f = *L->current;
    const unsigned short me = (unsigned short)((&f - L->fibers.data()) + 1);
    for (auto [off, bytes] : f.unfenced)
        for (unsigned i = 0; i < bytes; i++)
            if (L->unfenced_by[off + i] == me) L->unfenced_by[off + i] = 0;
    f.unfenced.clear();
}

void cp_async_wait(int pending) {
    Fiber& f = *L->current;
    while ((int)f.groups.size() > pending) {
        for (const Copy& c : f.groups.front()) {
            std::memcpy(c.dst, c.src, c.bytes);
            std::memset((char*)c.dst + c.bytes, 0, 16 - c.bytes);
            generic_write(c.dst, 16);
        }
        f.groups.erase(f.groups.begin());
    }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory window and the sm_90a instructions.

namespace {
[[noreturn]] void fail(const std::string& what) {
    L->error = what + ", " + where();
    yield();
    fatal("a failed fiber was resumed");
}
}  // namespace

unsigned shared_addr(const void* p) {
    const unsigned char* b = (const unsigned char*)p;
    if (b < L->dyn_smem || b >= L->dyn_smem + DYN_SMEM) fail("the shared-window address of memory outside dynamic shared memory (not emulated)");
    return SHARED_BASE + (unsigned)(b - L->dyn_smem);
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

void land(Mbarrier& b) {
    std::vector<TmaCopy> copies;
    copies.swap(b.inflight);
    for (const TmaCopy& c : copies) land_copy(c, b);
}
}  // namespace

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

// The handler g++'s -fsanitize=alignment calls from the kernels (its data as GCC's and LLVM's
// UBSan runtime lay it out, version 1): a misaligned access fails the launch, naming the kernel,
// the thread and the source line, where the GPU would stop with a misaligned-address error.
struct UbsanLocation { const char* file; unsigned line, column; };
struct UbsanType { unsigned short kind, info; char name[1]; };
struct UbsanTypeMismatch { UbsanLocation loc; const UbsanType* type; unsigned char log_alignment, check_kind; };
extern "C" void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t ptr) {
    char buf[512];
    std::snprintf(buf, sizeof buf, "misaligned access to %s at %p (needs %u-byte alignment), %s:%u", d->type->name, (void*)ptr, 1u << d->log_alignment,
                  d->loc.file, d->loc.line);
    if (!L || !L->current) fatal(buf);
    fail(buf);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* d, uintptr_t ptr) { __ubsan_handle_type_mismatch_v1(d, ptr); }

float f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
unsigned short f32_to_f16(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }

std::map<std::string, KernelEntry>& registry() {
    static std::map<std::string, KernelEntry> r;
    return r;
}
Register::Register(const char* name, KernelEntry entry) { registry()[name] = entry; }

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The driver API.

using namespace emu;
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum { OK = 0, INVALID_VALUE = 1, NOT_FOUND = 500, LAUNCH_FAILED = 719, NOT_SUPPORTED = 801 };

namespace {
std::mutex launch_lock;
std::mutex mem_lock;
struct Alloc { void* base; size_t mapped; size_t bytes; };
std::map<CUdeviceptr, Alloc> allocs;
unsigned long long used_now = 0, used_high = 0;
struct Function { std::string name; KernelEntry entry; int max_dyn_smem = 48 << 10; unsigned max_threads = 1024; };
struct Module { std::string ptx; std::map<std::string, Function*> functions; };
struct Event { double ms = 0; };
double now_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int ctx_token, pool_token;

CUresult bad(const std::string& msg, CUresult code = INVALID_VALUE) {
    std::fprintf(stderr, "cuda-emu: %s\n", msg.c_str());
    return code;
}

CUresult alloc(CUdeviceptr* p, size_t bytes) {
    const size_t page = 4096, rounded = (bytes + 255) / 256 * 256, body = (rounded + page - 1) / page * page;
    char* base = (char*)mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    mprotect(base + body, page, PROT_NONE);
    char* start = base + body - rounded;
    std::memset(start, 0xff, rounded);
    *p = (CUdeviceptr)start;
    std::lock_guard<std::mutex> g(mem_lock);
    allocs[*p] = Alloc{base, body + page, bytes};
    used_now += bytes;
    if (used_now > used_high) used_high = used_now;
    return OK;
}
CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_lock);
    auto it = allocs.find(p);
    if (it == allocs.end()) return bad("free of an address that is not an allocation");
    used_now -= it->second.bytes;
    munmap(it->second.base, it->second.mapped);
    allocs.erase(it);
    return OK;
}
}  // namespace

extern "C" {
CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return INVALID_VALUE; *d = 0; return OK; }
// The compute capability the emulated device reports: 8.0, or TUNA_CUDA_EMU_CC (90 makes the
// crate take its sm_90a kernels).
int emulated_cc() {
    static const int cc = [] {
        const char* v = std::getenv("TUNA_CUDA_EMU_CC");
        const int c = v ? std::atoi(v) : 80;
        if (c != 80 && c != 90) fatal(std::string("TUNA_CUDA_EMU_CC is 80 or 90, not `") + v + "`");
        return c;
    }();
    return cc;
}
CUresult cuDeviceGetName(char* name, int len, int) { std::snprintf(name, len, "tuna CUDA emulator (sm_%d on the CPU)", emulated_cc()); return OK; }
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = 80ull << 30; return OK; }
CUresult cuMemGetInfo_v2(size_t* free_, size_t* total) {
    std::lock_guard<std::mutex> g(mem_lock);
    *total = 80ull << 30;
    *free_ = *total - used_now;
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; return OK;                  // max threads per block
        case 8: *v = 48 << 10; return OK;              // shared memory per block
        case 10: *v = 32; return OK;                   // warp size
        case 16: *v = 132; return OK;                  // multiprocessors (an H100 SXM's)
        case 75: *v = emulated_cc() / 10; return OK;   // compute capability 8.0 or 9.0
        case 76: *v = emulated_cc() % 10; return OK;
        case 97: *v = (int)232448; return OK;          // opt-in shared memory per block
        case 115: *v = 1; return OK;                   // memory pools
        default: *v = 0; return OK;
    }
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &ctx_token; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &ctx_token; return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuStreamCreate(void** s, unsigned) { *s = new int(0); return OK; }
CUresult cuStreamDestroy_v2(void* s) { delete (int*)s; return OK; }
CUresult cuStreamSynchronize(void*) { return OK; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
CUresult cuEventCreate(void** e, unsigned) { *e = new Event(); return OK; }
CUresult cuEventDestroy_v2(void* e) { delete (Event*)e; return OK; }
CUresult cuEventRecord(void* e, void*) { ((Event*)e)->ms = now_ms(); return OK; }
CUresult cuEventSynchronize(void*) { return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) { *ms = (float)(((Event*)b)->ms - ((Event*)a)->ms); return OK; }
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
CUresult cuLaunchHostFunc(void*, void (*fn)(void*), void* data) { fn(data); return OK; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return alloc(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { *p = std::malloc(bytes ? bytes : 1); return OK; }
CUresult cuMemFreeHost(void* p) { std::free(p); return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { std::memcpy((void*)d, s, n); return OK; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { std::memcpy(d, (const void*)s, n); return OK; }
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { std::memmove((void*)d, (const void*)s, n); return OK; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoD_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { std::memset((void*)d, v, n); return OK; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }
CUresult cuDeviceGetDefaultMemPool(void** pool, int) { *pool = &pool_token; return OK; }
CUresult cuMemPoolSetAttribute(void*, int attr, void* value) {
    std::lock_guard<std::mutex> g(mem_lock);
    if (attr == 8) used_high = *(unsigned long long*)value == 0 ? used_now : used_high;
    return OK;
}
CUresult cuMemPoolGetAttribute(void*, int attr, void* value) {
    std::lock_guard<std::mutex> g(mem_lock);
    unsigned long long v = attr == 7 || attr == 5 ? used_now : attr == 8 || attr == 6 ? used_high : 0;
    *(unsigned long long*)value = v;
    return OK;
}

CUresult cuModuleLoadData(void** module, const void* image) {
    Module* m = new Module();
    m->ptx = (const char*)image;
    *module = m;
    return OK;
}
CUresult cuModuleUnload(void* module) {
    Module* m = (Module*)module;
    for (auto& f : m->functions) delete f.second;
    delete m;
    return OK;
}
CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
    static std::mutex lookups;  // threads look up kernels of one module at once
    std::lock_guard<std::mutex> g(lookups);
    Module* m = (Module*)module;
    // One handle per kernel of a module, as the driver gives: attributes set through one
    // apply to every later lookup.
    if (auto seen = m->functions.find(name); seen != m->functions.end()) {
        *fn = seen->second;
        return OK;
    }
    const std::string entry = std::string(".entry ") + name + "(";
    const size_t at = m->ptx.find(entry);
    if (at == std::string::npos) return bad(std::string("kernel `") + name + "` is not in the module's PTX", NOT_FOUND);
    auto it = registry().find(name);
    if (it == registry().end()) return bad(std::string("kernel `") + name + "` was not compiled into the emulator", NOT_FOUND);
    Function* f = new Function{name, it->second};
    // __launch_bounds__ shows in the PTX as .maxntid between the parameter list and the body.
    const size_t body = m->ptx.find('{', at), bound = m->ptx.find(".maxntid", at);
    if (bound != std::string::npos && bound < body) {
        unsigned x = 1, y = 1, z = 1;
        std::sscanf(m->ptx.c_str() + bound, ".maxntid %u, %u, %u", &x, &y, &z);
        f->max_threads = x * y * z;
    }
    m->functions[name] = f;
    *fn = f;
    return OK;
}
CUresult cuFuncSetAttribute(void* fn, int attr, int value) {
    if (attr == 8) {
        if (value > (int)DYN_SMEM) return bad("dynamic shared memory limit above the device's opt-in maximum");
        ((Function*)fn)->max_dyn_smem = value;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int* v, int attr, void* fn) {
    *v = attr == 8 ? ((Function*)fn)->max_dyn_smem : attr == 0 ? (int)((Function*)fn)->max_threads : 0;
    return OK;
}

CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, void*, void** params, void**) {
    Function& f = *(Function*)fn;
    const unsigned long threads = (unsigned long)bx * by * bz;
    if (threads == 0 || threads > 1024 || bz > 64) return bad("kernel `" + f.name + "`: block dimensions outside the hardware's limits");
    if (threads > f.max_threads) return bad("kernel `" + f.name + "`: " + std::to_string(threads) + " threads per block, above its __launch_bounds__ of " + std::to_string(f.max_threads), LAUNCH_FAILED);
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return bad("kernel `" + f.name + "`: grid dimensions outside the hardware's limits");
    if ((int)smem > f.max_dyn_smem) return bad("kernel `" + f.name + "`: " + std::to_string(smem) + " bytes of dynamic shared memory, above its limit of " + std::to_string(f.max_dyn_smem) + " (cuFuncSetAttribute)");
    std::lock_guard<std::mutex> g(launch_lock);
    static const bool trace = std::getenv("TUNA_CUDA_EMU_TRACE") != nullptr;
    if (trace) std::fprintf(stderr, "cuda-emu: %s grid (%u,%u,%u) block (%u,%u,%u) smem %u\n", f.name.c_str(), gx, gy, gz, bx, by, bz, smem);
    install_fault_handler();
    static Launch* launch = new Launch();
    L = launch;
    L->kernel = f.name.c_str();
    L->entry = f.entry;
    L->params = params;
    L->threads = (int)threads;
    L->dyn_bytes = smem;
    L->error.clear();
    block_dim = dim3{bx, by, bz};
    grid_dim = dim3{gx, gy, gz};
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                block_idx = uint3{x, y, z};
                std::string err = run_block();
                if (!err.empty()) {
                    L = nullptr;
                    return bad(err, LAUNCH_FAILED);
                }
            }
    L = nullptr;
    return OK;
}

// Checks the arguments as the driver documents them, and packs what tma_load_2d needs. Rank 2,
// 16-bit elements, no interleave, no swizzle or the 128-byte one: what tuna encodes.
CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* addr, const unsigned long long* dim, const unsigned long long* strides,
                                const unsigned* box, const unsigned* elem_strides, int interleave, int swizzle, int, int oob_fill) {
    if ((uintptr_t)map & 63) return bad("cuTensorMapEncodeTiled: the map is not 64-byte aligned");
    if (rank != 2 || (dtype != 6 && dtype != 9) || interleave != 0 || (swizzle != 0 && swizzle != 3) || oob_fill != 0)
        return bad("cuTensorMapEncodeTiled: only rank 2, f16/bf16, no interleave, no or 128-byte swizzle, zero fill are emulated");
    const unsigned es = 2;
    if ((uintptr_t)addr & 15) return bad("cuTensorMapEncodeTiled: global address not 16-byte aligned");
    for (int i = 0; i < 2; i++) {
        if (dim[i] == 0 || dim[i] > (1ull << 32)) return bad("cuTensorMapEncodeTiled: a global dimension of 0 or above 2^32");
        if (box[i] == 0 || box[i] > 256) return bad("cuTensorMapEncodeTiled: a box dimension of 0 or above 256");
        if (elem_strides[i] != 1) return bad("cuTensorMapEncodeTiled: element strides other than 1 are not emulated");
    }
    if (strides[0] % 16 || strides[0] >= (1ull << 40)) return bad("cuTensorMapEncodeTiled: a global stride not a multiple of 16 bytes, or above 2^40");
    if (box[0] * es % 16) return bad("cuTensorMapEncodeTiled: the box's inner dimension is not a multiple of 16 bytes");
    if (swizzle == 3 && box[0] * es != 128) return bad("cuTensorMapEncodeTiled: a 128-byte swizzle needs an inner box dimension of 128 bytes here (at most 128 on the GPU)");
    TensorMap2d m{};
    std::memcpy(m.magic, MAP_MAGIC, sizeof MAP_MAGIC);
    m.elem_bytes = es;
    m.swizzle_bytes = swizzle == 3 ? 128 : 0;
    m.addr = (unsigned long long)addr;
    m.dim[0] = dim[0], m.dim[1] = dim[1], m.stride = strides[0];
    m.box[0] = box[0], m.box[1] = box[1];
    std::memset(map, 0, 128);
    std::memcpy(map, &m, sizeof m);
    return OK;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == LAUNCH_FAILED ? "the emulated kernel failed (cuda-emu printed why on stderr)" : e == NOT_FOUND ? "not found (cuda-emu printed which on stderr)" : "cuda-emu error (printed on stderr)";
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED" : e == NOT_FOUND ? "CUDA_ERROR_NOT_FOUND" : e == INVALID_VALUE ? "CUDA_ERROR_INVALID_VALUE" : "CUDA_ERROR_UNKNOWN";
    return OK;
}
}
