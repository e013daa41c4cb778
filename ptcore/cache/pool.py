"""``KVPool``: the paged key/value memory of every layer, and its page allocator."""
from __future__ import annotations

import heapq
import math
import operator
import os

import torch

from ptcore.cache.radix import check_count, check_page_size


class CacheFull(RuntimeError):
    """No free KV page, and nothing left that the prefix cache could evict."""


def _device_memory(device: torch.device):
    """Total memory of ``device`` in bytes (None where unknown)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AssertionError):
        pass
    return None


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"KVPool: {name} must be an int >= 1, got {value!r}")
    return value


def _page_id(p) -> int:
    if not isinstance(p, bool):
        try:
            return operator.index(p)  # int, numpy integer, integer 0-d tensor
        except TypeError:
            pass
    raise TypeError(f"KV pool: 'pages' must hold integer page ids, got {p!r} ({type(p).__name__})")


class KVPool:
    """Keys and values of all layers in pages of ``page_size`` tokens: ``.k`` and ``.v`` are
    ``[num_layers, num_pages, page_size, num_kv_heads, head_dim]`` (zero-filled). Slot ``s`` is
    token offset ``s % page_size`` of page ``s // page_size``. The allocator hands out the lowest
    free page ids first (deterministic) and rejects double frees."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _positive(value, name)
        self.page_size = check_page_size(page_size)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KVPool: dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        need = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        have = _device_memory(torch.device(device) if device is not None else torch.device("cpu"))
        if have is not None and need > have:
            raise ValueError(f"KVPool: K and V of shape {shape} need {need / 2**30:.3g} GiB, more than the "
                             f"device's {have / 2**30:.3g} GiB; use fewer pages ('num_pages' = {num_pages})")
        try:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # the allocator's own error, which names nothing
            self.k = self.v = None
            raise ValueError(f"KVPool: cannot allocate K and V of shape {shape} ({need / 2**30:.3g} GiB; "
                             f"'num_pages' = {num_pages}): {str(e).splitlines()[0][:200]}") from None
        self.num_layers, self.num_pages = num_layers, num_pages
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self._free = list(range(num_pages))  # a heap: lowest page id first
        self._used = bytearray(num_pages)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def alloc(self, n: int) -> list[int]:
        """``n`` free pages (lowest ids first); CacheFull if fewer are free."""
        n = check_count(n, "n")
        if n > len(self._free):
            raise CacheFull(f"KV pool: {n} pages requested, {len(self._free)} of {self.num_pages} free "
                            f"(page size {self.page_size})")
        out = [heapq.heappop(self._free) for _ in range(n)]
        for p in out:
            self._used[p] = 1
        return out

    def free(self, pages) -> None:
        """Returns ``pages`` to the pool; ValueError on an id out of range or not allocated
        (nothing is freed then); TypeError on an id that is not an integer (a float or a bool would
        otherwise free a page it does not name)."""
        pages = [_page_id(p) for p in pages]
        seen = set()
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"KV pool: page {p} is not in [0, {self.num_pages})")
            if not self._used[p] or p in seen:
                raise ValueError(f"KV pool: page {p} is not allocated (double free)")
            seen.add(p)
        for p in pages:
            self._used[p] = 0
            heapq.heappush(self._free, p)

    def free_pages(self) -> list[int]:
        return sorted(self._free)

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Copies whole pages ``src[i] -> dst[i]`` on every layer (``ptcore.ops.copy_pages``)."""
        if not src:
            return
        from ptcore.ops import copy_pages  # noqa: PLC0415 (ptcore.ops imports after ptcore.cache)
        idx = torch.tensor([src, dst], dtype=torch.int64, device=self.device)
        copy_pages(self.k, self.v, idx[0], idx[1])

    def __repr__(self) -> str:
        return (f"KVPool(layers={self.num_layers}, pages={self.num_pages}, page_size={self.page_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, free={self.num_free})")
