"""Fused CPU kernels (numba) for the task-arithmetic family.

The output is produced in blocks that fit in L1/L2: for each task vector a tight loop writes its trimmed,
weighted block into a small buffer, then one loop elects signs and writes base + result. Every input is
read once from memory and every intermediate stays in cache, so the merge runs near memory bandwidth,
where a chain of torch elementwise ops would make ~25 passes.

Trim modes per task vector: 0 keep all, 1 magnitude band lo <= |x| <= hi minus the sorted indices in
`drop` (ties at the threshold that the reference sort ordered out), 2 random (keep when the entry's 32
random bits < thr), 3 DELLA (keep when bits / 2**32 < plo + pspan * rank[j]), 4 a recorded mask.
"""
from __future__ import annotations

import numpy as np
from numba import njit, uint64

from evomerge.merge.rng import GOLDEN, M32, MIX1, MIX2

_G, _M1, _M2, _M32 = uint64(GOLDEN), uint64(MIX1), uint64(MIX2), uint64(M32)
_S13, _S16 = uint64(13), uint64(16)
BLOCK = 4096
_INV32 = 2.3283064365386963e-10  # 2**-32


@njit(inline="always")
def _fmix(z):
    z = z ^ (z >> _S16)
    z = (z * _M1) & _M32
    z = z ^ (z >> _S13)
    z = (z * _M2) & _M32
    return z ^ (z >> _S16)


@njit(inline="always")
def _bits32(key, j):
    """rng.bits32 for one entry: 32-bit values held in uint64 lanes, masked after every multiply."""
    z = ((uint64(j) ^ (key >> uint64(32))) * _G + (key & _M32)) & _M32
    return _fmix(z)


@njit(inline="always")
def _trim_block(d, s, e, out, c, mode, lo, hi, key, thr, plo, pspan, rank, drop, mask, p):
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
        for j in range(m):
            out[j] = x[j] * c if _bits32(key, s + j) < thr else zero
    elif mode == 4:
        k = mask[s:e]
        for j in range(m):
            out[j] = x[j] * c if k[j] else zero
    else:
        r = rank[s:e]
        for j in range(m):
            keep = np.float64(_bits32(key, s + j)) * _INV32 < plo + pspan * np.float64(r[j])
            out[j] = x[j] * c if keep else zero
    return p


@njit(cache=True, nogil=True, error_model="numpy")
def merge(base, out, deltas, modes, lo, hi, keys, thr, plo, pspan, ranks, drops, masks, coeff, weights, consensus, normalize, scale):
    """out <- base + scale * merge_i(coeff_i * trim_i(delta_i)); see gta.merge_task_vectors."""
    n = base.size
    count = len(deltas)
    buf = np.empty((count, BLOCK), np.float32)
    ptr = np.zeros(count, np.int64)
    zero, one = np.float32(0.0), np.float32(1.0)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        m = e - s
        for i in range(count):
            ptr[i] = _trim_block(deltas[i], s, e, buf[i], coeff[i], modes[i], lo[i], hi[i], keys[i], thr[i], plo[i],
                                 pspan[i], ranks[i], drops[i], masks[i], ptr[i])
        b = base[s:e]
        o = out[s:e]
        if count == 2 and consensus:  # the common case, branch-free so that it vectorizes
            v0, v1 = buf[0], buf[1]
            w0, w1 = weights[0], weights[1]
            for j in range(m):
                sign = one if v0[j] + v1[j] >= zero else -one
                a0 = v0[j] * sign > zero
                a1 = v1[j] * sign > zero
                acc = (v0[j] if a0 else zero) + (v1[j] if a1 else zero)
                if normalize:
                    div = (w0 if a0 else zero) + (w1 if a1 else zero)
                    acc = acc / (one if div == zero else div)
                o[j] = b[j] + acc * scale
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


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})  # reassoc: a vectorised sum
def kept_l1(delta, mode, lo, hi, key, thr, plo, pspan, rank, drop, mask):
    """Sum of |x| over the entries one trim keeps (for rescaling); random trims also record their
    draws in `mask` (when it has the delta's size) so that the merge reads them instead of drawing again."""
    buf = np.empty(BLOCK, np.float32)
    record = mask.size == delta.size
    p = 0
    total = 0.0
    for s in range(0, delta.size, BLOCK):
        e = min(delta.size, s + BLOCK)
        p = _trim_block(delta, s, e, buf, np.float32(1.0), mode, lo, hi, key, thr, plo, pspan, rank, drop, mask, p)
        block = 0.0
        for j in range(e - s):
            block += abs(np.float64(buf[j]))
        total += block
        if record:
            for j in range(e - s):
                mask[s + j] = (buf[j] != 0) | (delta[s + j] == 0)
    return total
