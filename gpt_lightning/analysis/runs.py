"""Reading finished (or crashed) runs back from disk: their run record, Hydra config and curves (TensorBoard events,
else the CSV logger's metrics.csv)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from omegaconf import OmegaConf

from gpt_lightning.model import attention_label, kv_cache_bytes_per_token
from gpt_lightning.training.run_record import TRAIN_RECORD, RunRecord


def find_runs(root: Path) -> list[Path]:
    """Run directories: those holding a Hydra config, a summary or TensorBoard events."""
    marks = [*root.glob("**/.hydra/config.yaml"), *root.glob(f"**/{TRAIN_RECORD}"), *root.glob("**/tb/events.out.*"),
             *root.glob("**/csv/metrics.csv")]
    runs = {m.parent.parent if m.parent.name in (".hydra", "tb", "csv") else m.parent for m in marks}
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


def read_csv_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) points from the CSV logger's <run>/csv/metrics.csv (one column per metric)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(run / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = row.pop("step", "")
            row.pop("epoch", None)
            for tag, value in row.items():
                if value not in ("", None) and step != "":
                    scalars.setdefault(tag, []).append((int(float(step)), float(value)))
    return {tag: sorted(points) for tag, points in scalars.items()}


def read_curves(run: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """(scalars, source): TensorBoard's events when the run has any, else the CSV logger's metrics.csv.
    source is "tensorboard", "csv" or "none"."""
    if any((run / "tb").glob("events.out.tfevents.*")):
        return read_scalars(run), "tensorboard"
    if (run / "csv" / "metrics.csv").is_file():
        return read_csv_scalars(run), "csv"
    return {}, "none"


def curve_source_notes(rows: list[dict]) -> list[str]:
    """Report lines naming the runs without TensorBoard events, and where their curves came from."""
    csv_runs = [r["run"] for r in rows if r.get("curves") == "csv"]
    no_curves = [r["run"] for r in rows if r.get("curves") == "none"]
    lines = []
    if csv_runs:
        lines.append(f"No TensorBoard events in {', '.join(csv_runs)}: their curves come from csv/metrics.csv.")
    if no_curves:
        lines.append(f"No TensorBoard events and no csv/metrics.csv in {', '.join(no_curves)}: no curves.")
    return lines + [""] if lines else []


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def read_run(run: Path, root: Path) -> dict:
    row: dict = {"run": str(run.relative_to(root)) or "."}
    cfg_file = run / ".hydra" / "config.yaml"
    att, model = {}, {}
    if cfg_file.is_file():  # saved unresolved (mha's kv_groups is ${.n_heads}): resolve what we read
        cfg = OmegaConf.load(cfg_file)
        att = OmegaConf.to_container(cfg.attention, resolve=True) if "attention" in cfg else {}
        model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    if isinstance(att.get("n_heads"), int) and isinstance(att.get("kv_groups"), int):
        row.update(attention=attention_label(att["n_heads"], att["kv_groups"]), n_head=att["n_heads"],
                   kv_groups=att["kv_groups"])
    scalars, row["curves"] = read_curves(run)
    curve = scalars.get("val/loss", [])
    record_file = run / TRAIN_RECORD
    if record_file.is_file():
        r = RunRecord.load(record_file)
        row.update(status=r.status, attention=r.attention, n_head=r.n_head, kv_groups=r.kv_groups,
                   parameters=r.parameters, best_val_loss=r.best_val_loss, test_ppl=r.test_ppl,
                   train_tokens_per_sec=r.train_tokens_per_sec, decode_tokens_per_sec=r.decode_tokens_per_sec,
                   kv_cache_bytes_per_token=r.kv_cache_bytes_per_token, steps=r.global_step)
    else:
        has_ckpt = any((run / "checkpoints").glob("*.ckpt"))
        row["status"] = "incomplete (no summary; last checkpoint kept)" if has_ckpt else "crashed (no checkpoint)"
        row["best_val_loss"] = min((v for _, v in curve), default=None)
        row["steps"] = max((s for s, _ in scalars.get("train/loss", [])), default=None)
        # ThroughputMonitor: train/device/items_per_sec on one device, train/items_per_sec (all ranks) with DDP
        tput = scalars.get("train/items_per_sec") or scalars.get("train/device/items_per_sec") or []
        row["train_tokens_per_sec"] = tput[-1][1] if tput else None
        if att and model.get("n_embd"):
            row["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(
                model["n_layer"], att["kv_groups"], model["n_embd"] // att["n_heads"])
    row["best_val_loss"] = _finite(row.get("best_val_loss"))
    row["val_ppl"] = math.exp(row["best_val_loss"]) if row["best_val_loss"] is not None else None
    row["val_curve"] = curve
    return row
