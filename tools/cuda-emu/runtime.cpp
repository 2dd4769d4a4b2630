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

#include "launch.h"
#include "registry.h"

// Switches stacks: saves the callee-saved registers on the current stack, stores its pointer in
// *from, and resumes the stack `to` (saved the same way, or prepared by `run_block`). x86-64
// System V; no system call, unlike swapcontext, which saves the signal mask each time.
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
using namespace rt;

namespace rt {
thread_local Launch* L = nullptr;

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

[[noreturn]] void fail(const std::string& what) {
    if (!L->current) fatal(what + ", " + where() + " (between fibers)");  // no fiber to stop
    L->error = what + ", " + where();
    yield();
    fatal("a failed fiber was resumed");
}

}  // namespace rt

namespace {

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
    if (!L) {
        // Not in a launch: hand the fault back to the previous handler (the instruction runs
        // again and faults into it). In a launch it is the kernel's, or the emulator's acting
        // for it between fibers (a TMA copy landing), and is reported as the launch's.
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
// A loaded module: its PTX, or its machine code (an ELF cubin), and the kernels looked up.
struct Module { std::string ptx, cubin; std::map<std::string, Function*> functions; };
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
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) {
    // Traced like a launch (a memset is a pass over memory on the device too).
    static const bool trace = std::getenv("TUNA_CUDA_EMU_TRACE") != nullptr;
    if (trace) std::fprintf(stderr, "cuda-emu: memset %zu bytes\n", n);
    return cuMemsetD8_v2(d, v, n);
}
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
    const unsigned char* b = (const unsigned char*)image;
    if (std::memcmp(b, "\x7f" "ELF", 4) == 0) {
        // TUNA_CUDA_EMU_NO_CUBIN=1: refuse machine code, as a driver older than the ptxas that
        // made it would (the crate then loads the PTX).
        if (std::getenv("TUNA_CUDA_EMU_NO_CUBIN")) {
            delete m;
            return bad("machine code refused (TUNA_CUDA_EMU_NO_CUBIN)", NOT_SUPPORTED);
        }
        // Machine code (a cubin ptxas made of the PTX, TUNA_SASS=1 builds): its size from the
        // ELF header (the section and program header tables end it), kept to look the kernels'
        // names up in its string table. It carries no .maxntid to read.
        unsigned long long shoff, phoff;
        unsigned short phentsize, phnum, shentsize, shnum;
        std::memcpy(&phoff, b + 0x20, 8), std::memcpy(&shoff, b + 0x28, 8);
        std::memcpy(&phentsize, b + 0x36, 2), std::memcpy(&phnum, b + 0x38, 2);
        std::memcpy(&shentsize, b + 0x3a, 2), std::memcpy(&shnum, b + 0x3c, 2);
        const size_t size = std::max(shoff + (size_t)shnum * shentsize, phoff + (size_t)phnum * phentsize);
        m->cubin.assign((const char*)b, size);
    } else {
        m->ptx = (const char*)image;
    }
    if (std::getenv("TUNA_CUDA_EMU_TRACE")) std::fprintf(stderr, "cuda-emu: module loaded from %s\n", m->cubin.empty() ? "PTX" : "machine code");
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
    if (!m->cubin.empty() && m->cubin.find(std::string(1, '\0') + name + '\0') == std::string::npos)
        return bad(std::string("kernel `") + name + "` is not in the module's machine code", NOT_FOUND);
    const std::string entry = std::string(".entry ") + name + "(";
    const size_t at = m->ptx.find(entry);
    if (m->cubin.empty() && at == std::string::npos) return bad(std::string("kernel `") + name + "` is not in the module's PTX", NOT_FOUND);
    auto it = registry().find(name);
    if (it == registry().end()) return bad(std::string("kernel `") + name + "` was not compiled into the emulator", NOT_FOUND);
    Function* f = new Function{name, it->second};
    // __launch_bounds__ shows in the PTX as .maxntid between the parameter list and the body.
    const size_t body = m->cubin.empty() ? m->ptx.find('{', at) : 0, bound = m->cubin.empty() ? m->ptx.find(".maxntid", at) : std::string::npos;
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
