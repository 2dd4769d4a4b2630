"""A numpy model of kernels-cuda/gemm_sm90.cu (the Hopper LoRA GEMM, `gemm_sm90_*` and
`nf4_gemm_sm90_*`) and of the tensor maps src/kernels/lora/sm90.rs encodes for it. It predates
the `_km_kn` instances (A stored [K, M], read MN-major with imm-trans-a 1) and does not model
them; the CUDA emulator runs them (tools/cuda-emu, compute capability 9.0).

What it models, each piece written from the kernel / launcher source and from the PTX ISA's
descriptions (not from the kernel's own comments):
- the launcher: `boxes`, `encode_args`, the alignment refusal, A1/B1 standing in for the second
  phase when k2 = 0, cuTensorMapEncodeTiled's checks on the arguments;
- TMA (cp.async.bulk.tensor.2d, SWIZZLE_128B): a box of box[1] rows x 64 elements lands at
  dst + row * 128 + 2 * col, and the hardware XORs address bits [4, 7) with bits [7, 10) of the
  absolute shared address; elements outside the tensor's dims are zero-filled; the full box's
  bytes count towards the mbarrier's transactions;
- the mbarrier ring: arrival counts, expect_tx / complete_tx, phases and try_wait.parity, run by
  a random scheduler that interleaves the producer thread(s), the two consumer warpgroups, the
  TMA copies (which land at a random later time) and the wgmma groups (which read shared memory
  at a random later time, in order, bounded by wgmma.wait_group);
- the wgmma descriptors as smem_desc builds them, decoded field by field, and operands read by the
  canonical 128-byte-swizzle layouts of the PTX ISA (K-major ((8,m),(T,2k)):((8T,SBO),(1,T)) for A
  and B [N, K]; MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) for B [K, N] with imm-trans-b 1);
- the m64n256 f32 accumulator fragment per thread, and the epilogue exactly as written (rows,
  columns, alpha, bias, the paired 32-bit store, bounds checks, the f32 accumulate mode);
- the NF4 producer: which of the 128 threads stores which 16-byte piece where, the u32 of codes
  (high nibble first), the block scales, cvt.rn.{bf16,f16}x2's operand order, the per-weight path
  for ragged W, and its arrivals.
Every output element must be written exactly once; results are compared with a float64
reference (C = alpha (A1 op(B1) + A2 op(B2)) + bias, from the 16-bit inputs; NF4 W dequantized
in f32 as nf4::cpu does and rounded to the 16-bit type, as the kernel feeds the tensor cores).

Result when written: no layout, addressing or pipeline error found. Every element of every case
is within half a spacing of the output type plus f32 summation noise of the reference (max
relative error 3.2e-3 with bf16 C, 3.9e-4 with f16 C, 1.5e-7 with the f32 C), each written once. The self-test plants one error at a time and each shows up:
A's SBO 512 instead of 1024 (error ~1), the four [K, N] boxes in reverse order (~1), the other
reading of the MN-major descriptor (LBO and SBO exchanged: ~1), the two
halves of cvt.rn.bf16x2 swapped in the NF4 producer (~1), the consumer releasing a stage right
after commit instead of after wgmma.wait_group 1 (stale operands: error ~0.6 under the scheduler),
expect_tx covering only A's bytes (flagged: the phase completes before B lands), and the NF4
full[] count 128 instead of 129 (an arrival on a phase with none pending).

It mirrors the kernel by hand, so it checks the kernel's addressing under one reading of the
hardware's layouts, not the kernel itself: after a change to the kernel's layouts, change this
too. A GPU failure is the time to use it: try another reading of a descriptor field here and see
whether the model's error moves the same way. Needs numpy; not run by CI (about ten seconds).
Run: python3 gemm_sm90.py (exit status 1 if a case fails or a planted error goes unseen).
"""
import math
import sys

import numpy as np

# gemm_sm90.cu / sm90.rs constants.
BM, BN, BK, STAGES, GROUP_M = 128, 256, 64, 4, 8
A_BYTES, B_BYTES = BM * BK * 2, BN * BK * 2
STAGE_BYTES = A_BYTES + B_BYTES
SMEM_BYTES = STAGES * (BM + BN) * BK * 2 + 1024  # sm90.rs SMEM_BYTES
SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum on sm_90

BUGS = set()  # deliberate errors for the self-test (see main)


class ModelError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# 16-bit types: bits <-> f32 (round to nearest even, as T::from_f32 and cvt.rn do for finite values)
def _f32(x):
    return np.asarray(x, dtype=np.float32)


