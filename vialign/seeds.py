"""Seeds as torch uses them.

A CPU ``torch.Generator`` (the stock diffusers pipelines draw their noise from one) keeps only the low
32 bits of ``manual_seed(value)``: seeds ``s`` and ``s + 2**32`` give the same noise. Seeds derived
from other seeds therefore have to be mixed into those 32 bits, never offset above them.
"""

from __future__ import annotations

TORCH_SEED_BITS = 32
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2**32) that depends on every part (SplitMix64 chained over the parts): distinct
    inputs give independent-looking seeds, which a CPU generator tells apart."""
    value = 0
    for part in parts:
        value = _splitmix64(value ^ (int(part) & _MASK64))
    return value >> (64 - TORCH_SEED_BITS)
