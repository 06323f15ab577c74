"""(x, y) training windows over a token stream on disk."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenWindows(Dataset):
    """Windows of block_size tokens every `stride` tokens; y is x shifted by one (int64 tensors).

    The memmap is opened lazily and dropped when pickled, so each DataLoader worker opens its own and
    memory does not grow with the corpus.
    """

    def __init__(self, path: Path, dtype: str, block_size: int, stride: int | None = None):
        self.path, self.dtype, self.block_size = str(path), dtype, block_size
        self.stride = stride or block_size
        self.n_tokens = Path(path).stat().st_size // np.dtype(dtype).itemsize
        self._data = None

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1 - self.block_size) // self.stride + 1)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = i * self.stride
        chunk = torch.from_numpy(self._data[start:start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self):
        return {**self.__dict__, "_data": None}
