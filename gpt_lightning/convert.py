"""The public conversion API, kept at this import path: `from gpt_lightning.convert import pool_kv_heads, load_hf_gpt2`.

The code lives in the model layer (`gpt_lightning/model/convert.py`, pure torch + safetensors).
"""

from gpt_lightning.model.convert import POOL_METHODS, load_hf_gpt2, pool_kv_heads

__all__ = ["POOL_METHODS", "load_hf_gpt2", "pool_kv_heads"]
