"""A numpy model of kernels-cuda/flash_attention_sm90.cu's forward (flash_attn_fwd_sm90_*), run
block by block against a float64 attention with the masks of AttentionParams::visible.

What it mirrors, each piece written from the kernel's own arithmetic:
- FaBlock (attention.cuh): each thread's rows r0/r1, quad column c, segment starts, the key
  tile range [kv_first, s_end) and the KV offset.
- fh_load_tile: every 16-byte cp.async with the kernel's destination formula (chunk of 64
  columns, swizzled(r, piece)), its global source (bounds-checked) or zero fill past the rows.
- The shared-memory base alignment ((raw + 1023) & ~1023, raw deliberately not 1024-aligned)
  and the launcher's dynamic shared-memory size (cuda.rs), every access checked against it.
- smem_desc as the kernel encodes it, then decoded the way the hardware reads it: start
  address, LBO, SBO, base offset 0, swizzle mode 1 (128 B), the 128-byte swizzle applied to the
  absolute address (16-byte piece bits 4..6 xor row bits 7..9). Operands are read by the
  canonical SW128 layouts (CUTLASS make_gmma_desc / PTX "shared memory matrix layout"):
    K-major  (i, k):  start + (i/8)*SBO + (i%8)*128 + 2k                  (LBO unused)
    MN-major (n, k):  start + (n/64)*LBO + (k/8)*SBO + (k%8)*128 + 2(n%64)
- The m64nN f32 accumulator layout and the m64k16 A-register layout (thread t, warp w = t/32,
  lane l, g = l/4, c = l%4): d[4j+e] at row 16w + g + 8*(e>=2), column 8j + 2c + (e&1);
  A register r, half h at row 16w + g + 8*(r&1), k 2c + h + 8*(r>>1).
- fa_softmax_step per accumulator element (mask, scale into the log2 domain, quad max by xor
  shuffles, -inf rows, exp2, rescale of O and l) and fa_store_out (quad sum of l, 1/l, O rounded
  to the 16-bit type, lse = (m + log2 l) ln 2, -inf for empty rows), every O / lse element
  checked to be written exactly once.
- Ordering rules (PTX), checked as the kernel's statements run: cp.async data only visible
  after cp.async.wait_group + fence.proxy.async + bar.sync before a wgmma reads it; no cp.async
  into bytes an in-flight wgmma reads; no register read/write of accumulators or A fragments
  while their wgmma is in flight; wgmma.fence between register writes and a wgmma using them.

Result (this version of the kernel): no layout, masking or ordering error found. O is within
16-bit rounding of the float64 reference (max |err| / max |O|: 2e-4 to 4e-4 in f16, 2e-3 to
3e-3 in bf16), lse within 2e-6, on the cases below: D 64 and 128, T < S and T > S, ragged T
and S, GQA, batch 2, causal with the KV offset, windows with and without causal, packed
segments, a block whose rows see nothing (lse -inf, O 0) and S = 0. The model can fail:
`--bug repack` swaps A registers 1 and 2 of the P re-pack (row g+8 <-> column +8), `--bug
vdesc` swaps LBO and SBO of V's transposed descriptor (at D 64, one 64-column chunk, the
swapped SBO sends keys 8..15 of each slice into the other V buffer and the cp.async check
stops the run), `--bug swizzle` drops the xor from the cp.async destination. On the D 128 causal GQA case they
give O errors of 5.6, 1.4 and 1.6 times max |O| (the swizzle one also lse off by 2.2); the
default run prints them after the clean cases.

Limits: it checks the kernel's addressing under one reading of the hardware layouts, not the
hardware; after a change to the kernel's layouts, change this too. Warps are run in lockstep
(the kernel's barriers make that exact for shared memory; per-warp register timing is not
modelled). f32 arithmetic is numpy's (exp2f, fma contraction and the tensor cores' internal
accumulation order differ slightly). Needs numpy; not run by CI.
Run: python3 flash_attn_fwd_sm90.py [--bug repack|vdesc|swizzle]
"""
import math
import sys

import numpy as np

ROWS = 64  # FH_ROWS: queries per block, keys per tile
F32 = np.float32
NEG_INF = F32(-np.inf)


