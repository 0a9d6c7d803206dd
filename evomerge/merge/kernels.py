"""Fused CPU kernels (numba) for the task-arithmetic family.

The output is produced in blocks that fit in L1/L2: for each task vector a tight loop writes its trimmed,
weighted block into a small buffer, then one loop elects signs and writes base + result. Every input is
read once from memory and every intermediate stays in cache, so the merge runs near memory bandwidth,
where a chain of torch elementwise ops would make ~25 passes. Two task vectors whose trims are random or
none (DARE-TIES) skip the buffers: they are trimmed and elected in one loop.

Trim modes per task vector: 0 keep all, 1 magnitude band lo <= |x| <= hi minus the sorted indices in
`drop` (ties at the threshold that the reference sort ordered out), 2 random (keep when the entry's draw
u < thr, thr >= 1), 3 DELLA (keep when u / 2**32 < plo + pspan * rank[j]). Random trims draw twice, once
for the rescale's kept L1 and once in the merge: a draw costs a few vector instructions per 8 entries,
less than storing and reloading a mask.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from evomerge.merge.rng import GOLDEN, MIX1, MIX2, TOP

BLOCK = 4096
_INV32 = 2.3283064365386963e-10  # 2**-32


@intrinsic
def _mix(typingctx, z):
    """rng.draws' mixing of z = key + j * GOLDEN (wrapped: only its low 32 bits count), less 2**31, as an
    int32. Built from 32-bit ops: numba would widen them to 64 bits, which keeps LLVM from vectorising 8
    entries wide. Callers step z by GOLDEN, which LLVM turns into an 8-lane induction."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        h = builder.trunc(args[0], i32)
        for shift, mult in ((16, MIX1), (13, MIX2)):
            h = builder.mul(builder.xor(h, builder.lshr(h, ir.Constant(i32, shift))), ir.Constant(i32, mult))
        return h  # two's complement: the flipped top bit of rng.draws is the offset of 2**31

    return types.int32(types.int64), codegen


@njit(inline="always")
def _cut(thr):
    """Keep an entry when its _mix <= this: u < thr, for 1 <= thr <= 2**32 (2**32: every entry, as for
    trims other than random, whose `thr` is that of p = 1)."""
    return np.int32(thr - TOP - 1)


@njit(inline="always")
def _elect2(v0, v1, w0, w1, normalize):
    """TIES' election between two trimmed, weighted values: the sum of those agreeing with the sign of
    their sum (an exact 0 counts as +), divided by the agreeing weights if `normalize`."""
    zero, one = np.float32(0.0), np.float32(1.0)
    sign = one if v0 + v1 >= zero else -one
    a0 = v0 * sign > zero
    a1 = v1 * sign > zero
    acc = (v0 if a0 else zero) + (v1 if a1 else zero)
    if normalize:
        div = (w0 if a0 else zero) + (w1 if a1 else zero)
        acc = acc / (one if div == zero else div)
    return acc


@njit(inline="always")
def _trim_block(d, s, e, out, c, mode, lo, hi, key, thr, plo, pspan, rank, drop, p):
    """out[: e - s] <- c * d[s:e] where kept, else 0; returns the advanced position in `drop`."""
    x = d[s:e]
    m = e - s
    zero = np.float32(0.0)
    if mode == 0:
        for j in range(m):
            out[j] = x[j] * c
    elif mode == 1:
        for j in range(m):
            a = abs(x[j])
            out[j] = x[j] * c if (a >= lo) & (a <= hi) else zero
        while p < drop.size and drop[p] < e:
            out[drop[p] - s] = zero
            p += 1
    elif mode == 2:
        t = _cut(thr)
        z = key + s * GOLDEN
        for j in range(m):
            v = x[j] * c  # loaded whatever the draw: a select, not a masked load
            out[j] = v if _mix(z) <= t else zero
            z += GOLDEN
    else:
        r = rank[s:e]
        z = key + s * GOLDEN
        for j in range(m):
            v = x[j] * c
            out[j] = v if np.float64(_mix(z)) * _INV32 + 0.5 < plo + pspan * np.float64(r[j]) else zero
            z += GOLDEN
    return p


