"""Fused CPU kernels (numba) for the task-arithmetic family, reading sources in their stored dtype.

Sources stay as they are stored (float32, or bfloat16 passed as int16 bit patterns, widened in registers):
for each block of BLOCK entries, small enough for L1, the kernel forms each model's delta from the base,
trims and weights it into a block buffer, elects signs and writes base + result, rounded to bfloat16
(nearest even) when the destination is bfloat16. Every input byte is read once from memory and every
intermediate stays in cache, so no full-size float32 copy of any source or delta ever exists. Two or
three task vectors whose trims are random or none (DARE), or bands without dropped indices (TIES as a
search runs it), skip the block buffers: trimmed and combined in one loop.

Trim modes per task vector: 0 keep all, 1 magnitude band (entries strictly inside (lo, hi) kept; entries
equal to lo or hi kept when their flat index lies in that bound's index range; minus the sorted flat
indices in `drop`), 2 random (keep when the entry's draw u < thr), 3 DELLA (keep when u / 2**32 <
plo + pspan * rank[j], `rank` given for the entries of the arrays). `offset` is the flat index of the
arrays' first entry in the whole tensor, so a tensor merged in pieces draws and cuts exactly as when
merged whole.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from evomerge.machine import cache_dir
from evomerge.merge.rng import GOLDEN, MIX1, MIX2, TOP

# compiled kernels are cached per user, not beside this file (numba's default): an installed package may be
# read-only, and would then recompile on every first merge (~16 s for a 135M model). Read when each @njit
# below is declared; a NUMBA_CACHE_DIR the user set wins.
if not numba.config.CACHE_DIR:
    numba.config.CACHE_DIR = str(cache_dir("numba"))

BLOCK = 2048
BINS = 1 << 15  # magnitude histogram: the top 16 bits of a non-negative float32 (sign bit clear)
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


@intrinsic
def _from_bf16(typingctx, x):
    """A bfloat16 bit pattern (int16) as the float32 it is: its bits shifted into the top half."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _to_bf16(typingctx, x):
    """A float32 rounded to the nearest bfloat16 (ties to even), as its int16 bit pattern."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        r = builder.add(builder.add(b, ir.Constant(i32, 0x7FFF)), odd)
        return builder.trunc(builder.lshr(r, ir.Constant(i32, 16)), ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def _bits(typingctx, x):
    """A float32's bits as an int32 (for a non-negative float, ordered as the floats are)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(inline="always")
def _bin(a):
    """The magnitude bin of a non-negative float32: its top 16 bits."""
    return _bits(a) >> 16


@njit(inline="always")
def _low(a):
    """The low 16 bits of a float32: its place within its magnitude bin."""
    return _bits(a) & 0xFFFF


def _ld(a, j):
    """a[j] as float32 (a: float32, or bfloat16 bit patterns as int16)."""


@overload(_ld, inline="always")
def _ld_impl(a, j):
    if a.dtype == types.int16:
        return lambda a, j: _from_bf16(a[j])
    return lambda a, j: a[j]


def _st(a, j, v):
    """a[j] <- v, rounded to bfloat16 when a holds bfloat16 bit patterns."""


@overload(_st, inline="always")
def _st_impl(a, j, v):
    if a.dtype == types.int16:
        def impl(a, j, v):
            a[j] = _to_bf16(v)
        return impl

    def impl(a, j, v):
        a[j] = v
    return impl


@njit(inline="always")
def _cut(thr):
    """Keep an entry when its _mix <= this: u < thr, for 1 <= thr <= 2**32."""
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
def _elect3(v0, v1, v2, w0, w1, w2, normalize):
    """_elect2 for three values, adding in the order the general loop adds."""
    zero, one = np.float32(0.0), np.float32(1.0)
    sign = one if v0 + v1 + v2 >= zero else -one
    a0, a1, a2 = v0 * sign > zero, v1 * sign > zero, v2 * sign > zero
    acc = (v0 if a0 else zero) + (v1 if a1 else zero) + (v2 if a2 else zero)
    if normalize:
        div = (w0 if a0 else zero) + (w1 if a1 else zero) + (w2 if a2 else zero)
        acc = acc / (one if div == zero else div)
    return acc


