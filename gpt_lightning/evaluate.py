"""`python -m gpt_lightning.evaluate ckpt_path=PATH`: test loss/perplexity, size, KV-cache bytes, decode speed, memory.

Prints a table and writes `<checkpoint>.eval.json` beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.checkpoints import load_checkpoint, load_gpt
from gpt_lightning.data import MachadoDataModule
from gpt_lightning.device import keep_freed_memory
from gpt_lightning.errors import UserError
from gpt_lightning.generate import pick_device
from gpt_lightning.kv_cache import kv_cache_bytes_per_token
from gpt_lightning.measure import decode_tokens_per_sec, peak_memory


def data_settings(ckpt: dict, cfg: DictConfig, overrides: list[str]) -> dict:
    """The checkpoint's own data settings (same books, split, encoding), with command-line data.* overrides on top
    (block_size and encoding always come from the checkpoint: the model was built for them)."""
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not saved:  # a checkpoint trained outside train.py: fall back to the composed config
        saved = OmegaConf.to_container(cfg.data, resolve=True)
        saved.pop("_target_", None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for o in overrides:
        key = o.split("=", 1)[0]
        if not key.lstrip("+~").startswith("data."):
            continue
        name = key.lstrip("+~")[5:]
        if key[0] in "+~" or name not in saved or name in ("block_size", "encoding"):
            raise UserError(f"{o}: evaluate takes plain data.KEY=VALUE overrides of the data settings, except "
                            f"block_size and encoding, which the checkpoint fixes")
        saved[name] = data[name]
    saved["block_size"] = ckpt["hyper_parameters"]["model"]["block_size"]
    saved["encoding"] = ckpt["hyper_parameters"].get("encoding", saved.get("encoding", "gpt2"))
    return saved


@torch.no_grad()
def test_loss(model, loader, device) -> float:
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        total += model(x, y).item() * x.size(0)
        count += x.size(0)
    return total / count


def evaluate(cfg: DictConfig, overrides: list[str]) -> dict:
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is required: python -m gpt_lightning.evaluate ckpt_path=PATH")
    d = cfg.decode
    if d.prompt_tokens < 1 or d.new_tokens < 1 or d.repeats < 1 or not d.batch_sizes or min(d.batch_sizes) < 1:
        raise UserError(f"decode.prompt_tokens={d.prompt_tokens}, decode.new_tokens={d.new_tokens}, "
                        f"decode.repeats={d.repeats} and decode.batch_sizes={list(d.batch_sizes)} must all be >= 1")
    path = Path(cfg.ckpt_path).expanduser().resolve()
    ckpt = load_checkpoint(path)
    device = pick_device(cfg.device)
    model, hparams = load_gpt(ckpt, map_location=device)
    settings = data_settings(ckpt, cfg, overrides)
    if not settings.get("test_fraction"):
        raise UserError(f"data.test_fraction={settings.get('test_fraction')}: there is no test split to evaluate on; "
                        f"use the checkpoint's own setting or a fraction > 0")
    dm = MachadoDataModule(**settings)
    dm.prepare_data()
    dm.setup("test")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    loss = test_loss(model, dm.test_dataloader(), device)
    c = model.config
    # Stay inside the context: past block_size every step would re-prefill, timing prefill instead of decode.
    prompt_len = min(d.prompt_tokens, c.block_size - 1)
    new_tokens = min(d.new_tokens, c.block_size - prompt_len)
    prompt = dm.datasets["test"][0][0][:prompt_len].to(device)
    decode = {f"decode_tokens_per_sec_b{b}": decode_tokens_per_sec(
                  model, prompt.expand(b, -1).contiguous(), new_tokens, d.repeats)
              for b in d.batch_sizes}
    peak, peak_kind = peak_memory(device)
    result = {
        "checkpoint": str(path),
        "global_step": ckpt.get("global_step"),
        "attention_type": hparams.get("attention_type"),
        "n_head": c.n_head, "kv_groups": c.n_kv_groups, "n_layer": c.n_layer, "n_embd": c.n_embd,
        "block_size": c.block_size, "encoding": hparams.get("encoding"),
        "parameters": model.num_params(non_embedding=False),
        "test_loss": loss, "test_ppl": math.exp(loss), "test_tokens": len(dm.datasets["test"]) * c.block_size,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(c.n_layer, c.n_kv_groups, c.head_dim),
        "kv_cache_bytes_per_token_mha": kv_cache_bytes_per_token(c.n_layer, c.n_head, c.head_dim),
        **decode,
        "decode_prompt_tokens": prompt_len, "decode_new_tokens": new_tokens,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "device": str(device),
    }
    out = path.with_name(path.stem + ".eval.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result | {"json": str(out)}


def print_table(result: dict) -> None:
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    try:
        print_table(evaluate(cfg, list(HydraConfig.get().overrides.task)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