# ---------------------------------------------------------------------------------------------
# 16-bit storage types (T::from_f32): f16 by cvt.rn, bf16 by round-to-nearest-even on the bits.
def round_f16(x):
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def round_bf16(x):
    u = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(F32)


ROUND = {"f16": round_f16, "bf16": round_bf16}


# ---------------------------------------------------------------------------------------------
# Hardware side: descriptors, the 128-byte swizzle, the canonical operand layouts, the
# register layouts.
def smem_desc(addr, lbo, sbo):  # wgmma.cuh smem_desc, bit for bit
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def decode_desc(d):  # PTX matrix descriptor fields
    start = (d & 0x3FFF) << 4
    lbo = ((d >> 16) & 0x3FFF) << 4
    sbo = ((d >> 32) & 0x3FFF) << 4
    base_off = (d >> 49) & 7
    mode = (d >> 62) & 3
    return start, lbo, sbo, base_off, mode


def hw_swizzle128(addr):  # the swizzle the tensor cores apply to an absolute shared address
    return addr ^ (((addr >> 7) & 7) << 4)


def kernel_swizzled(r, piece):  # wgmma.cuh swizzled(): byte offset of a piece in a chunk
    return r * 128 + ((piece ^ (r & 7)) << 4)


_addr_cache = {}


