"""Preallocated key/value cache sized by KV heads (n_kv_groups, G), not query heads.

Sizing it by n_head would silently throw away GQA's memory saving: GQA-G stores G/n_head of MHA's bytes.
"""

from __future__ import annotations

import torch


def kv_cache_bytes_per_token(n_layer: int, n_kv_groups: int, head_dim: int, dtype=torch.float32) -> int:
    """Bytes one token occupies in the cache: a key and a value vector per KV head per layer."""
    return 2 * n_layer * n_kv_groups * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Keys and values for `max_len` positions, written in place: no re-allocation per token."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_groups: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_groups, max_len, head_dim)  # (B, G, T_max, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # positions filled, shared by every layer

    @property
    def bytes_per_token(self) -> int:
        k = self.k[0]
        return 2 * len(self.k) * k.size(1) * k.size(3) * k.element_size()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, G, T, hd) new keys/values after the filled positions; return all filled (B, G, L, hd)."""
        end = self.length + k.size(2)
        self.write(layer, k, v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """`update` without the views it returns: decode writes here every layer, every step (one view + copy)."""
        T = k.size(2)
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + T} positions > max_len={self.max_len}")
        self.k[layer].narrow(2, self.length, T).copy_(k)
        self.v[layer].narrow(2, self.length, T).copy_(v)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` of one new position given as a (1,) tensor on the cache's device (a CUDA graph's decode step):
        no Python-side length, no bounds check; the caller keeps pos < max_len (`GraphedDecoder`)."""
        self.k[layer].index_copy_(2, pos, k)  # (B, G, 1, hd) into position pos
        self.v[layer].index_copy_(2, pos, v)

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole (B, G, max_len, hd) key and value buffers (positions past the filled ones are stale)."""
        return self.k[layer], self.v[layer]

    def prefix(self, n: int) -> KVCache:
        """A cache over the first `n` positions of these buffers: views, so what it writes lands here. A CUDA graph
        captured against it reads (B, G, n, hd) keys, not the whole max_len (`graphed_decode`'s key buckets)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[:, :, :n] for k in self.k], [v[:, :, :n] for v in self.v]
        view.max_len, view.length = n, min(self.length, n)
        return view

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer wrote its `n` new positions."""
        self.length += n

    def reset(self) -> None:
        self.length = 0
