"""Counter-based random bits for DARE and DELLA masks.

Entry j of a tensor draws 32 bits: murmur3's finalizer of ((j xor b) * golden + a), where the 64-bit key
(a, b) hashes (seed, tensor name, model). Pure 32-bit integer arithmetic, so the fused
CPU kernel computes it inline in vector registers without storing a mask, the torch path computes the
same bits on any device, and a merge is reproducible whatever order or device it runs in. (Tensors are
assumed to have fewer than 2**32 entries.)
"""
from __future__ import annotations

import hashlib

import torch

GOLDEN = 0x9E3779B1
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35
M32 = 0xFFFFFFFF


def key_for(seed: int, tensor: str, model: str) -> int:
    """A 64-bit stream key for one (seed, tensor, model)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def threshold(p: float) -> int:
    """Keep an entry when its 32 random bits are below this: probability p, to 2**-32."""
    return min(1 << 32, max(0, int(p * (1 << 32))))


def bits32(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32 random bits (as int64) of entries start .. start + count - 1."""
    a, b = key & M32, key >> 32
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = ((z ^ b) * GOLDEN + a) & M32
    return _fmix(z)


def _fmix(z: torch.Tensor) -> torch.Tensor:
    z = z ^ (z >> 16)
    z = (z * MIX1) & M32
    z = z ^ (z >> 13)
    z = (z * MIX2) & M32
    return z ^ (z >> 16)
