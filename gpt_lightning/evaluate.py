"""`python -m gpt_lightning.evaluate ckpt_path=PATH`: test loss/perplexity, size, KV-cache bytes, decode speed, memory.

Prints a table and writes the run record `<checkpoint stem>.eval.json` beside the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.cli import exits_on_user_error
from gpt_lightning.common.device import keep_freed_memory, pick_device
from gpt_lightning.common.errors import UserError
from gpt_lightning.data.fetch import check_http
from gpt_lightning.measure.decode_grid import format_grid
from gpt_lightning.measure.evaluation import evaluate_checkpoint
from gpt_lightning.training.config_errors import one_line_config_errors
from gpt_lightning.training.schema import check_known_keys


def evaluate(cfg: DictConfig) -> tuple[dict, Path]:
    check_known_keys(cfg)
    if not cfg.ckpt_path:
        raise UserError("ckpt_path is required: python -m gpt_lightning.evaluate ckpt_path=PATH")
    d = cfg.decode
    if d.prompt_tokens < 1 or d.new_tokens < 1 or d.repeats < 1 or not d.batch_sizes or min(d.batch_sizes) < 1:
        raise UserError(f"decode.prompt_tokens={d.prompt_tokens}, decode.new_tokens={d.new_tokens}, "
                        f"decode.repeats={d.repeats} and decode.batch_sizes={list(d.batch_sizes)} must all be >= 1")
    contexts = list(d.contexts) if d.contexts else []
    if any(not isinstance(c, int) or c < 1 for c in contexts):
        raise UserError(f"decode.contexts={contexts} must be positive integers (prefilled positions), "
                        f"e.g. decode.contexts=[128,512,1024]")
    if d.grid_new_tokens < 1 or d.memory_budget_gb <= 0:
        raise UserError(f"decode.grid_new_tokens={d.grid_new_tokens} must be >= 1 and "
                        f"decode.memory_budget_gb={d.memory_budget_gb} > 0")
    # data.* HTTP settings given here (null: the checkpoint's): checked before the checkpoint is loaded
    http = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k, v in cfg.data.items() if k in ("timeout", "retries", "backoff_factor", "pause") and v is not None}
    check_http(http.get("timeout", 1), http.get("retries", 0), http.get("backoff_factor", 0), http.get("pause", 0))
    record = evaluate_checkpoint(cfg.ckpt_path, pick_device(cfg.device), OmegaConf.to_container(cfg.data),
                                 d.prompt_tokens, d.new_tokens, list(d.batch_sizes), d.repeats, contexts=contexts,
                                 grid_new_tokens=d.grid_new_tokens, memory_budget_gb=d.memory_budget_gb,
                                 cuda_graph=d.cuda_graph)
    path = Path(record.checkpoint)
    out = record.save(path.with_name(path.stem + ".eval.json"))
    return record.to_dict(), out


def print_table(result: dict) -> None:
    details = dict(result.get("details", {}))
    rows, budget = details.pop("decode_grid", None), details.pop("decode_grid_budget", None)
    flat = {k: v for k, v in result.items() if v is not None and k != "details"} | details
    width = max(map(len, flat))
    for k, v in flat.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if rows:
        print()
        print(format_grid(rows, budget or [], None))


@one_line_config_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    with exits_on_user_error():
        result, out = evaluate(cfg)
        print_table(result)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