def bf16_bits(x):
    u = _f32(x).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_val(b):
    return (np.asarray(b).astype(np.uint32) << 16).view(np.float32)


def f16_bits(x):
    return _f32(x).astype(np.float16).view(np.uint16)


def f16_val(b):
    return np.asarray(b).astype(np.uint16).view(np.float16).astype(np.float32)


TYPES = {'bf16': (bf16_bits, bf16_val), 'f16': (f16_bits, f16_val)}


def s_bits(ty, v):  # scalar T::from_f32
    return int(TYPES[ty][0](np.array([v], np.float32))[0])


def s_val(ty, b):  # scalar T::to_f32
    return float(TYPES[ty][1](np.array([b], np.uint16))[0])


# ---------------------------------------------------------------------------------------------
# Global memory operands and the launcher's tensor maps
class Global:
    """A row-major [rows, cols] 16-bit matrix with row stride ld, held as the flat buffer of
    (rows - 1) * ld + cols elements the launcher promises; padding holds a loud sentinel."""

    def __init__(self, vals, ld, ty, ptr):
        rows, cols = vals.shape
        self.rows, self.cols, self.ld, self.ty, self.ptr = rows, cols, ld, ty, ptr
        self.buf = np.full((rows - 1) * ld + cols, s_bits(ty, 3.0e4), np.uint16)
        for r in range(rows):
            self.buf[r * ld: r * ld + cols] = TYPES[ty][0](vals[r])

    def matrix(self):  # the 16-bit values as f64, for the reference
        return np.stack([TYPES[self.ty][1](self.buf[r * self.ld: r * self.ld + self.cols]) for r in range(self.rows)]).astype(np.float64)


def boxes(m, n, k1, k2, kn, ld):  # sm90.rs `boxes`: (rows, cols, ld, box_rows) of A1, B1, A2, B2
    a = lambda k, l: (m, k, l, BM)
    b = lambda k, l: (k, n, l, BK) if kn else (n, k, l, BN)
    a1, b1 = a(k1, ld[0]), b(k1, ld[1])
    return [a1, b1, a1, b1] if k2 == 0 else [a1, b1, a(k2, ld[2]), b(k2, ld[3])]


class TensorMap:
    """What cuTensorMapEncodeTiled packs (sm90.rs `encode`): dims innermost first, the row stride
    in bytes, box dims innermost first, 16-bit elements, 128-byte swizzle, OOB fill zero."""

    def __init__(self, g, box):
        rows, cols, ld, box_rows = box
        dims, strides, boxd = [cols, rows], [ld * 2], [BK, box_rows]  # Box2d::encode_args
        if g.ptr % 16 or strides[0] % 16 or strides[0] < dims[0] * 2 or not all(1 <= x <= 256 for x in boxd):
            raise ModelError(f'cuTensorMapEncodeTiled would refuse dims {dims} strides {strides} box {boxd}')
        if boxd[0] * 2 > 128:
            raise ModelError('SWIZZLE_128B: the inner box dimension must span at most 128 bytes')
        if (rows - 1) * ld + cols > len(g.buf) or (rows, cols, ld) != (g.rows, g.cols, g.ld):
            raise ModelError('tensor map addresses more than the operand holds')
        self.g, self.dims, self.stride, self.box = g, dims, strides[0] // 2, boxd

    def bytes(self):
        return self.box[0] * self.box[1] * 2


def swz128(addr):  # the 128-byte swizzle on an absolute shared address (Swizzle<3,4,3> on bytes)
    return addr ^ (((addr >> 7) & 7) << 4)


