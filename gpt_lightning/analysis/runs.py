"""Reading finished (or crashed) runs back from disk: their run record, Hydra config and TensorBoard scalars."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from gpt_lightning.model import attention_label, kv_cache_bytes_per_token
from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord


def find_runs(root: Path) -> list[Path]:
    """Run directories: those holding a Hydra config, a summary or TensorBoard events."""
    marks = [*root.glob("**/.hydra/config.yaml"), *root.glob(f"**/{TRAIN_RECORD}"), *root.glob("**/tb/events.out.*")]
    runs = {m.parent.parent if m.parent.name in (".hydra", "tb") else m.parent for m in marks}
    return sorted(runs)


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _shape(att: dict, model: dict) -> str | None:
    """Why a run's saved attention/model keys describe no model (a run refused at validation), or None."""
    for key, value in (("attention.n_heads", att.get("n_heads")), ("attention.kv_groups", att.get("kv_groups")),
                       ("model.n_layer", model.get("n_layer")), ("model.n_embd", model.get("n_embd"))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{key}={value!r} is not a positive integer"
    if att["n_heads"] % att["kv_groups"] or model["n_embd"] % att["n_heads"]:
        return (f"attention.kv_groups={att['kv_groups']}, attention.n_heads={att['n_heads']}, "
                f"model.n_embd={model['n_embd']} do not divide")
    return None


def read_config(run: Path) -> tuple[dict, dict, str | None]:
    """(attention, model, problem) from the run's saved Hydra config (saved unresolved: resolve what we read)."""
    cfg_file = run / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return {}, {}, None
    try:
        cfg = OmegaConf.load(cfg_file)
        att = OmegaConf.to_container(cfg.attention, resolve=True) if "attention" in cfg else {}
        model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    except Exception as e:  # not YAML, or an interpolation that no longer resolves
        return {}, {}, f"unreadable .hydra/config.yaml ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(att, dict) or not isinstance(model, dict):
        return {}, {}, "unreadable .hydra/config.yaml (attention/model are not mappings)"
    problem = _shape(att, model) if att else None
    return att, model, (f"invalid config: {problem}" if problem else None)


def read_run(run: Path, root: Path) -> dict:
    """One row of the comparison. Never raises for one bad run: what cannot be read is named in `status`."""
    row: dict = {"run": str(run.relative_to(root)) or "."}
    problems = []
    att, model, problem = read_config(run)
    if problem:
        problems.append(problem)
    elif att:
        row.update(attention=attention_label(att["n_heads"], att["kv_groups"]), n_head=att["n_heads"],
                   kv_groups=att["kv_groups"])
    try:
        scalars = read_scalars(run) if (run / "tb").is_dir() else {}
    except Exception as e:  # a truncated or foreign event file
        scalars = {}
        problems.append(f"unreadable TensorBoard events ({type(e).__name__})")
    curve = scalars.get("val/loss", [])
    record_file = run / TRAIN_RECORD
    record = None
    if record_file.is_file():
        try:
            record = RunRecord.load(record_file)
        except RecordError as e:
            problems.append(f"unreadable record: {e}")
    if record is not None:
        r = record
        row.update(status=r.status if r.status != "failed" else f"failed: {r.error}", parameters=r.parameters,
                   best_val_loss=r.best_val_loss, test_ppl=r.test_ppl, train_tokens_per_sec=r.train_tokens_per_sec,
                   decode_tokens_per_sec=r.decode_tokens_per_sec, kv_cache_bytes_per_token=r.kv_cache_bytes_per_token,
                   steps=r.global_step)
        if r.n_head is not None:  # a failed run's record has no shape: keep the config's
            row.update(attention=r.attention, n_head=r.n_head, kv_groups=r.kv_groups)
    else:
        has_ckpt = any((run / "checkpoints").glob("*.ckpt"))
        row["status"] = "incomplete (no summary; last checkpoint kept)" if has_ckpt else "crashed (no checkpoint)"
        row["best_val_loss"] = min((v for _, v in curve), default=None)
        row["steps"] = max((s for s, _ in scalars.get("train/loss", [])), default=None)
        # ThroughputMonitor: train/device/items_per_sec on one device, train/items_per_sec (all ranks) with DDP
        tput = scalars.get("train/items_per_sec") or scalars.get("train/device/items_per_sec") or []
        row["train_tokens_per_sec"] = tput[-1][1] if tput else None
        if att and not problem:
            row["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(
                model["n_layer"], att["kv_groups"], model["n_embd"] // att["n_heads"])
    if problems:
        row["status"] = "; ".join([row["status"], *problems])
    row["best_val_loss"] = _finite(row.get("best_val_loss"))
    row["val_ppl"] = math.exp(row["best_val_loss"]) if row["best_val_loss"] is not None else None
    row["val_curve"] = curve
    return row
