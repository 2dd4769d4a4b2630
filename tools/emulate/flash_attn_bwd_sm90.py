"""A numpy model of kernels-cuda/flash_attention_sm90.cu's backward (flash_attn_bwd_sm90): the
swizzled shared-memory tiles as fh_load_tile and the dS^T stores write them, the wgmma
descriptors as smem_desc builds them, operands read by the 128-byte-swizzle canonical layouts
(K-major and MN-major), the A-fragment and accumulator layouts, the masks and the dQ/dK/dV
writes; checked against a float64 attention backward. It found no layout error in the kernel
(f16 rounding level, ~5e-4 relative, on the shapes below) and does catch one (two dS^T store
pieces swapped: dQ off by 1.35).

It mirrors the kernel by hand, so it checks the kernel's addressing under one reading of the
hardware's layouts, not the kernel itself: after a change to the kernel's layouts, change this
too. A GPU failure at one head dim or mask is the time to use it: try another reading of a
descriptor field here and see whether the model's error moves the same way. Needs numpy;
not run by CI (slow: pure-Python loops over every thread). Run: python3 flash_attn_bwd_sm90.py
"""
import numpy as np, math, sys
F16 = np.float16
def rnd(x): return np.float32(F16(x))

def swz(a):  # hardware 128B swizzle on absolute byte address (base 1024-aligned)
    return a ^ (((a >> 7) & 7) << 4)
