// The emulator's internals shared by runtime.cpp (fibers, scheduler, warp instructions, the
// driver API) and hopper.cpp (the sm_90a instructions): the state of a launch and its threads.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "emu.h"

extern "C" void emu_switch(void** from, void* to);

namespace emu {
namespace rt {

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
extern thread_local Launch* L;  // the launch this thread is running, if any

[[noreturn]] void fatal(const std::string& msg);
// Where the running fiber is: kernel, block, thread.
std::string where();
// Back to the scheduler; the fiber resumes when it is ready again.
void yield();
// Fails the launch with `what` (and where), from the running fiber.
[[noreturn]] void fail(const std::string& what);
// Lands the TMA copies that complete on `b` (hopper.cpp).
void land(Mbarrier& b);
// A generic-proxy write by the running thread (st.shared, a landed cp.async): unfenced until
// its next fence.proxy.async (hopper.cpp).
void generic_write(void* p, unsigned bytes);

}  // namespace rt
}  // namespace emu
