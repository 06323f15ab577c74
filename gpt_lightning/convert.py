"""The public conversion API, kept at this import path: `from gpt_lightning.convert import pool_kv_heads, load_hf_gpt2`.

- `pool_kv_heads(model, kv_groups)`: MHA -> GQA/MQA by mean-pooling KV heads (uptraining).
- `load_hf_gpt2(path, kv_groups=None)`: our GPT from a Hugging Face folder (GPT-2, or one of our exports).
- `export_hf(model, out, encoding=..., architecture="auto", overwrite=False)`: our GPT as a Hugging Face folder
  (`hf_files`, `hf_state_dict`, `hf_config` for the pieces).

The code lives in the model layer (`gpt_lightning/model/convert.py`, `gpt_lightning/model/export.py`: pure torch
+ safetensors); `transformers` is needed by neither direction.
"""

from __future__ import annotations

from pathlib import Path

from gpt_lightning.model.convert import POOL_METHODS, hf_encoding, load_hf_gpt2, pool_kv_heads
from gpt_lightning.model.export import hf_config, hf_files, hf_state_dict, resolve_architecture, write_folder
from gpt_lightning.model.gpt import GPT

__all__ = ["POOL_METHODS", "export_hf", "hf_config", "hf_encoding", "hf_files", "hf_state_dict", "load_hf_gpt2", "pool_kv_heads",
           "resolve_architecture"]


def export_hf(model: GPT, out: str | Path, encoding: str = "gpt2", architecture: str = "auto",
              overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face folder (with GPT-2's tokenizer files when `encoding` is gpt2)."""
    from gpt_lightning.data.hf_tokenizer import gpt2_tokenizer_files
    from gpt_lightning.data.tokens import get_encoding

    files = hf_files(model, encoding, get_encoding(encoding).eot_token if encoding in ("gpt2", "bytes") else None,
                     architecture)
    if encoding == "gpt2":
        files.update(gpt2_tokenizer_files(model.config.block_size))
    return write_folder(out, files, overwrite=overwrite)