def swizzled(r, piece): return r * 128 + ((piece ^ (r & 7)) << 4)
def smem_desc(addr, lbo, sbo): return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)
def dec(d): return ((d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4)

class Smem:
    def __init__(s, n): s.m = np.zeros(n // 2, dtype=np.float32)
    def st16(s, a, v): assert a % 2 == 0; s.m[a // 2] = v
    def ld16(s, a): return s.m[a // 2]

def read_op(sm, desc, mn, trans):
    """matrix [mn][16] of a wgmma operand (A: M x K, B: N x K) per the SW128 canonical layouts."""
    start, lbo, sbo = dec(desc)
    out = np.zeros((mn, 16), np.float32)
    for i in range(mn):
        for k in range(16):
            if not trans:  # K-major: rows along MN in 8-row groups at SBO, 128 B a row, K contiguous
                a = start + (i // 8) * sbo + (i % 8) * 128 + 2 * k
            else:          # MN-major: 64-element MN chunks at LBO, K rows of 128 B, 8-row groups at SBO
                a = start + (i // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + 2 * (i % 64)
            out[i, k] = sm.ld16(swz(a))
    return out

def acc_pos(t, i):  # accumulator d[i] of thread t -> (row, col)
    w, l = t // 32, t % 32
    j, e = i // 4, i % 4
    return 16 * w + l // 4 + (8 if e >= 2 else 0), 8 * j + 2 * (l % 4) + (e & 1)

def afrag_pos(t, r, h):  # A register r (half h) of thread t for an m64k16 slice -> (row, k)
    w, l = t // 32, t % 32
    g, c = l // 4, l % 4
    row = 16 * w + g + (8 if r in (1, 3) else 0)
    k = 2 * c + h + (8 if r in (2, 3) else 0)
    return row, k

def mat_to_frag(M):  # 64 x N matrix -> per-thread d[]
    N = M.shape[1]
    return [[M[acc_pos(t, i)] for i in range(N // 2)] for t in range(128)]
def frag_to_mat(fr, N):
    M = np.zeros((64, N), np.float32)
    for t in range(128):
        for i in range(N // 2): M[acc_pos(t, i)] = fr[t][i]
    return M

def kernel(q, k, v, starts, dout, lse, dvec, dq_acc, dk, dv, p, D, blk):
    B_, T_, H, _ = q.shape; S = k.shape[1]; G = k.shape[2]; hpg = H // G
    TILE = 64 * D * 2
    sm = Smem(6 * TILE + 8192 + 1536 + 1024)
    base = 0
    ks, vs, qs, dos, dss = base, base + TILE, base + 2 * TILE, base + 4 * TILE, base + 6 * TILE
    rowv = np.zeros(2 * 3 * 64, np.float64)  # separate (plain floats; starts as ints)
    bx, g, b = blk; k0 = bx * 64
    off = S - T_
    log2e = 1.4426950408889634
    scale = p['scale_log2'] / log2e
    def load_tile(dst, M, row0, rows):  # M: [rows, D]
        for r in range(64):
            for c8 in range(D // 8):
                row = row0 + r
                for e in range(8):
                    val = M[row, c8 * 8 + e] if row < rows else 0.0
                    sm.st16(dst + (c8 // 8) * 8192 + swizzled(r, c8 % 8) + 2 * e, val)
    load_tile(ks, k[b, :, g, :], k0, S)
    load_tile(vs, v[b, :, g, :], k0, S)
    t_begin = max(0, k0 - off) if p['causal'] else 0
    t_begin = (t_begin // 64) * 64
    t_end = T_
    if p['window'] > 0: t_end = min(T_, k0 + 64 - 1 - off + p['window'])
    n_t = (t_end - t_begin + 63) // 64 if t_end > t_begin else 0
    iters = hpg * n_t
    def load(it, bf):
        h = g * hpg + it // n_t; t0 = t_begin + (it % n_t) * 64
        load_tile(qs + bf * TILE, q[b, :, h, :], t0, T_)
        load_tile(dos + bf * TILE, dout[b, :, h, :], t0, T_)
        for tid in range(64):
            t = t0 + tid
            rv = bf * 192
            rowv[rv + tid] = lse[b, h, t] * log2e if t < T_ else 0.0
            rowv[rv + 64 + tid] = dvec[b, h, t] if t < T_ else 0.0
            rowv[rv + 128 + tid] = (starts[b, t] if (starts is not None and t < T_) else 0)
    if iters > 0: load(0, 0)
    dka = np.zeros((64, D), np.float32); dva = np.zeros((64, D), np.float32)
    for it in range(iters):
        bf = it & 1
        h = g * hpg + it // n_t; t0 = t_begin + (it % n_t) * 64
        if it + 1 < iters: load(it + 1, bf ^ 1)  # (emulation: buffers distinct)
        qt, dt = qs + bf * TILE, dos + bf * TILE
        rv = bf * 192
        sacc = np.zeros((64, 64), np.float32); pacc = np.zeros((64, 64), np.float32)
        for kk in range(D // 16):
            at = (kk // 4) * 8192 + (kk % 4) * 32
            A = read_op(sm, smem_desc(ks + at, 16, 1024), 64, 0); Bm = read_op(sm, smem_desc(qt + at, 16, 1024), 64, 0)
            sacc += A @ Bm.T
            A = read_op(sm, smem_desc(vs + at, 16, 1024), 64, 0); Bm = read_op(sm, smem_desc(dt + at, 16, 1024), 64, 0)
            pacc += A @ Bm.T
        sf = mat_to_frag(sacc); pf = mat_to_frag(pacc)
        pa = [None] * 128; dsa = [None] * 128
        for tid in range(128):
            warp, lane = tid // 32, tid % 32; gr, c = lane // 4, lane % 4
            key0 = k0 + 16 * warp + gr
            for j in range(8):
                for e in range(4):
                    s_ = key0 if e < 2 else key0 + 8
                    qi = 8 * j + 2 * c + (e & 1); t = t0 + qi
                    ok = s_ < S and t < T_
                    if p['causal']: ok = ok and s_ <= t + off
                    if p['window'] > 0: ok = ok and s_ > t + off - p['window']
                    if starts is not None: ok = ok and s_ >= rowv[rv + 128 + qi]
                    pv = np.float32(2.0 ** (float(sf[tid][4 * j + e]) * p['scale_log2'] - rowv[rv + qi])) if ok else np.float32(0)
                    sf[tid][4 * j + e] = pv
                    pf[tid][4 * j + e] = pv * (pf[tid][4 * j + e] - np.float32(rowv[rv + 64 + qi]))
            def pack(acc):
                a = []
                for kk in range(4):
                    s0 = acc[8 * kk: 8 * kk + 8]
                    a.append([(rnd(s0[0]), rnd(s0[1])), (rnd(s0[2]), rnd(s0[3])), (rnd(s0[4]), rnd(s0[5])), (rnd(s0[6]), rnd(s0[7]))])
                return a
            pa[tid] = pack(sf[tid]); dsa[tid] = pack(pf[tid])
        def amat(fr, kk):
            A = np.zeros((64, 16), np.float32)
            for tid in range(128):
                for r in range(4):
                    for hh in range(2):
                        A[afrag_pos(tid, r, hh)] = fr[tid][kk][r][hh]
            return A
        for kk in range(4):
            Bm = read_op(sm, smem_desc(dt + kk * 2048, 64 * 128, 1024), D, 1); dva += amat(pa, kk) @ Bm.T
        for kk in range(4):
            Bm = read_op(sm, smem_desc(qt + kk * 2048, 64 * 128, 1024), D, 1); dka += amat(dsa, kk) @ Bm.T
        for tid in range(128):
            warp, lane = tid // 32, tid % 32; gr, c = lane // 4, lane % 4
            r0 = 16 * warp + gr; r1 = r0 + 8
            for kk in range(4):
                for (r, pc, reg) in ((r0, 2 * kk, 0), (r1, 2 * kk, 1), (r0, 2 * kk + 1, 2), (r1, 2 * kk + 1, 3)):
                    a = dss + swizzled(r, pc) + 4 * c
                    sm.st16(a, dsa[tid][kk][reg][0]); sm.st16(a + 2, dsa[tid][kk][reg][1])
        for hn in range(D // 64):
            qacc = np.zeros((64, 64), np.float32)
            for kk in range(4):
                A = read_op(sm, smem_desc(dss + kk * 2048, 64 * 128, 1024), 64, 1)
                Bm = read_op(sm, smem_desc(ks + hn * 8192 + kk * 2048, 64 * 128, 1024), 64, 1)
                qacc += A @ Bm.T
            qf = mat_to_frag(qacc)
            for tid in range(128):
                warp, lane = tid // 32, tid % 32; gr, c = lane // 4, lane % 4
                r0 = 16 * warp + gr; r1 = r0 + 8
                for j in range(8):
                    col = hn * 64 + 8 * j + 2 * c
                    if t0 + r0 < T_:
                        dq_acc[b, t0 + r0, h, col] += scale * qf[tid][4 * j]; dq_acc[b, t0 + r0, h, col + 1] += scale * qf[tid][4 * j + 1]
                    if t0 + r1 < T_:
                        dq_acc[b, t0 + r1, h, col] += scale * qf[tid][4 * j + 2]; dq_acc[b, t0 + r1, h, col + 1] += scale * qf[tid][4 * j + 3]
    kf = mat_to_frag(dka); vf = mat_to_frag(dva)
    for tid in range(128):
        warp, lane = tid // 32, tid % 32; gr, c = lane // 4, lane % 4
        key0 = k0 + 16 * warp + gr
        for n in range(D // 8):
            col = n * 8 + 2 * c
            for (key, e0) in ((key0, 0), (key0 + 8, 2)):
                if key < S:
                    dk[b, key, g, col] = rnd(scale * kf[tid][4 * n + e0]); dk[b, key, g, col + 1] = rnd(scale * kf[tid][4 * n + e0 + 1])
                    dv[b, key, g, col] = rnd(vf[tid][4 * n + e0]); dv[b, key, g, col + 1] = rnd(vf[tid][4 * n + e0 + 1])

def reference(q, k, v, starts, dout, p):
    B_, T_, H, D = q.shape; S = k.shape[1]; G = k.shape[2]; hpg = H // G; off = S - T_
    scale = p['scale_log2'] / math.log2(math.e)
    q, k, v, dout = [x.astype(np.float64) for x in (q, k, v, dout)]
    dq = np.zeros_like(q); dk = np.zeros_like(k); dv = np.zeros_like(v); lse = np.zeros((B_, H, T_)); o = np.zeros_like(q)
    t = np.arange(T_)[:, None]; s = np.arange(S)[None, :]
    for b in range(B_):
        ok = np.ones((T_, S), bool)
        if p['causal']: ok &= s <= t + off
        if p['window'] > 0: ok &= s > t + off - p['window']
        if starts is not None: ok &= s >= starts[b][:, None]
        for h in range(H):
            g = h // hpg
            sc = scale * q[b, :, h] @ k[b, :, g].T
            sc = np.where(ok, sc, -np.inf)
            m = sc.max(1, keepdims=True); m = np.where(np.isfinite(m), m, 0)
            e = np.exp(sc - m); l = e.sum(1, keepdims=True)
            P = np.where(l > 0, e / np.where(l > 0, l, 1), 0)
            lse[b, h] = np.where(l[:, 0] > 0, m[:, 0] + np.log(np.where(l[:, 0] > 0, l[:, 0], 1)), -np.inf)
            o[b, :, h] = P @ v[b, :, g]
            dP = dout[b, :, h] @ v[b, :, g].T
            Dv = (dout[b, :, h] * o[b, :, h]).sum(1, keepdims=True)
            dS = P * (dP - Dv)
            dv[b, :, g] += P.T @ dout[b, :, h]
            dq[b, :, h] = scale * dS @ k[b, :, g]
            dk[b, :, g] += scale * dS.T @ q[b, :, h]
    return dq, dk, dv, lse, o

def run(B_, T_, S, H, G, D, causal, window, packed, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *sh: rnd(rng.standard_normal(sh).astype(np.float32))
    q, k, v, dout = f(B_, T_, H, D), f(B_, S, G, D), f(B_, S, G, D), f(B_, T_, H, D)
    starts = None
    if packed:
        starts = np.zeros((B_, T_), np.int64)
        for b in range(B_):
            cut = sorted(rng.choice(np.arange(1, T_), 2, replace=False)); st = 0
            for t in range(T_):
                if t in cut: st = t
                starts[b, t] = st
    p = dict(causal=causal, window=window, scale_log2=(1 / math.sqrt(D)) * math.log2(math.e))
    dq, dk, dv, lse, o = reference(q, k, v, starts, dout, p)
    dvec = (dout.astype(np.float64) * rnd(o).astype(np.float64)).sum(-1).transpose(0, 2, 1)  # [B,H,T]
    dq_acc = np.zeros(q.shape, np.float64); dk_o = np.full(k.shape, np.nan); dv_o = np.full(v.shape, np.nan)
    for b in range(B_):
        for g in range(G):
            for bx in range((S + 63) // 64):
                kernel(q, k, v, starts, dout, lse.astype(np.float32), dvec.astype(np.float32), dq_acc, dk_o, dv_o, p, D, (bx, g, b))
    err = lambda a, r: float(np.abs(a - r).max() / (np.abs(r).max() + 1e-9))
    print(f"T{T_} S{S} H{H} G{G} D{D} causal{causal} win{window} packed{packed}: dq {err(dq_acc, dq):.2e} dk {err(dk_o, dk):.2e} dv {err(dv_o, dv):.2e}", flush=True)

if __name__ == '__main__':
    run(1, 70, 70, 2, 1, 64, False, 0, False)
    run(1, 70, 90, 2, 1, 64, True, 0, False)
    run(1, 130, 130, 2, 2, 64, True, 40, False)
    run(1, 100, 100, 4, 2, 128, False, 0, True)
    run(1, 90, 150, 2, 1, 128, True, 50, False)