@njit(inline="always")
def _trim(bs, ms, m, g, out, c, mode, lo, hi, bounds, key, thr, plo, pspan, rank, drop, p):
    """out[:m] <- c * (ms - bs)[:m] where kept, else 0, for the entries at flat indices g .. g + m - 1 of
    the tensor; returns the advanced position in `drop`. `rank` holds these entries' DELLA ranks. Loads
    index slices by the loop counter, which numba knows is non-negative: that lets LLVM vectorise."""
    zero = np.float32(0.0)
    if mode == 0:
        for j in range(m):
            out[j] = (_ld(ms, j) - _ld(bs, j)) * c
    elif mode == 1:
        lo_a, lo_b, hi_a, hi_b = bounds[0], bounds[1], bounds[2], bounds[3]
        for j in range(m):
            x = _ld(ms, j) - _ld(bs, j)
            a = abs(x)
            i = g + j
            keep = ((a > lo) & (a < hi)) | ((a == lo) & (i >= lo_a) & (i <= lo_b)) | ((a == hi) & (i >= hi_a) & (i <= hi_b))
            out[j] = x * c if keep else zero
        while p < drop.size and drop[p] < g + m:
            if drop[p] >= g:
                out[drop[p] - g] = zero
            p += 1
    elif mode == 2:
        t = _cut(thr)
        z = key + g * GOLDEN
        for j in range(m):
            v = (_ld(ms, j) - _ld(bs, j)) * c  # loaded whatever the draw: a select, not a masked load
            out[j] = v if _mix(z) <= t else zero
            z += GOLDEN
    else:
        z = key + g * GOLDEN
        for j in range(m):
            v = (_ld(ms, j) - _ld(bs, j)) * c
            out[j] = v if np.float64(_mix(z)) * _INV32 + 0.5 < plo + pspan * np.float64(rank[j]) else zero
            z += GOLDEN
    return p


@njit(inline="always")
def _band_block(count, g, m, modes, bounds, tie_lo, tie_hi):
    """For bands: whether, in block [g, g + m), every trim keeps the entries equal to its lo (and to its hi)
    all or none (then set in tie_lo / tie_hi); False where a tied run starts or ends inside the block."""
    last = g + m - 1
    for i in range(count):
        tie_lo[i] = tie_hi[i] = False
        if modes[i] != 1:
            continue
        for k in (0, 2):
            first_kept, last_kept = bounds[i, k], bounds[i, k + 1]
            inside = first_kept <= g and last <= last_kept
            if not inside and not (last_kept < g or first_kept > last):
                return False
            if k == 0:
                tie_lo[i] = inside
            else:
                tie_hi[i] = inside
    return True


@njit(inline="always")
def _banded(bs, a0, a1, a2, o, m, three, lo, hi, tie_lo, tie_hi, coeff, weights, consensus, normalize, scale):
    """One block of merge for two or three band trims, decided per entry by float compares only (the tied
    entries' fate is the block's): delta, trim, weight and combine in one loop."""
    zero = np.float32(0.0)
    lo0, lo1, lo2, hi0, hi1, hi2 = lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]
    tl0, tl1, tl2, th0, th1, th2 = tie_lo[0], tie_lo[1], tie_lo[2], tie_hi[0], tie_hi[1], tie_hi[2]
    c0, c1, w0, w1 = coeff[0], coeff[1], weights[0], weights[1]
    c2, w2 = (coeff[2], weights[2]) if three else (zero, zero)
    for j in range(m):
        bj = _ld(bs, j)
        x0, x1 = _ld(a0, j) - bj, _ld(a1, j) - bj
        y0, y1 = abs(x0), abs(x1)
        v0 = x0 * c0 if ((y0 > lo0) & (y0 < hi0)) | ((y0 == lo0) & tl0) | ((y0 == hi0) & th0) else zero
        v1 = x1 * c1 if ((y1 > lo1) & (y1 < hi1)) | ((y1 == lo1) & tl1) | ((y1 == hi1) & th1) else zero
        if three:
            x2 = _ld(a2, j) - bj
            y2 = abs(x2)
            v2 = x2 * c2 if ((y2 > lo2) & (y2 < hi2)) | ((y2 == lo2) & tl2) | ((y2 == hi2) & th2) else zero
            r = _elect3(v0, v1, v2, w0, w1, w2, normalize) if consensus else v0 + v1 + v2
        else:
            r = _elect2(v0, v1, w0, w1, normalize) if consensus else v0 + v1
        _st(o, j, bj + r * scale)


