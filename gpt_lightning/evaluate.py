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
    """The checkpoint's own data settings (same books, split, encoding), with command-line data.* overrides on top."""
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not saved:  # a checkpoint trained outside train.py: fall back to the composed config
        saved = OmegaConf.to_container(cfg.data, resolve=True)
        saved.pop("_target_", None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            saved[key[5:]] = data[key[5:]]
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
    path = Path(cfg.ckpt_path).expanduser().resolve()
    ckpt = load_checkpoint(path)
    device = pick_device(cfg.device)
    model, hparams = load_gpt(path, map_location=device)
    dm = MachadoDataModule(**data_settings(ckpt, cfg, overrides))
    dm.prepare_data()
    dm.setup("test")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    loss = test_loss(model, dm.test_dataloader(), device)
    c = model.config
    prompt = torch.from_numpy(dm.datasets["test"][0][0][: cfg.decode.prompt_tokens].numpy()).to(device)
    decode = {f"decode_tokens_per_sec_b{b}": decode_tokens_per_sec(
                  model, prompt.expand(b, -1).contiguous(), cfg.decode.new_tokens, cfg.decode.repeats)
              for b in cfg.decode.batch_sizes}
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
        "decode_new_tokens": cfg.decode.new_tokens,
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
