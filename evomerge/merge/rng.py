"""Counter-based random draws for DARE and DELLA masks.

Entry j of a tensor draws a 32-bit u: murmur3's fmix32 of (j * golden + key), less its last xor-shift
(which leaves the top 16 bits alone, so adds nothing to comparing u with a threshold), with the top bit
flipped (so that the CPU kernel compares signed 32-bit integers, the only compare AVX2 has). The 32-bit
key hashes (seed, tensor, model). Pure 32-bit integer arithmetic, affine in j before the mixing, so the
fused CPU kernel computes it inline, 8 entries per vector instruction, without storing a mask; the torch
path computes the same draws on any device; and a merge is reproducible whatever order or device it
runs in. (Tensors are assumed to have fewer than 2**32 entries.)
"""
from __future__ import annotations

import hashlib

import torch

GOLDEN = 0x9E3779B1
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35
M32 = 0xFFFFFFFF
TOP = 1 << 31


def key_for(seed: int, tensor: str, model: str) -> int:
    """A 32-bit stream key for one (seed, tensor, model)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def threshold(p: float) -> int:
    """Keep an entry when its draw is below this: probability p, to 2**-32."""
    return min(1 << 32, max(0, int(p * (1 << 32))))


def draws(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The draws u (int64 in [0, 2**32)) of entries start .. start + count - 1."""
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = (z * GOLDEN + key) & M32
    z = ((z ^ (z >> 16)) * MIX1) & M32
    z = ((z ^ (z >> 13)) * MIX2) & M32
    return z ^ TOP