class Smem:
    def __init__(self, nbytes):
        self.u16 = np.full(nbytes // 2, 0xFFFF, np.uint16)  # NaN garbage until written
        self.nbytes = nbytes


def tma_copy(sm, dst, tm, c0, c1):
    """cp.async.bulk.tensor.2d of the box at element coordinates (c0 innermost, c1) to dst."""
    if dst % 1024:  # 128 B is the hard rule; the swizzle pattern repeats every 1024 B
        raise ModelError(f'TMA destination {dst:#x} not 1024-byte aligned')
    b0, b1 = tm.box
    r = np.arange(b1)[:, None]
    c = np.arange(b0)[None, :]
    gr, gc = c1 + r, c0 + c
    inb = (gr >= 0) & (gr < tm.dims[1]) & (gc >= 0) & (gc < tm.dims[0])
    idx = np.where(inb, gr * tm.stride + gc, 0)
    vals = np.where(inb, tm.g.buf[idx], 0).astype(np.uint16)
    addr = dst + r * (b0 * 2) + 2 * c  # one 128-byte row of the box per box row
    phys = swz128(addr)
    if phys.max() + 2 > sm.nbytes:
        raise ModelError('TMA box past the end of shared memory')
    sm.u16[phys // 2] = vals
    return tm.bytes()


# ---------------------------------------------------------------------------------------------
# wgmma: descriptors and operands
def smem_desc(addr, lbo, sbo):  # wgmma.cuh smem_desc
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def decode_desc(d):  # PTX ISA "Matrix Descriptor Format"
    return dict(start=(d & 0x3FFF) << 4, lbo=((d >> 16) & 0x3FFF) << 4, sbo=((d >> 32) & 0x3FFF) << 4,
                base_offset=(d >> 49) & 7, mode=(d >> 62) & 3)


T16 = 8  # T = 128 bits / 16-bit elements


def operand_addrs(desc, mn, trans):
    """Byte addresses (before the swizzle) of element (i, k), i < mn, k < 16, of a wgmma operand
    (A: M x K; B: N x K) by the PTX canonical layouts for the 128-byte swizzle."""
    f = decode_desc(desc)
    if f['mode'] != 1 or f['base_offset'] != 0:
        raise ModelError(f'descriptor mode {f["mode"]} base offset {f["base_offset"]}: not modelled')
    i = np.arange(mn)[:, None]
    k = np.arange(16)[None, :]
    if not trans:  # K-major ((8,m),(T,2k)):((8T,SBO),(1,T)), in elements; SBO in bytes
        off = 2 * ((i % 8) * 8 * T16 + (k % T16) + (k // T16) * T16) + (i // 8) * f['sbo']
    else:  # MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))
        off = 2 * ((i % T16) + ((i // T16) % 8) * T16 + (k % 8) * 8 * T16) + (i // 64) * f['lbo'] + (k // 8) * f['sbo']
    return f['start'] + off


def read_operand(sm, desc, mn, trans, ty, window):
    addr = operand_addrs(desc, mn, trans)
    phys = swz128(addr)
    lo, hi = window
    if phys.min() < lo or phys.max() + 2 > hi:
        raise ModelError(f'wgmma operand reads [{phys.min():#x}, {phys.max():#x}] outside its stage [{lo:#x}, {hi:#x})')
    return TYPES[ty][1](sm.u16[phys // 2]).astype(np.float64)


def acc_pos(t, i):  # m64nN f32 accumulator d[i] of thread t of the warpgroup -> (row, col)
    w, l = t // 32, t % 32
    return 16 * w + l // 4 + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (l % 4) + (i & 1)


ACC_R = np.array([[acc_pos(t, i)[0] for i in range(128)] for t in range(128)])
ACC_C = np.array([[acc_pos(t, i)[1] for i in range(128)] for t in range(128)])


# ---------------------------------------------------------------------------------------------
# mbarrier
class MBar:
    def __init__(self, name, count):
        self.name, self.count, self.pending, self.tx, self.phase = name, count, count, 0, 0
        self.flags = []

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self):
        self.pending -= 1
        if self.pending < 0:
            raise ModelError(f'{self.name}: more arrivals than the count in phase {self.phase}')
        self._maybe_complete()

    def expect_tx(self, nbytes):  # mbarrier.arrive.expect_tx: tx first, then the arrival
        self.tx += nbytes
        self.arrive()

    def complete_tx(self, nbytes):
        if self.pending == self.count and self.tx - nbytes < 0:
            self.flags.append(f'{self.name}: {nbytes} bytes completed into phase {self.phase}, which expected none')
        self.tx -= nbytes
        self._maybe_complete()

    def done(self, parity):  # try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity


# ---------------------------------------------------------------------------------------------
# NF4
class Nf4:
    """bitsandbytes-layout NF4 of a [wrows, wcols] W (flat element e: code in byte e/2, high nibble
    first; block e/64 scaled by map[absmax[b]] * absmax2[b / 256] + offset). The 256-entry map and
    the 16 codes are random here: the model checks where values go, not the tables."""

    def __init__(self, wrows, wcols, rng):
        n = wrows * wcols
        self.wrows, self.wcols = wrows, wcols
        self.packed = rng.integers(0, 256, (n + 1) // 2 + 4, dtype=np.uint8)  # + slack past the end
        blocks = (n + 63) // 64
        self.absmax = rng.integers(0, 256, blocks, dtype=np.uint8)
        self.absmax2 = _f32(rng.uniform(0.5, 1.5, (blocks + 255) // 256))
        self.offset = np.float32(0.01)
        self.map = _f32(rng.uniform(-1, 1, 256))
        self.code = _f32(np.sort(rng.uniform(-1, 1, 16)))
        self.packed_ptr = 0x7f0000  # 4-byte aligned

    def scale(self, b):
        return np.float32(np.float32(self.map[self.absmax[b]] * self.absmax2[b >> 8]) + self.offset)

    def at(self, e):  # nf4_at
        byte = int(self.packed[e >> 1])
        c = (byte & 0xF) if (e & 1) else (byte >> 4)
        return np.float32(self.code[c] * self.scale(e >> 6))

    def dense(self):  # nf4::cpu::dequantize, f32
        e = np.arange(self.wrows * self.wcols)
        byte = self.packed[e >> 1].astype(np.int64)
        c = np.where(e & 1, byte & 0xF, byte >> 4)
        b = e >> 6
        a = _f32(_f32(self.map[self.absmax[b]] * self.absmax2[b >> 8]) + self.offset)
        return _f32(self.code[c] * a).reshape(self.wrows, self.wcols)


def cvt_x2(ty, a, b):  # cvt.rn.{bf16,f16}x2.f32 d, a, b: a to the upper half, b to the lower
    return (s_bits(ty, a) << 16) | s_bits(ty, b)


def pack2(ty, lo, hi):  # gemm_sm90.cu pack2: asm operands "f"(hi), "f"(lo)
    if 'pack2_swapped' in BUGS:
        return cvt_x2(ty, lo, hi)
    return cvt_x2(ty, hi, lo)


def swizzled(r, piece):  # wgmma.cuh swizzled
    return r * 128 + ((piece ^ (r & 7)) << 4)


def nf4_tile_thread(sm, tid, ty, dst, rows, cols, q, wrows, wcols, r0, c0):
    """Thread tid's share of nf4_tile<T, rows, cols>: its 16-byte st.shared.v4 stores."""
    chunks, per_row = rows * cols // 8, cols // 8
    wide = (wcols & 7) == 0 and (q.packed_ptr & 3) == 0
    for ch in range(tid, chunks, 128):
        r, c8 = ch // per_row, ch % per_row
        gr, gc = r0 + r, c0 + c8 * 8
        h = [0, 0, 0, 0]
        if gr < wrows and wide and gc + 8 <= wcols:
            e = gr * wcols + gc
            codes = int.from_bytes(bytes(q.packed[(e >> 1):(e >> 1) + 4]), 'little')
            a = q.scale(e >> 6)
            for j in range(4):
                byte = (codes >> (8 * j)) & 0xFF
                h[j] = pack2(ty, np.float32(q.code[byte >> 4] * a), np.float32(q.code[byte & 0xF] * a))
        elif gr < wrows:
            for j in range(8):
                v = q.at(gr * wcols + gc + j) if gc + j < wcols else np.float32(0)
                h[j >> 1] |= s_bits(ty, v) << (16 * (j & 1))
        at = dst + (c8 // 8) * (rows * 128) + swizzled(r, c8 % 8)
        if at % 16:
            raise ModelError('st.shared.v4 not 16-byte aligned')
        for j in range(4):  # little-endian u32s: the low half first
            sm.u16[at // 2 + 2 * j] = h[j] & 0xFFFF
            sm.u16[at // 2 + 2 * j + 1] = h[j] >> 16


# ---------------------------------------------------------------------------------------------
# One block of gemm_sm90_body, under a random interleaving
def run_block(bid, P, rng):
    ty, kn, nf4 = P['ty'], P['kn'], P['nf4']
    m, n, k1, k2, alpha = P['m'], P['n'], P['k1'], P['k2'], P['alpha']
    ta1, tb1, ta2, tb2 = P['maps']
    raw = P['dyn_start']
    base = (raw + 1023) & ~1023
    if base + STAGES * STAGE_BYTES > raw + SMEM_BYTES:
        raise ModelError('the stages overrun the dynamic shared memory')
    sm = Smem(SMEM_LIMIT)

    tiles_m, tiles_n = (m + BM - 1) // BM, (n + BN - 1) // BN
    per_group = GROUP_M * tiles_n
    first = (bid // per_group) * GROUP_M
    rows = min(tiles_m - first, GROUP_M)
    in_group = bid % per_group
    m0, n0 = (first + in_group % rows) * BM, (in_group // rows) * BN
    tiles1 = (k1 + BK - 1) // BK
    tiles = tiles1 + (k2 + BK - 1) // BK

    full = [MBar(f'full[{s}]', (128 if 'nf4_count' in BUGS else 129) if nf4 else 1) for s in range(STAGES)]
    empty = [MBar(f'empty[{s}]', 8) for s in range(STAGES)]
    asyncs = []  # pending TMA copies and wgmma groups
    groups = {0: [], 1: []}  # per consumer warpgroup: committed, not yet executed wgmma groups
    d = {0: np.zeros((128, 128), np.float32), 1: np.zeros((128, 128), np.float32)}
    tb_flag = 1 if kn else 0

    def issue_tma(dst, tm, c0, c1, bar):
        def land():
            bar.complete_tx(tma_copy(sm, dst, tm, c0, c1))
        asyncs.append(('tma', land))

    def producer(tid):
        issuer = tid == 0
        for kt in range(tiles):
            s = kt % STAGES
            if kt >= STAGES:
                yield lambda: empty[s].done((kt // STAGES - 1) & 1)
            a_s = base + s * STAGE_BYTES
            b_s = a_s + A_BYTES
            second = kt >= tiles1
            dequant = nf4 and not second
            k0 = (kt - tiles1 if second else kt) * BK
            if issuer:
                exp = A_BYTES if (dequant or 'tx_a_only' in BUGS) else STAGE_BYTES
                full[s].expect_tx(exp)
                issue_tma(a_s, ta2 if second else ta1, k0, m0, full[s])
                if not dequant:
                    tb = tb2 if second else tb1
                    if kn:
                        order = range(3, -1, -1) if 'kn_box_swap' in BUGS else range(4)
                        for slot, j in enumerate(order):
                            issue_tma(b_s + slot * 8192, tb, n0 + 64 * j, k0, full[s])
                    else:
                        issue_tma(b_s, tb, k0, n0, full[s])
                yield None
            if nf4:
                if dequant:
                    q = P['q']
                    if kn:
                        nf4_tile_thread(sm, tid, ty, b_s, BK, BN, q, k1, n, k0, n0)
                    else:
                        nf4_tile_thread(sm, tid, ty, b_s, BN, BK, q, n, k1, n0, k0)
                    yield None  # fence.proxy.async.shared::cta: ordering only, nothing to model
                full[s].arrive()
                yield None

    def consumer(cw):
        for kt in range(tiles):
            s = kt % STAGES
            yield lambda: full[s].done((kt // STAGES) & 1)
            a_s = base + s * STAGE_BYTES + cw * 64 * 128
            b_s = base + s * STAGE_BYTES + A_BYTES
            window = (base + s * STAGE_BYTES, base + (s + 1) * STAGE_BYTES)
            grp = []
            for ks in range(BK // 16):
                sbo_a = 512 if 'sbo' in BUGS else 1024
                da = smem_desc(a_s + ks * 32, 16, sbo_a)
                db = smem_desc(b_s + ks * 2048, 8192, 1024) if kn else smem_desc(b_s + ks * 32, 16, 1024)
                if kn and 'mn_lbo_sbo_swapped' in BUGS:  # the other reading of LBO / SBO for MN-major
                    db = smem_desc(b_s + ks * 2048, 1024, 8192)
                grp.append((da, db, window))
            groups[cw].append(grp)
            asyncs.append(('wgmma', cw))
            yield None
            if 'early_release' in BUGS:
                for _ in range(4):
                    empty[s].arrive()
                yield None
                continue
            yield lambda: len(groups[cw]) <= 1  # wgmma.wait_group 1
            if kt > 0:
                for _ in range(4):  # lane 0 of each of the 4 warps
                    empty[(kt - 1) % STAGES].arrive()
            yield None
        yield lambda: len(groups[cw]) == 0  # wgmma.wait_group 0

    def run_group(cw):
        grp = groups[cw].pop(0)
        for da, db, window in grp:
            A = read_operand(sm, da, 64, False, ty, window)
            B = read_operand(sm, db, BN, tb_flag == 1, ty, window)
            prod = (A @ B.T).astype(np.float32)
            d[cw] += prod[ACC_R, ACC_C]

    agents = [producer(t) for t in (range(128) if nf4 else [0])] + [consumer(0), consumer(1)]
    preds = [None] * len(agents)
    alive = [True] * len(agents)
    w_async = P['w_async']
    while True:
        runnable = [i for i in range(len(agents)) if alive[i] and (preds[i] is None or preds[i]())]
        nr, na = len(runnable), len(asyncs)
        if nr == 0 and na == 0:
            if any(alive):
                raise ModelError(f'block {bid}: deadlock')
            break
        if na and (nr == 0 or rng.random() < w_async * na / (nr + w_async * na)):
            # An async op; wgmma groups of one warpgroup execute in issue order.
            kind, arg = asyncs.pop(int(rng.integers(na)))
            if kind == 'tma':
                arg()
            else:
                run_group(arg)
        else:
            i = runnable[int(rng.integers(nr))]
            try:
                preds[i] = next(agents[i])
            except StopIteration:
                alive[i] = False
    flags = [f for b in full + empty for f in b.flags]
    for b in full:  # every phase complete and idle at the end
        if b.pending != b.count or b.tx != 0:
            flags.append(f'{b.name}: left with {b.count - b.pending} arrivals, tx {b.tx}')

    # Epilogue, thread by thread as written.
    C, C32, bias = P['c'], P['c32'], P['bias']
    pairs = C32 is None and (n & 1) == 0 and (P['c_ptr'] & 3) == 0
    for cw in (0, 1):
        for t in range(128):
            lane = t & 31
            r0 = m0 + cw * 64 + (t >> 5) * 16 + (lane >> 2)
            for j in range(BN // 8):
                col = n0 + 8 * j + 2 * (lane & 3)
                if col >= n:
                    continue
                two = col + 1 < n
                b0 = b1 = 0.0
                if bias is not None:
                    b0 = s_val(ty, bias[col])
                    if two:
                        b1 = s_val(ty, bias[col + 1])
                for h in range(2):
                    row = r0 + 8 * h
                    if row >= m:
                        continue
                    v0 = np.float32(np.float32(alpha) * d[cw][t, 4 * j + 2 * h] + np.float32(b0))
                    v1 = np.float32(np.float32(alpha) * d[cw][t, 4 * j + 2 * h + 1] + np.float32(b1))
                    o = row * n + col
                    if C32 is not None:
                        C32[o] += v0
                        P['writes'][o] += 1
                        if two:
                            C32[o + 1] += v1
                            P['writes'][o + 1] += 1
                    elif pairs:
                        if o % 2:
                            raise ModelError('misaligned u32 store')
                        C[o], C[o + 1] = s_bits(ty, v0), s_bits(ty, v1)
                        P['writes'][o] += 1
                        P['writes'][o + 1] += 1
                    else:
                        C[o] = s_bits(ty, v0)
                        P['writes'][o] += 1
                        if two:
                            C[o + 1] = s_bits(ty, v1)
                            P['writes'][o + 1] += 1
    return flags


def tile_order_is_a_bijection(tiles_m, tiles_n):
    seen = set()
    for bid in range(tiles_m * tiles_n):
        per_group = GROUP_M * tiles_n
        first = (bid // per_group) * GROUP_M
        rows = min(tiles_m - first, GROUP_M)
        in_group = bid % per_group
        seen.add((first + in_group % rows, in_group // rows))
    return seen == {(i, j) for i in range(tiles_m) for j in range(tiles_n)}


# ---------------------------------------------------------------------------------------------
# A GEMM through the launcher and the kernel, against float64
def run_case(name, m, n, k1, k2, kn, ty='bf16', nf4=False, bias=True, f32_out=False, pad=(0, 0, 0, 0),
             alpha=0.75, seed=0, w_async=0.5, quiet=False):
    rng = np.random.default_rng(seed)
    rnd = lambda *sh: _f32(rng.standard_normal(sh))
    ptr = iter(range(0x10000000, 0x7FFFFFFF, 0x1000000))
    # Operand shapes (sm90.rs boxes): A [m, k]; B [n, k] or (kn) [k, n].
    bshape = lambda k: (k, n) if kn else (n, k)
    a1 = Global(rnd(m, k1), k1 + pad[0], ty, next(ptr))
    b1 = None if nf4 else Global(rnd(*bshape(k1)), bshape(k1)[1] + pad[1], ty, next(ptr))
    a2 = Global(rnd(m, max(k2, 1)), max(k2, 1) + pad[2], ty, next(ptr)) if k2 else None
    b2 = Global(rnd(*bshape(k2)), bshape(k2)[1] + pad[3], ty, next(ptr)) if k2 else None
    q = None
    if nf4:  # W [n, k1] (forward) or [k1, n] (dX: the GEMM's K runs over W's rows)
        q = Nf4(*(bshape(k1)), rng)

    # The launcher (sm90.rs gemm): alignment refusal, then the tensor maps.
    ops = [(a1.ptr, a1.ld)] + ([] if nf4 else [(b1.ptr, b1.ld)]) + ([(a2.ptr, a2.ld), (b2.ptr, b2.ld)] if k2 else [])
    if not all(p % 16 == 0 and l % 8 == 0 for p, l in ops):
        print(f'{name}: refused by the launcher (mma.sync path)', flush=True)
        return None
    ldb1 = a1.ld if nf4 else b1.ld
    bx = boxes(m, n, k1, k2, kn, [a1.ld, ldb1, a2.ld if k2 else 0, b2.ld if k2 else 0])
    ta1 = TensorMap(a1, bx[0])
    tb1 = ta1 if nf4 else TensorMap(b1, bx[1])
    ta2, tb2 = (ta1, tb1) if k2 == 0 else (TensorMap(a2, bx[2]), TensorMap(b2, bx[3]))

    bias_bits = TYPES[ty][0](rnd(n)) if bias else None
    c = None if f32_out else np.full(m * n, s_bits(ty, 7.0e3), np.uint16)
    c32_init = rnd(m * n) if f32_out else None
    c32 = c32_init.copy() if f32_out else None
    P = dict(ty=ty, kn=kn, nf4=nf4, m=m, n=n, k1=k1, k2=k2, alpha=alpha, maps=(ta1, tb1, ta2, tb2), q=q,
             c=c, c32=c32, bias=bias_bits, c_ptr=0x20000000, writes=np.zeros(m * n, np.int64), w_async=w_async,
             dyn_start=(1152 if nf4 else 80))
    tiles_m, tiles_n = (m + BM - 1) // BM, (n + BN - 1) // BN
    flags = []
    for bid in range(tiles_m * tiles_n):
        flags += run_block(bid, P, rng)

    # float64 reference from the 16-bit inputs.
    A1 = a1.matrix()
    if nf4:
        W = TYPES[ty][1](TYPES[ty][0](q.dense())).astype(np.float64)
        B1 = W  # [n, k1] or [k1, n]
    else:
        B1 = b1.matrix()
    ref = A1 @ (B1 if kn else B1.T)
    if k2:
        ref = ref + a2.matrix() @ (b2.matrix() if kn else b2.matrix().T)
    ref = alpha * ref
    if bias:
        ref = ref + TYPES[ty][1](bias_bits).astype(np.float64)[None, :]
    if f32_out:
        out = (c32.astype(np.float64) - c32_init).reshape(m, n)
    else:
        out = TYPES[ty][1](c).astype(np.float64).reshape(m, n)
    err = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-30))
    if not np.isfinite(err):
        err = float('inf')
    # Also against the bound a correct kernel meets: half a spacing of the output type at the
    # reference value (f32 C: at the stored sum) plus f32 summation noise, K * 2^-24 * sum |terms|.
    mant, emin = {'bf16': (7, -126), 'f16': (10, -14)}[ty] if not f32_out else (23, -126)
    at = np.abs(ref) if not f32_out else np.abs(c32.astype(np.float64)).reshape(m, n)
    half_ulp = 0.5 * np.exp2(np.maximum(np.floor(np.log2(np.maximum(at, 1e-30))), emin) - mant)
    terms = np.abs(A1) @ np.abs(B1 if kn else B1.T)
    if k2:
        terms = terms + np.abs(a2.matrix()) @ np.abs(b2.matrix() if kn else b2.matrix().T)
    noise = (k1 + k2 + 2) * 2.0 ** -24 * (abs(alpha) * terms + (np.abs(ref) if bias else 0))
    ratio = float(np.nanmax(np.abs(out - ref) / (half_ulp + noise))) if np.isfinite(out).all() else float('inf')
    once = bool((P['writes'] == 1).all())
    line = f'{name:58s} max rel err {err:.2e}  (bound ratio {ratio:9.2e})  written once: {once}' + (f'  FLAGS: {flags[:2]}' if flags else '')
    if not quiet:
        print(line, flush=True)
    return err, once, flags, ratio


def main():
    print('tile order (GROUP_M) a bijection on 1..20 x 1..12 tiles:',
          all(tile_order_is_a_bijection(a, b) for a in range(1, 21) for b in range(1, 13)))
    print('shared memory: dynamic', SMEM_BYTES, '+ static (NF4) 1152 =', SMEM_BYTES + 1152, '<=', SMEM_LIMIT)
    cases = [
        ('fwd bf16 M200 N300 K1 100 K2 16 bias, ld 104', dict(m=200, n=300, k1=100, k2=16, kn=False, pad=(4, 4, 0, 0))),
        ('fwd bf16 M130 N520 K1 192 K2 0, f32 C', dict(m=130, n=520, k1=192, k2=0, kn=False, bias=False, f32_out=True)),
        ('fwd f16 M70 N101 K1 40 K2 8 bias (tiles partly empty)', dict(m=70, n=101, k1=40, k2=8, kn=False, ty='f16')),
        ('fwd bf16 M1100 N40 K1 64 K2 8 (9 row tiles: 2 groups)', dict(m=1100, n=40, k1=64, k2=8, kn=False, bias=False)),
        ('dX  bf16 M150 N264 K1 130 K2 16 bias, lds 136, 272', dict(m=150, n=264, k1=130, k2=16, kn=True, pad=(6, 8, 0, 0))),
        ('dX  f16 M129 N72 K1 200 K2 0, f32 C', dict(m=129, n=72, k1=200, k2=0, kn=True, ty='f16', bias=False, f32_out=True)),
        ('dX  bf16 M64 N136 K1 320 K2 24 (7 K tiles, ring wraps)', dict(m=64, n=136, k1=320, k2=24, kn=True, bias=False)),
        ('nf4 fwd bf16 M140 N300 K1 136 K2 16 bias (u32 path)', dict(m=140, n=300, k1=136, k2=16, kn=False, nf4=True)),
        ('nf4 fwd f16 M64 N260 K1 100 K2 0, f32 C (per-weight path)', dict(m=64, n=260, k1=100, k2=0, kn=False, nf4=True, ty='f16', f32_out=True, bias=False, pad=(4, 0, 0, 0))),
        ('nf4 dX  bf16 M130 N264 K1 150 K2 8 (u32 path)', dict(m=130, n=264, k1=150, k2=8, kn=True, nf4=True, pad=(2, 0, 0, 0))),
        ('nf4 dX  f16 M100 N90 K1 70 K2 0 (per-weight path)', dict(m=100, n=90, k1=70, k2=0, kn=True, nf4=True, ty='f16', pad=(2, 0, 0, 0))),
    ]
    worst = 0.0
    for i, (name, kw) in enumerate(cases):
        r = run_case(name, seed=i, **kw)
        if r is None:
            continue
        worst = max(worst, r[0])
        if not r[1] or r[2] or r[3] > 1.0:
            worst = float('inf')
    print(f'worst case: {worst:.2e} (inf: a case outside its rounding bound, written twice, or flagged)')

    print('\nthe pipeline under other interleavings (seeds x async weights):')
    for kw in (dict(m=64, n=136, k1=320, k2=24, kn=True, bias=False), dict(m=64, n=256, k1=320, k2=16, kn=False, nf4=True)):
        rs = [run_case('', seed=sd, w_async=wa, quiet=True, **kw) for sd in range(3) for wa in (0.02, 0.5, 20.0)]
        bad = [r for r in rs if r[3] > 1.0 or not r[1] or r[2]]
        print(f'  {kw}: {len(rs)} runs, max rel err {max(r[0] for r in rs):.2e}, failing {len(bad)}')
        if bad:
            worst = float('inf')

    print('\ndeliberate errors (each must show):')
    planted = [
        ('sbo', 'A descriptor SBO 512 instead of 1024', dict(m=130, n=300, k1=96, k2=16, kn=False)),
        ('kn_box_swap', 'the four [K, N] boxes stored in reverse order', dict(m=130, n=304, k1=96, k2=16, kn=True)),
        ('mn_lbo_sbo_swapped', 'MN-major B read with LBO 1024, SBO 8192', dict(m=130, n=304, k1=96, k2=16, kn=True)),
        ('nf4_count', 'NF4: full[] initialised to 128 arrivals, not 129', dict(m=64, n=256, k1=192, k2=8, kn=False, nf4=True, bias=False, w_async=0.05)),
        ('pack2_swapped', 'NF4: cvt.rn.bf16x2 halves swapped', dict(m=64, n=260, k1=128, k2=0, kn=False, nf4=True, bias=False)),
        ('early_release', 'empty[] arrived right after commit (no wait_group)', dict(m=64, n=256, k1=448, k2=0, kn=False, bias=False, f32_out=True, w_async=0.02)),
        ('tx_a_only', 'expect_tx of A bytes only', dict(m=64, n=256, k1=128, k2=0, kn=False, bias=False, f32_out=True, w_async=0.05)),
    ]
    ok = True
    for bug, what, kw in planted:
        BUGS.clear()
        BUGS.add(bug)
        try:
            r = run_case(f'  [{bug}] {what}', seed=7, **kw)
            caught = r is None or r[0] > 0.05 or not r[1] or bool(r[2])
        except ModelError as e:
            print(f'  [{bug}] {what}: ModelError: {e}')
            caught = True
        ok &= caught
    BUGS.clear()
    print('all planted errors caught:', ok)
    return 0 if worst < 5e-3 and ok else 1


if __name__ == '__main__':
    sys.exit(main())
