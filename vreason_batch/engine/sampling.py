"""Choosing each row's next token: argmax, or a seeded sample that belongs to the row, not the batch.

Sampling (`decoding.temperature` > 0) draws from softmax(logits / T) restricted by `top_k`,
`top_p` (the smallest set of most likely tokens whose mass reaches top_p) and `min_p` (tokens at
least min_p times as likely as the most likely one), applied in that order to the tempered
distribution, as transformers' warpers do. The draw is Gumbel-max: token = argmax(z + g) over
the kept tokens, with g = -log(-log(u)) and u a uniform number that is a pure function of (the
row's seed, the row's token index, the vocabulary id). So a row's tokens depend only on its seed
(from `decoding.seed` and the row's (sample key, mode), `row_seed`) and on its own logits: not
on the batch it shares, the slot it sits in, the actor, a retry or a resume. The uniform numbers
come from a counter-based hash in int64 tensor arithmetic (no torch.Generator, no host sync), so
the choice can be captured with the rest of the step.

Temperature 0 is exactly argmax: the other knobs do nothing then.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """The token choice of a decode: greedy when temperature is 0 (the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_seed(seed: int, key: Any, mode: str) -> int:
    """The sampling key of one (sample, mode) row: a 63-bit digest of the run's seed, the sample's key and the mode."""
    blob = f"{int(seed)}\x00{key}\x00{mode}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical shift right of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _signed(u: int) -> int:
    u &= _MASK
    return u - (1 << 64) if u >= 1 << 63 else u


# splitmix64's constants as int64 bit patterns, converted once (the step calls these every token)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN, _VOCAB_STRIDE = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def uniform(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32 [b, vocab]: a pure function of (seeds[b], counters[b], vocabulary id)."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    row = _mix(seeds.long() ^ _mix(counters.long() * _GOLDEN))  # [b]
    bits = _mix(row[:, None] + ids[None, :] * _VOCAB_STRIDE)
    # 23 random bits: k + 0.5 is exact in float32 for k < 2^23, so u is never 0 nor 1 (with 24 bits
    # the largest rounds to 1.0, and its Gumbel noise, -log(-log(1)), is +inf)
    top23 = _srl(bits, 41).to(torch.float32)
    return (top23 + 0.5) / float(1 << 23)


def filtered(z: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Tempered logits z [b, V] float32 with the tokens top_k / top_p / min_p drop set to -inf."""
    neg = torch.finfo(z.dtype).min
    if s.top_k > 0 and s.top_k < z.shape[-1]:
        kth = torch.topk(z, s.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, neg)
    if s.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)  # ties: lowest id first, as argmax
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens more likely than this one
        drop_sorted = before >= s.top_p  # the most likely token is always kept (its `before` is 0)
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), neg)
    if s.min_p > 0.0:
        probs = torch.softmax(z, dim=-1)
        z = z.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), neg)
    return z


def choose_tokens(logits: torch.Tensor, s: Sampling, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Each row's next token [b] from its logits [b, V]: argmax, or its own seeded draw (module docstring)."""
    if s.greedy:
        return logits.argmax(dim=-1)
    z = filtered(logits.float() / s.temperature, s)
    gumbel = -torch.log(-torch.log(uniform(seeds, counters, z.shape[-1])))
    return (z + gumbel).argmax(dim=-1)
