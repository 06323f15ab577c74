"""The model layer: pure torch, no Lightning, no Hydra.

gpt.py (GPTConfig, attention, GPT), attention.py (grouped decode attention, the SDPA path for GQA), loss.py
(the fused chunked LM head + loss), kv_cache.py (KV cache sized by KV heads), sampling.py (sampling and the cached
decode loop), graphed_decode.py (decode steps from a CUDA graph), optim.py (AdamW groups, schedule), convert.py
(pooling KV heads, Hugging Face GPT-2 weights).
"""

from gpt_lightning.model.gpt import GPT, GPTConfig, attention_label
from gpt_lightning.model.kv_cache import KVCache, kv_cache_bytes_per_token
from gpt_lightning.model.loss import NextTokenLoss, lm_head_loss

__all__ = ["GPT", "GPTConfig", "KVCache", "NextTokenLoss", "attention_label", "kv_cache_bytes_per_token",
           "lm_head_loss"]