@njit(cache=True, nogil=True, error_model="numpy")
def merge(base, models, out, offset, spans, modes, lo, hi, bounds, keys, thr, plo, pspan, ranks, drops, coeff, weights,
          consensus, normalize, scale):
    """out <- base + scale * merge_i(coeff_i * trim_i(models_i - base)) over the [start, end) rows of `spans`
    (ascending; a tensor-parallel shard's pieces, in one call); see gta.merge_task_vectors."""
    count = len(models)
    buf = np.empty((count, BLOCK), np.float32)
    total, acc, div = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    ptr = np.zeros(count, np.int64)
    zero, one = np.float32(0.0), np.float32(1.0)
    random = True  # every trim keeps all or draws: one fused loop below, no trim buffers
    for i in range(count):
        random &= modes[i] == 0 or modes[i] == 2
    fast = random and (count == 2 or count == 3)
    t = np.full(3, np.int32(2147483647))
    for i in range(count):
        if modes[i] == 2:
            t[i] = _cut(thr[i])
    t0, t1, t2 = t[0], t[1], t[2]
    banded = count == 2 or count == 3  # every trim keeps all or a band without drops (TIES in a search)
    for i in range(count):
        banded &= (modes[i] == 0 or modes[i] == 1) and drops[i].size == 0
    blo, bhi = np.full(3, np.float32(-np.inf)), np.full(3, np.float32(np.inf))  # mode 0: every finite entry
    for i in range(count):
        if modes[i] == 1:
            blo[i], bhi[i] = lo[i], hi[i]
    tie_lo, tie_hi = np.zeros(3, np.bool_), np.zeros(3, np.bool_)
    for q in range(spans.shape[0]):
        for i in range(count):  # skip the drops before this span
            while ptr[i] < drops[i].size and drops[i][ptr[i]] < offset + spans[q, 0]:
                ptr[i] += 1
        for s in range(spans[q, 0], spans[q, 1], BLOCK):
            e = min(spans[q, 1], s + BLOCK)
            m = e - s
            bs, o = base[s:e], out[s:e]
            if banded and _band_block(count, offset + s, m, modes, bounds, tie_lo, tie_hi):
                _banded(bs, models[0][s:e], models[1 % count][s:e], models[2 % count][s:e], o, m, count == 3, blo, bhi,
                        tie_lo, tie_hi, coeff, weights, consensus, normalize, scale)
                continue
            if fast and count == 2:  # DARE of two models: drawn, trimmed and elected (or summed) in one loop
                m0, m1 = models[0][s:e], models[1 % count][s:e]
                c0, c1, w0, w1 = coeff[0], coeff[1], weights[0], weights[1]
                z0, z1 = keys[0] + (offset + s) * GOLDEN, keys[1] + (offset + s) * GOLDEN
                for j in range(m):
                    bj = _ld(bs, j)
                    v0, v1 = (_ld(m0, j) - bj) * c0, (_ld(m1, j) - bj) * c1
                    v0 = v0 if _mix(z0) <= t0 else zero
                    v1 = v1 if _mix(z1) <= t1 else zero
                    _st(o, j, bj + (_elect2(v0, v1, w0, w1, normalize) if consensus else v0 + v1) * scale)
                    z0 += GOLDEN
                    z1 += GOLDEN
                continue
            if fast:  # the same for three
                m0, m1, m2 = models[0][s:e], models[1 % count][s:e], models[2 % count][s:e]
                c0, c1, c2, w0, w1, w2 = coeff[0], coeff[1], coeff[2 % count], weights[0], weights[1], weights[2 % count]
                z0, z1, z2 = keys[0] + (offset + s) * GOLDEN, keys[1] + (offset + s) * GOLDEN, keys[2 % count] + (offset + s) * GOLDEN
                for j in range(m):
                    bj = _ld(bs, j)
                    v0, v1, v2 = (_ld(m0, j) - bj) * c0, (_ld(m1, j) - bj) * c1, (_ld(m2, j) - bj) * c2
                    v0 = v0 if _mix(z0) <= t0 else zero
                    v1 = v1 if _mix(z1) <= t1 else zero
                    v2 = v2 if _mix(z2) <= t2 else zero
                    _st(o, j, bj + (_elect3(v0, v1, v2, w0, w1, w2, normalize) if consensus else v0 + v1 + v2) * scale)
                    z0 += GOLDEN
                    z1 += GOLDEN
                    z2 += GOLDEN
                continue
            for i in range(count):
                ptr[i] = _trim(bs, models[i][s:e], m, offset + s, buf[i], coeff[i], modes[i], lo[i], hi[i], bounds[i],
                               keys[i], thr[i], plo[i], pspan[i], ranks[i][s:e], drops[i], ptr[i])
            if count == 2 and consensus:  # the common cases, branch-free so that they vectorize
                v0, v1 = buf[0], buf[1]
                w0, w1 = weights[0], weights[1]
                for j in range(m):
                    _st(o, j, _ld(bs, j) + _elect2(v0[j], v1[j], w0, w1, normalize) * scale)
            elif count == 3 and consensus:
                v0, v1, v2 = buf[0], buf[1], buf[2]
                w0, w1, w2 = weights[0], weights[1], weights[2]
                for j in range(m):
                    _st(o, j, _ld(bs, j) + _elect3(v0[j], v1[j], v2[j], w0, w1, w2, normalize) * scale)
            else:  # any number of models: passes over the block with the entry loop innermost, so each vectorizes
                total[:m] = zero
                for i in range(count):
                    v = buf[i]
                    for j in range(m):
                        total[j] += v[j]
                if consensus:
                    acc[:m] = zero
                    div[:m] = zero
                    for i in range(count):
                        v, w = buf[i], weights[i]
                        for j in range(m):
                            agree = v[j] * (one if total[j] >= zero else -one) > zero
                            acc[j] += v[j] if agree else zero
                            div[j] += w if agree else zero
                    for j in range(m):
                        d = div[j] if normalize else one
                        total[j] = acc[j] / (one if d == zero else d)
                for j in range(m):
                    _st(o, j, _ld(bs, j) + total[j] * scale)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})  # reassoc: a vectorised sum
