"""Index metadata prepared once and reused by many op calls.

A streaming cache knows its token ranges when it lays out a chunk; checking them again on every
op call would copy them to the host (a GPU sync per layer and denoising pass) and rule out CUDA
graph capture. ``TokenRanges`` and ``FrameSlots`` carry the values twice: as an int32 tensor on
the device the kernels run on, and as Python ints. The public ops take them where they take
``kv_ranges`` / ``ranges`` / ``block_ranges`` / ``frame_slots``; given one, an op checks only
what the host ints tell (bounds) and never reads the tensor back.

``trusted`` is the entry for callers that built the values themselves (the cache); ops build the
same objects from user input after checking it (``checks.ranges``, ``checks.frame_slots``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True, eq=False)
class TokenRanges:
    """Half-open token ranges ``[start, end)`` into a pool: ``tensor`` int32 [R, 2] (contiguous,
    on the kernels' device) and ``pairs`` (the same values; None only while torch.compile traces
    a tensor whose values it cannot see)."""

    tensor: torch.Tensor
    pairs: Optional[tuple]

    @classmethod
    def trusted(cls, pairs, device) -> "TokenRanges":
        """From (start, end) pairs the caller guarantees in bounds and disjoint."""
        pairs = tuple((int(s), int(e)) for s, e in pairs)
        t = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2)
        return cls(t.to(device), pairs)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def num_tokens(self) -> int:
        """Tokens in the union (the ranges are disjoint)."""
        return self._facts()[0]

    @property
    def max_len(self) -> int:
        return self._facts()[1]

    @property
    def end(self) -> int:
        """One past the last token any range covers (0 without tokens)."""
        return self._facts()[2]

    def _facts(self) -> tuple:
        """(num_tokens, max_len, end), worked out once. Plain loops: torch.compile traces them
        when the pairs are known (they are constants then); without the pairs the values are read
        back, which only happens outside tracing."""
        facts = self.__dict__.get("_facts_cache")
        if facts is None:
            pairs = self.pairs if self.pairs is not None else tuple(
                (int(s), int(e)) for s, e in self.tensor.tolist())
            tokens = longest = end = 0
            for s, e in pairs:
                if e > s:
                    tokens += e - s
                    longest = e - s if e - s > longest else longest
                    end = e if e > end else end
            facts = (tokens, longest, end)
            self.__dict__["_facts_cache"] = facts
        return facts

    def _host(self) -> tuple:
        # Reached only for untraced values: under torch.compile an op keeps to the tensor.
        return self.pairs if self.pairs is not None else tuple(
            (int(s), int(e)) for s, e in self.tensor.tolist())

    def membership(self, pool_len: int, device=None) -> torch.Tensor:
        """bool [R, pool_len]: which pool tokens each range holds, from tensor ops alone (so it
        traces under torch.compile without the values being known)."""
        device = self.tensor.device if device is None else device
        r = self.tensor.to(device, torch.int64)
        tok = torch.arange(pool_len, device=device)
        return (tok[None, :] >= r[:, :1]) & (tok[None, :] < r[:, 1:])

    def token_index(self, device=None) -> torch.Tensor:
        """int64 [num_tokens]: the pool token of each range position, in range order; built once
        per object and device."""
        device = torch.device(device) if device is not None else self.tensor.device
        cache = self.__dict__.setdefault("_index", {})
        if device not in cache:
            idx = [torch.arange(s, e, dtype=torch.int64) for s, e in self._host() if e > s]
            cache[device] = (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(device)
        return cache[device]


@dataclass(frozen=True, eq=False)
class FrameSlots:
    """Where ``rope3d_store_`` writes each frame: ``tensor`` int32 [F] (the first pool token of
    each frame, on the kernels' device), ``slots`` (the same values, or None under tracing) and
    ``positions`` float64 [F] on the CPU (the temporal RoPE position of each frame: host values
    from which the kernels' angle tables are built)."""

    tensor: torch.Tensor
    slots: Optional[tuple]
    positions: torch.Tensor

    @classmethod
    def trusted(cls, slots, positions, device) -> "FrameSlots":
        """From slots the caller guarantees in bounds and at least one frame apart."""
        slots = tuple(int(s) for s in slots)
        pos = torch.tensor([float(p) for p in positions], dtype=torch.float64)
        return cls(torch.tensor(slots, dtype=torch.int32).to(device), slots, pos)

    def __len__(self) -> int:
        return self.tensor.shape[0]


@dataclass(frozen=True, eq=False)
class RangeDeltas:
    """Per-range temporal offsets in frames (``kv_deltas`` / ``block_deltas``) prepared once:
    ``tensor`` float64 [R] on the CPU (host values, from which the kernels build their angle
    tables) and ``values`` (the same numbers as floats). An op given one checks only its length
    and never reads the tensor."""

    tensor: torch.Tensor
    values: tuple

    @classmethod
    def trusted(cls, values) -> "RangeDeltas":
        """From finite numbers the caller guarantees, one per range."""
        values = tuple(float(v) for v in values)
        return cls(torch.tensor(values, dtype=torch.float64).reshape(-1), values)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def any(self) -> bool:
        """Whether some offset is not 0 (all 0: the op without offsets)."""
        return any(v != 0.0 for v in self.values)