@njit(cache=True, nogil=True, error_model="numpy")
def merge(base, out, deltas, modes, lo, hi, keys, thr, plo, pspan, ranks, drops, coeff, weights, consensus, normalize, scale):
    """out <- base + scale * merge_i(coeff_i * trim_i(delta_i)); see gta.merge_task_vectors."""
    n = base.size
    count = len(deltas)
    if count == 2 and consensus and (modes[0] == 0 or modes[0] == 2) and (modes[1] == 0 or modes[1] == 2):
        _random_pair(base, out, deltas[0], deltas[1], keys, thr, coeff, weights, normalize, scale)
        return
    buf = np.empty((count, BLOCK), np.float32)
    ptr = np.zeros(count, np.int64)
    zero, one = np.float32(0.0), np.float32(1.0)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        m = e - s
        for i in range(count):
            ptr[i] = _trim_block(deltas[i], s, e, buf[i], coeff[i], modes[i], lo[i], hi[i], keys[i], thr[i], plo[i],
                                 pspan[i], ranks[i], drops[i], ptr[i])
        b = base[s:e]
        o = out[s:e]
        if count == 2 and consensus:  # the common case, branch-free so that it vectorizes
            v0, v1 = buf[0], buf[1]
            w0, w1 = weights[0], weights[1]  # hoisted: the stores to o might alias `weights`
            for j in range(m):
                o[j] = b[j] + _elect2(v0[j], v1[j], w0, w1, normalize) * scale
        elif consensus:
            for j in range(m):
                total = zero
                for i in range(count):
                    total += buf[i, j]
                sign = one if total >= zero else -one
                acc = zero
                div = zero
                for i in range(count):
                    v = buf[i, j]
                    if v * sign > zero:
                        acc += v
                        div += weights[i]
                if normalize:
                    acc = acc / (one if div == zero else div)
                o[j] = b[j] + acc * scale
        else:
            for j in range(m):
                total = zero
                for i in range(count):
                    total += buf[i, j]
                o[j] = b[j] + total * scale


@njit(inline="always")
def _random_pair(base, out, d0, d1, keys, thr, coeff, weights, normalize, scale):
    """merge's two-vector election when both trims are random or none: drawn, trimmed and elected in one loop."""
    zero = np.float32(0.0)
    t0, t1 = _cut(thr[0]), _cut(thr[1])
    c0, c1, w0, w1 = coeff[0], coeff[1], weights[0], weights[1]
    for s in range(0, base.size, BLOCK):  # blocks keep z small
        e = min(base.size, s + BLOCK)
        x0, x1, b, o = d0[s:e], d1[s:e], base[s:e], out[s:e]
        z0, z1 = keys[0] + s * GOLDEN, keys[1] + s * GOLDEN
        for j in range(e - s):
            v0, v1 = x0[j] * c0, x1[j] * c1
            v0 = v0 if _mix(z0) <= t0 else zero
            v1 = v1 if _mix(z1) <= t1 else zero
            o[j] = b[j] + _elect2(v0, v1, w0, w1, normalize) * scale
            z0 += GOLDEN
            z1 += GOLDEN


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})  # reassoc: a vectorised sum
def kept_l1(delta, mode, lo, hi, key, thr, plo, pspan, rank, drop):
    """Sum of |x| over the entries one trim keeps (for rescaling)."""
    buf = np.empty(BLOCK, np.float32)
    t = _cut(thr)
    p = 0
    total = 0.0
    for s in range(0, delta.size, BLOCK):
        e = min(delta.size, s + BLOCK)
        block = np.float32(0.0)  # float32 within a block (lanes of 128 entries), float64 across blocks
        if mode == 2:  # drawn inline, without the buffer
            x = delta[s:e]
            z = key + s * GOLDEN
            for j in range(e - s):
                a = abs(x[j])
                block += a if _mix(z) <= t else np.float32(0.0)
                z += GOLDEN
        else:
            p = _trim_block(delta, s, e, buf, np.float32(1.0), mode, lo, hi, key, thr, plo, pspan, rank, drop, p)
            for j in range(e - s):
                block += abs(buf[j])
        total += block
    return total