def kept_l1(base, model, offset, mode, lo, hi, bounds, key, thr, plo, pspan, rank, drop):
    """Sums of |model - base| over the entries one trim keeps and over all of them (for rescaling)."""
    kept = np.empty(BLOCK, np.float32)
    p = 0
    while p < drop.size and drop[p] < offset:
        p += 1
    total, whole = 0.0, 0.0
    for s in range(0, base.size, BLOCK):
        e = min(base.size, s + BLOCK)
        bs, ms = base[s:e], model[s:e]
        p = _trim(bs, ms, e - s, offset + s, kept, np.float32(1.0), mode, lo, hi, bounds, key, thr,
                  plo, pspan, rank[s:e], drop, p)
        block, all_ = np.float32(0.0), np.float32(0.0)  # float32 within a block, float64 across blocks
        for j in range(e - s):
            block += abs(kept[j])
            all_ += abs(_ld(ms, j) - _ld(bs, j))
        total += block
        whole += all_
    return total, whole


@njit(inline="always")
def _slot(a):
    """An entry's slot in a magnitude histogram: its bin times 2, plus 1 when its low 16 bits are not all zero."""
    w = _bits(a)
    return ((w >> 15) & ~1) | ((w & 0xFFFF) != 0)


@njit(cache=True, nogil=True, error_model="numpy")
def histogram(base, model, hist):
    """hist[_slot(|model - base|)] += 1 over the tensor (2 * BINS slots). The slots of a block are computed
    first (vectorised), then counted: one scatter per entry, the histogram's whole cost."""
    slots = np.empty(BLOCK, np.uint16)
    for s in range(0, base.size, BLOCK):
        e = min(base.size, s + BLOCK)
        bs, ms = base[s:e], model[s:e]
        for j in range(e - s):
            slots[j] = _slot(abs(_ld(ms, j) - _ld(bs, j)))
        for j in range(e - s):
            hist[slots[j]] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def sample_histogram(base, model, starts, width, hist):
    """As histogram, over the `width` consecutive entries from each of `starts`."""
    for s in starts:
        for j in range(s, s + width):
            hist[_slot(abs(_ld(model, j) - _ld(base, j)))] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def count_at_least(base, model, bits, out):
    """out[t] += the number of entries whose |model - base|, as float32 bits, is >= bits[t]: exact counts at a
    few magnitudes, vectorised (compares, no scatter)."""
    w = np.empty(BLOCK, np.int32)
    for s in range(0, base.size, BLOCK):
        e = min(base.size, s + BLOCK)
        bs, ms = base[s:e], model[s:e]
        for j in range(e - s):
            w[j] = _bits(abs(_ld(ms, j) - _ld(bs, j)))
        for t in range(bits.size):
            b = bits[t]
            c = np.int32(0)  # 32-bit lanes vectorise twice as wide as 64-bit ones
            for j in range(e - s):
                c += np.int32(w[j] >= b)
            out[t] += c


@njit(cache=True, nogil=True, error_model="numpy")
def refine(base, model, bin0, bin1, low0, low1):
    """Within bins bin0 and bin1 (possibly equal): counts of |model - base| by its low 16 bits, so that
    with the histogram every magnitude in those bins is known with its count."""
    for s in range(0, base.size, BLOCK):
        e = min(base.size, s + BLOCK)
        bs, ms = base[s:e], model[s:e]
        for j in range(e - s):
            a = abs(_ld(ms, j) - _ld(bs, j))
            h = _bin(a)
            if h == bin0:
                low0[_low(a)] += 1
            elif h == bin1:
                low1[_low(a)] += 1


@njit(cache=True, nogil=True, error_model="numpy")
def nth_equal(base, model, value, nth):
    """The flat index of the nth (from 1) entry whose |model - base| equals `value`, in index order; if
    there are fewer, -1 - their count. Stops as soon as it is found."""
    seen = 0
    for s in range(0, base.size, BLOCK):
        e = min(base.size, s + BLOCK)
        bs, ms = base[s:e], model[s:e]
        hits = 0
        for j in range(e - s):
            hits += abs(_ld(ms, j) - _ld(bs, j)) == value
        if seen + hits >= nth:
            for j in range(e - s):
                if abs(_ld(ms, j) - _ld(bs, j)) == value:
                    seen += 1
                    if seen == nth:
                        return s + j
        seen += hits
    return -1 - seen
