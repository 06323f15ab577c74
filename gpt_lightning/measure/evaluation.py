"""A checkpoint measured on its own test split: loss, perplexity, decode speed, memory -> a `RunRecord`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gpt_lightning.common.errors import UserError
from gpt_lightning.data import MachadoDataModule
from gpt_lightning.data.tokens import token_byte_lengths
from gpt_lightning.measure import decode_grid as grid
from gpt_lightning.measure.limits import bandwidth_probe, matmul_peak
from gpt_lightning.measure.memory import peak_memory
from gpt_lightning.measure.timing import decode_tokens_per_sec
from gpt_lightning.model import graphed_decode
from gpt_lightning.training.checkpoints import load_checkpoint, load_gpt
from gpt_lightning.training.run_record import RunRecord

FIXED_BY_MODEL = ("block_size", "encoding")


def data_settings(ckpt: dict, overrides: dict) -> dict:
    """The checkpoint's own data settings (same books, split, encoding), with the non-null `overrides` on top."""
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not saved:
        raise UserError("this checkpoint holds no data settings (trained outside gpt_lightning.train); "
                        "pass data.books=[...] and data.root=... to evaluate it")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in FIXED_BY_MODEL:
            raise UserError(f"data.{key}={value}: the checkpoint fixes {' and '.join(FIXED_BY_MODEL)} "
                            f"(the model was built for them); drop that override")
        saved[key] = value
    saved["block_size"] = ckpt["hyper_parameters"]["model"]["block_size"]
    saved["encoding"] = ckpt["hyper_parameters"].get("encoding", saved.get("encoding", "gpt2"))
    return saved


@torch.no_grad()
def loss_and_bpb(model, loader, device, token_bytes: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss (nats per token) and bits per byte over every window of `loader`."""
    nats, tokens, n_bytes = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        nats += model(x, y).item() * y.numel()
        tokens += y.numel()
        n_bytes += int(token_bytes[y.cpu()].sum())
    return nats / tokens, nats / (math.log(2) * n_bytes)


def evaluate_checkpoint(path: str | Path, device: torch.device, data_overrides: dict, prompt_tokens: int,
                        new_tokens: int, batch_sizes: list[int], repeats: int, contexts: list[int] | None = None,
                        grid_new_tokens: int = 32, memory_budget_gb: float = 1.0,
                        cuda_graph: bool = True) -> RunRecord:
    """Test loss/perplexity and decode speed; with `contexts`, also the decode grid over batch_sizes x contexts
    (prefilled from the test split's first window) and the largest batch in `memory_budget_gb` per context. On a
    GPU decode replays a CUDA graph unless `cuda_graph` is False."""
    path = Path(path).expanduser().resolve()
    ckpt = load_checkpoint(path)
    model, hparams = load_gpt(ckpt, map_location=device)
    if contexts and grid_new_tokens >= model.config.block_size:  # before the test loss, not after it
        raise UserError(f"decode.grid_new_tokens={grid_new_tokens} leaves no context in this checkpoint's "
                        f"block_size={model.config.block_size}; use fewer new tokens")
    settings = data_settings(ckpt, data_overrides)
    if not settings.get("test_fraction"):
        raise UserError(f"data.test_fraction={settings.get('test_fraction')}: there is no test split to evaluate on; "
                        f"use the checkpoint's own setting or a fraction > 0")
    dm = MachadoDataModule(**settings)
    dm.prepare_data()
    dm.setup("test")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    loss, bpb = loss_and_bpb(model, dm.test_dataloader(), device,
                             torch.from_numpy(token_byte_lengths(settings["encoding"])))
    c = model.config
    # Stay inside the context: past block_size every step would re-prefill, timing prefill instead of decode.
    prompt_len = min(prompt_tokens, c.block_size - 1)
    new = min(new_tokens, c.block_size - prompt_len)
    prompt = dm.datasets["test"][0][0][:prompt_len].to(device)
    graphs = graphed_decode.GraphWatch(cuda_graph, device)
    decode = {f"b{b}": decode_tokens_per_sec(model, prompt.expand(b, -1).contiguous(), new, repeats, cuda_graph)
              for b in batch_sizes}
    details = {"decode_tokens_per_sec_by_batch": decode, "decode_prompt_tokens": prompt_len,
               "decode_cuda_graph": graphs.ran(),  # asked for on a GPU, and none of these decodes' captures failed
               "decode_new_tokens": new, "test_tokens": len(dm.datasets["test"]) * c.block_size}
    if contexts:
        text = dm.datasets["test"][0][0][None].to(device)  # (1, block_size) real tokens to prefill from
        rows = grid.decode_grid([model], batch_sizes, contexts, grid_new_tokens, repeats,
                                bandwidth=bandwidth_probe(device), prompt=text,
                                peak=lambda: matmul_peak(device, model.lm_head.weight.dtype), cuda_graph=cuda_graph)
        details["decode_grid"] = rows
        details["decode_grid_budget"] = grid.budget_rows([model], sorted({r["context"] for r in rows}),
                                                         memory_budget_gb)
    peak, peak_kind = peak_memory(device)
    return RunRecord.for_model(
        "evaluate", model, encoding=hparams.get("encoding"), global_step=ckpt.get("global_step"),
        test_loss=loss, test_ppl=math.exp(loss), test_bpb=bpb, decode_tokens_per_sec=decode.get("b1"),
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, device=str(device), checkpoint=str(path),
        details=details)