def operand_addresses(desc, mn, mn_major):
    """Physical byte address of element (i, k), i < mn along M/N, k < 16, of a wgmma operand."""
    key = (desc, mn, mn_major)
    if key in _addr_cache:
        return _addr_cache[key]
    start, lbo, sbo, base_off, mode = decode_desc(desc)
    assert mode == 1 and base_off == 0, "only the 128-byte swizzle with base offset 0 is modelled"
    i = np.arange(mn)[:, None]
    k = np.arange(16)[None, :]
    if not mn_major:
        a = start + (i // 8) * sbo + (i % 8) * 128 + 2 * k
    else:
        a = start + (i // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (i % 64)
    a = hw_swizzle128(a)
    _addr_cache[key] = a
    return a


def acc_coords(n):
    """(row, col) of accumulator d[i] of thread t, arrays [128, n/2]."""
    t = np.arange(128)[:, None]
    i = np.arange(n // 2)[None, :]
    w, l = t // 32, t % 32
    j, e = i // 4, i % 4
    return 16 * w + l // 4 + 8 * (e >= 2), 8 * j + 2 * (l % 4) + (e & 1)


def afrag_coords():
    """(row, k) of A register r (0..3), half h (0 low, 1 high) of thread t, arrays [128, 4, 2]."""
    t = np.arange(128)[:, None, None]
    r = np.arange(4)[None, :, None]
    h = np.arange(2)[None, None, :]
    w, l = t // 32, t % 32
    return 16 * w + l // 4 + 8 * (r & 1), 2 * (l % 4) + h + 8 * (r >> 1)


ACC32 = acc_coords(64)
AFRAG = afrag_coords()


def regs_to_mat(regs, n):
    rows, cols = acc_coords(n) if n != 64 else ACC32
    m = np.zeros((64, n), F32)
    m[rows, cols] = regs
    return m


def mat_to_regs(m, n):
    rows, cols = acc_coords(n) if n != 64 else ACC32
    return m[rows, cols].astype(F32)


# ---------------------------------------------------------------------------------------------
# Shared memory with the proxy / cp.async / wgmma ordering checks.
class Smem:
    VISIBLE, IN_FLIGHT, LANDED, FENCED = 0, 1, 2, 3

    def __init__(self, raw, nbytes):
        self.lo, self.hi = raw, raw + nbytes  # the dynamic allocation [raw, raw + size)
        n = (raw + nbytes + 1) // 2
        self.val = np.full(n, np.nan, F32)  # one 16-bit element per slot
        self.state = np.zeros(n, np.int8)
        self.wg_reads = np.zeros(n, bool)  # read by a wgmma not yet waited on
        self.open_group, self.groups = [], []

    def cp_async16(self, dst, vals):  # dst [n] byte addresses, vals [n, 8]
        assert np.all(dst % 16 == 0), "cp.async 16 needs a 16-byte aligned destination"
        assert np.all((dst >= self.lo) & (dst + 16 <= self.hi)), "cp.async outside the dynamic shared memory"
        slots = (dst // 2)[:, None] + np.arange(8)[None, :]
        assert not self.wg_reads[slots].any(), "cp.async into bytes an in-flight wgmma reads"
        assert not (self.state[slots] == self.IN_FLIGHT).any(), "two cp.async in flight to the same bytes"
        self.state[slots] = self.IN_FLIGHT
        self.open_group.append((slots, vals))

    def commit(self):
        self.groups.append(self.open_group)
        self.open_group = []

    def wait_group(self, n):  # cp.async.wait_group n: all but the newest n groups complete
        done = self.groups[: max(0, len(self.groups) - n)]
        self.groups = self.groups[len(done):]
        for g in done:
            for slots, vals in g:
                self.val[slots] = vals
                self.state[slots] = self.LANDED

    def fence_proxy_async(self):  # every thread runs it after its own waits
        self.state[self.state == self.LANDED] = self.FENCED

    def barrier(self):
        self.state[self.state == self.FENCED] = self.VISIBLE

    def wgmma_read(self, addrs):
        assert np.all((addrs >= self.lo) & (addrs + 2 <= self.hi)), "wgmma operand outside the dynamic shared memory"
        s = addrs // 2
        st = self.state[s]
        assert not (st == self.IN_FLIGHT).any(), "wgmma reads bytes whose cp.async was not waited on"
        assert not (st == self.LANDED).any(), "wgmma reads cp.async data without fence.proxy.async"
        assert not (st == self.FENCED).any(), "wgmma reads other threads' data before the barrier"
        self.wg_reads[s] = True
        v = self.val[s]
        assert not np.isnan(v).any(), "wgmma reads shared memory nothing wrote"
        return v

    def wgmma_waited(self):
        self.wg_reads[:] = False


class Regs:
    """Register-side wgmma rules: wgmma.fence between writes and a wgmma using the registers;
    no access while a wgmma using them is in flight."""

    def __init__(self):
        self.dirty, self.in_flight = set(), set()

    def write(self, name):
        assert name not in self.in_flight, f"{name} written while a wgmma using it is in flight"
        self.dirty.add(name)

    def read(self, name):
        assert name not in self.in_flight, f"{name} read while a wgmma using it is in flight"

    def wgmma_fence(self):
        self.dirty.clear()

    def wgmma(self, *names):
        for n in names:
            assert n not in self.dirty, f"wgmma uses {n} written after the last wgmma.fence"
        self.in_flight.update(names)

    def wait0(self):
        self.in_flight.clear()


# ---------------------------------------------------------------------------------------------
# The kernel, one block (blockIdx = (bx, h, b)).
def fwd_block(g, p, D, dtype, blk, bug=None, raw=16):
    rnd = ROUND[dtype]
    T_, S, H, G = p["q_len"], p["kv_len"], p["heads"], p["kv_heads"]
    TILE = ROWS * D * 2
    NT = D // 8
    smem_bytes = 5 * 64 * D * 2 + 1024  # cuda.rs: 5 * BLOCK_Q * d * 2 + 1024
    sm = Smem(raw, smem_bytes)
    rg = Regs()
    base = (raw + 1023) & ~1023
    qs, ks, vs = base, base + TILE, base + 3 * TILE

    # FaBlock
    bx, h, b = blk
    q0 = bx * 64
    kvh = h // (H // G)
    tid = np.arange(128)
    lane = tid & 31
    c = lane & 3
    off = S - T_
    q_row, kv_row = H * D, G * D
    qb = (b * T_) * q_row + h * D
    kb = vb = (b * S) * kv_row + kvh * D
    r0 = q0 + (tid >> 5) * 16 + (lane >> 2)
    r1 = r0 + 8
    starts = g["starts"]
    packed = starts is not None
    st0 = np.array([starts[b * T_ + r] if (packed and r < T_) else 0 for r in r0], np.int64)
    st1 = np.array([starts[b * T_ + r] if (packed and r < T_) else 0 for r in r1], np.int64)
    s_end = S
    if p["causal"]:
        s_end = min(S, min(q0 + 64, T_) - 1 + off + 1)
    s_begin = max(0, q0 + off - p["window"] + 1) if p["window"] > 0 else 0
    kv_first = (s_begin // 64) * 64

    def load_tile(dst, src, gbase, row0, rows, row_stride):  # fh_load_tile<D>
        i = np.arange(ROWS * (D // 8))  # thread i % 128 issues piece i (loop i += 128)
        r, c8 = i // (D // 8), i % (D // 8)
        row = row0 + r
        inb = row < rows
        if bug == "swizzle":
            dsto = dst + (c8 // 8) * (ROWS * 128) + r * 128 + (c8 % 8) * 16
        else:
            dsto = dst + (c8 // 8) * (ROWS * 128) + kernel_swizzled(r, c8 % 8)
        srci = np.where(inb, gbase + row * row_stride + c8 * 8, gbase)
        vals = np.zeros((len(i), 8), F32)
        idx = srci[inb][:, None] + np.arange(8)[None, :]
        assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(src)), "cp.async reads outside the global tensor"
        vals[inb] = src[idx]
        sm.cp_async16(dsto, vals)

    load_tile(qs, g["q"], qb, q0, T_, q_row)
    if kv_first < s_end:
        load_tile(ks, g["k"], kb, kv_first, S, kv_row)
        load_tile(vs, g["v"], vb, kv_first, S, kv_row)
    sm.commit()

    oacc = np.zeros((128, D // 2), F32)
    rg.write("oacc")
    m0 = np.full(128, NEG_INF)
    m1 = np.full(128, NEG_INF)
    l0 = np.zeros(128, F32)
    l1 = np.zeros(128, F32)
    buf = 0
    kv0 = kv_first
    while kv0 < s_end:
        sm.wait_group(0)
        sm.fence_proxy_async()
        sm.barrier()
        if kv0 + ROWS < s_end:
            load_tile(ks + (buf ^ 1) * TILE, g["k"], kb, kv0 + ROWS, S, kv_row)
            load_tile(vs + (buf ^ 1) * TILE, g["v"], vb, kv0 + ROWS, S, kv_row)
        sm.commit()
        kt, vt = ks + buf * TILE, vs + buf * TILE

        # S = Q.K^T: m64n64k16 SS, both K-major ("0, 0")
        sacc = np.zeros((128, 32), F32)
        rg.write("sacc")
        rg.wgmma_fence()
        smat = regs_to_mat(sacc, 64).astype(np.float64)
        for kk in range(D // 16):
            at = (kk // 4) * (ROWS * 128) + (kk % 4) * 32
            rg.wgmma("sacc")
            A = sm.wgmma_read(operand_addresses(smem_desc(qs + at, 16, 1024), 64, False))
            B = sm.wgmma_read(operand_addresses(smem_desc(kt + at, 16, 1024), 64, False))
            smat = (smat + A.astype(np.float64) @ B.astype(np.float64).T).astype(F32)
        sacc = mat_to_regs(smat, 64)
        rg.wait0()
        sm.wgmma_waited()

        # fa_softmax_step<NT>
        rg.read("sacc")
        m0, m1, l0, l1 = softmax_step(sacc, oacc, kv0, r0, r1, c, off, st0, st1, packed, p, m0, m1, l0, l1)
        rg.write("sacc")
        rg.write("oacc")

        # P -> A fragments: k16 slice kk from 8-key tiles 2kk, 2kk+1 (d[8kk .. 8kk+7])
        pa = np.zeros((128, 4, 4, 2), F32)  # [thread, kk, register, half]
        for kk in range(4):
            s0 = sacc[:, 8 * kk: 8 * kk + 8]
            pa[:, kk, 0] = rnd(s0[:, 0:2])
            pa[:, kk, 1] = rnd(s0[:, 2:4])
            pa[:, kk, 2] = rnd(s0[:, 4:6])
            pa[:, kk, 3] = rnd(s0[:, 6:8])
        if bug == "repack":
            pa[:, :, [1, 2]] = pa[:, :, [2, 1]]
        rg.read("sacc")
        rg.write("pa")
        rg.wgmma_fence()

        # O += P.V: m64n{D}k16 RS, B = V through the transposed descriptor (imm-trans-b 1)
        omat = regs_to_mat(oacc, D).astype(np.float64)
        for kk in range(4):
            rg.wgmma("oacc", "pa")
            A = np.zeros((64, 16), F32)
            A[AFRAG[0], AFRAG[1]] = pa[:, kk]
            lbo, sbo = (1024, ROWS * 128) if bug == "vdesc" else (ROWS * 128, 1024)
            B = sm.wgmma_read(operand_addresses(smem_desc(vt + kk * 2048, lbo, sbo), D, True))
            omat = (omat + A.astype(np.float64) @ B.astype(np.float64).T).astype(F32)
        oacc = mat_to_regs(omat, D)
        rg.wait0()
        sm.wgmma_waited()
        kv0 += ROWS
        buf ^= 1
    sm.wait_group(0)
    rg.read("oacc")
    store_out(g, oacc, p, D, b, h, r0, r1, c, m0, m1, l0, l1, rnd)


def shfl_xor(x, sh):
    return x[np.arange(128) ^ sh]


def softmax_step(s, o, kv0, r0, r1, c, off, st0, st1, packed, p, m0, m1, l0, l1):
    """fa_softmax_step, vectorized over the 128 threads; s [128, 32] and o [128, D/2] in place."""
    sl = F32(p["scale_log2"])
    tmax0 = np.full(128, NEG_INF)
    tmax1 = np.full(128, NEG_INF)
    for j in range(8):
        for e in range(4):
            t = r0 if e < 2 else r1
            key = kv0 + j * 8 + 2 * c + (e & 1)
            st = st0 if e < 2 else st1
            ok = key < p["kv_len"]
            if p["causal"]:
                ok = ok & (key <= t + off)
            if p["window"] > 0:
                ok = ok & (key > t + off - p["window"])
            if packed:
                ok = ok & (key >= st)
            x = np.where(ok, s[:, 4 * j + e] * sl, NEG_INF).astype(F32)
            s[:, 4 * j + e] = x
            if e < 2:
                tmax0 = np.maximum(tmax0, x)
            else:
                tmax1 = np.maximum(tmax1, x)
    for sh in (1, 2):
        tmax0 = np.maximum(tmax0, shfl_xor(tmax0, sh))
        tmax1 = np.maximum(tmax1, shfl_xor(tmax1, sh))
    mn0, mn1 = np.maximum(m0, tmax0), np.maximum(m1, tmax1)
    with np.errstate(invalid="ignore"):
        a0 = np.where(mn0 == NEG_INF, F32(1), np.exp2(m0 - mn0)).astype(F32)
        a1 = np.where(mn1 == NEG_INF, F32(1), np.exp2(m1 - mn1)).astype(F32)
        ps0 = np.zeros(128, F32)
        ps1 = np.zeros(128, F32)
        for j in range(8):
            for e, mn in ((0, mn0), (1, mn0), (2, mn1), (3, mn1)):
                s[:, 4 * j + e] = np.where(mn == NEG_INF, F32(0), np.exp2(s[:, 4 * j + e] - mn)).astype(F32)
            ps0 = ps0 + s[:, 4 * j] + s[:, 4 * j + 1]
            ps1 = ps1 + s[:, 4 * j + 2] + s[:, 4 * j + 3]
    l0 = (l0 * a0 + ps0).astype(F32)
    l1 = (l1 * a1 + ps1).astype(F32)
    for n in range(o.shape[1] // 4):
        o[:, 4 * n + 0] *= a0
        o[:, 4 * n + 1] *= a0
        o[:, 4 * n + 2] *= a1
        o[:, 4 * n + 3] *= a1
    return mn0, mn1, l0, l1


def store_out(g, acc, p, D, b, h, r0, r1, c, m0, m1, l0, l1, rnd):
    """fa_store_out: u32 stores of two adjacent columns, lse by the quad's c == 0 thread."""
    for sh in (1, 2):
        l0 = (l0 + shfl_xor(l0, sh)).astype(F32)
        l1 = (l1 + shfl_xor(l1, sh)).astype(F32)
    T_, H = p["q_len"], p["heads"]
    q_row = H * D
    with np.errstate(divide="ignore"):
        inv0 = np.where(l0 > 0, F32(1) / l0, F32(0)).astype(F32)
        inv1 = np.where(l1 > 0, F32(1) / l1, F32(0)).astype(F32)
    ob = (b * T_) * q_row + h * D
    o, ocount = g["o"], g["o_writes"]
    for n in range(D // 8):
        col = n * 8 + 2 * c
        for rows, e0, inv in ((r0, 0, inv0), (r1, 2, inv1)):
            sel = rows < T_
            at = ob + rows[sel] * q_row + col[sel]
            assert np.all(at % 2 == 0), "u32 store of O not 4-byte aligned"
            for d in range(2):
                o[at + d] = rnd(acc[sel, 4 * n + e0 + d] * inv[sel])
                np.add.at(ocount, at + d, 1)
    lb = (b * H + h) * T_
    ln2 = F32(0.69314718055994531)
    with np.errstate(divide="ignore"):
        for rows, m, l in ((r0, m0, l0), (r1, m1, l1)):
            sel = (c == 0) & (rows < T_)
            val = np.where(l > 0, (m + np.log2(np.where(l > 0, l, F32(1)))).astype(F32) * ln2, NEG_INF).astype(F32)
            g["lse"][lb + rows[sel]] = val[sel]
            np.add.at(g["lse_writes"], lb + rows[sel], 1)


# ---------------------------------------------------------------------------------------------
# float64 reference with AttentionParams::visible's masks (python ints: no usize wrap).
def visible(p, b, t, starts):
    pos = p["kv_len"] - p["q_len"] + t
    hi = min(pos + 1, p["kv_len"]) if p["causal"] else p["kv_len"]
    lo = max(0, pos + 1 - p["window"]) if p["window"] > 0 else 0
    if starts is not None:
        lo = max(lo, int(starts[b * p["q_len"] + t]))
    return min(lo, hi), hi


def reference(q, k, v, starts, p, D):
    B_, T_, S, H, G = p["batch"], p["q_len"], p["kv_len"], p["heads"], p["kv_heads"]
    q = q.reshape(B_, T_, H, D).astype(np.float64)
    k = k.reshape(B_, S, G, D).astype(np.float64)
    v = v.reshape(B_, S, G, D).astype(np.float64)
    o = np.zeros((B_, T_, H, D))
    lse = np.full((B_, H, T_), -np.inf)
    scale = float(F32(p["scale"]))
    for b in range(B_):
        for h in range(H):
            gh = h // (H // G)
            for t in range(T_):
                lo, hi = visible(p, b, t, starts)
                if lo >= hi:
                    continue
                s = scale * (k[b, lo:hi, gh] @ q[b, t, h])
                mx = s.max()
                e = np.exp(s - mx)
                o[b, t, h] = e @ v[b, lo:hi, gh] / e.sum()
                lse[b, h, t] = mx + math.log(e.sum())
    return o.reshape(-1), lse.reshape(-1)


# ---------------------------------------------------------------------------------------------
def run(name, B_, T_, S, H, G, D, causal=False, window=0, packed=None, dtype="f16", bug=None, seed=0):
    rng = np.random.default_rng(seed)
    rnd = ROUND[dtype]
    q = rnd(rng.standard_normal(B_ * T_ * H * D).astype(F32) * 1.5)
    k = rnd(rng.standard_normal(B_ * S * G * D).astype(F32) * 1.5)
    v = rnd(rng.standard_normal(B_ * S * G * D).astype(F32))
    starts = None
    if packed == "segments":  # three examples per row, at random cuts (T == S)
        starts = np.zeros(B_ * T_, np.int64)
        for b in range(B_):
            cuts = sorted(rng.choice(np.arange(1, T_), 2, replace=False))
            for t in range(T_):
                starts[b * T_ + t] = max([0] + [x for x in cuts if x <= t])
    elif packed == "empty_block":  # rows 64..127 start past the sequence: nothing visible
        starts = np.zeros(B_ * T_, np.int64)
        for b in range(B_):
            for t in range(64, min(128, T_)):
                starts[b * T_ + t] = T_ + 5
    scale = 1.0 / math.sqrt(D)
    p = dict(batch=B_, q_len=T_, kv_len=S, heads=H, kv_heads=G, causal=causal, window=window,
             scale=F32(scale), scale_log2=F32(F32(scale) * F32(math.log2(math.e))))
    g = dict(q=q, k=k, v=v, starts=starts,
             o=np.full(B_ * T_ * H * D, np.nan, F32), lse=np.full(B_ * H * T_, np.nan, F32),
             o_writes=np.zeros(B_ * T_ * H * D, np.int64), lse_writes=np.zeros(B_ * H * T_, np.int64))
    for b in range(B_):  # grid (ceil(T / 64), H, B)
        for h in range(H):
            for bx in range((T_ + 63) // 64):
                fwd_block(g, p, D, dtype, (bx, h, b), bug=bug)
    assert np.all(g["o_writes"] == 1), "O elements not written exactly once"
    assert np.all(g["lse_writes"] == 1), "lse elements not written exactly once"
    o_ref, lse_ref = reference(q, k, v, starts, p, D)
    o_err = float(np.abs(g["o"] - o_ref).max() / max(np.abs(o_ref).max(), 1e-30))
    fin = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(g["lse"]), fin), "lse -inf rows differ"
    assert np.all(g["lse"][~fin] == -np.inf)
    lse_err = float(np.abs(g["lse"][fin] - lse_ref[fin]).max()) if fin.any() else 0.0
    empty = int((~fin).sum())
    print(f"{name:44s} {dtype:4s} D{D:<3d} T{T_:<3d} S{S:<3d} H{H} G{G} B{B_}: "
          f"O err {o_err:.2e}  lse err {lse_err:.2e}  empty rows {empty}", flush=True)
    return o_err, lse_err


CASES = [
    ("plain, ragged T = S", dict(B_=2, T_=100, S=100, H=2, G=2, D=64)),
    ("causal, KV offset (T < S), GQA", dict(B_=1, T_=70, S=150, H=4, G=2, D=128, causal=True)),
    ("causal + window 40", dict(B_=1, T_=130, S=130, H=2, G=1, D=64, causal=True, window=40, dtype="bf16")),
    ("causal + window 50, T < S", dict(B_=1, T_=90, S=150, H=2, G=1, D=128, causal=True, window=50)),
    ("window 30, not causal", dict(B_=1, T_=150, S=150, H=1, G=1, D=64, window=30)),
    ("window 20, not causal, T > S", dict(B_=1, T_=150, S=90, H=2, G=2, D=64, window=20)),
    ("long KV (6 tiles), causal, T < S", dict(B_=1, T_=130, S=330, H=2, G=1, D=64, causal=True, dtype="bf16")),
    ("causal, T = S, batch 2", dict(B_=2, T_=130, S=130, H=2, G=1, D=128, causal=True, dtype="bf16")),
    ("T > S, not causal, GQA", dict(B_=1, T_=150, S=90, H=3, G=1, D=128, dtype="bf16")),
    ("packed segments, causal", dict(B_=2, T_=100, S=100, H=2, G=1, D=128, causal=True, packed="segments")),
    ("packed, not causal", dict(B_=1, T_=130, S=130, H=1, G=1, D=64, packed="segments")),
    ("block with nothing visible (rows 64..127)", dict(B_=1, T_=150, S=150, H=1, G=1, D=64, packed="empty_block")),
    ("S = 0 (nothing to see)", dict(B_=1, T_=70, S=0, H=2, G=1, D=64)),
]

BUG_CASE = ("causal, KV offset (T < S), GQA", dict(B_=1, T_=70, S=150, H=4, G=2, D=128, causal=True))

if __name__ == "__main__":
    bugs = ["repack", "vdesc", "swizzle"]
    if len(sys.argv) > 2 and sys.argv[1] == "--bug":
        bugs = [sys.argv[2]]
        cases = []
    else:
        cases = CASES
    for name, kw in cases:
        run(name, **kw)
    for bug in bugs:
        name, kw = BUG_CASE
        run(f"BUG {bug}: {name}"[:44], bug=bug, **kw)
