"""Reading finished (or crashed) runs back from disk: their run record, resolved Hydra config and logged curves
(TensorBoard events, else the CSV logger's metrics.csv)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from omegaconf import OmegaConf

from gpt_lightning.analysis.decode_by_arm import read_eval_grid
from gpt_lightning.model import attention_label, kv_cache_bytes_per_token
from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord


def find_runs(root: Path) -> list[Path]:
    """Run directories: those holding a Hydra config, a summary or TensorBoard events."""
    marks = [*root.glob("**/.hydra/config.yaml"), *root.glob(f"**/{TRAIN_RECORD}"), *root.glob("**/tb/events.out.*"),
             *root.glob("**/csv/metrics.csv")]
    runs = {m.parent.parent if m.parent.name in (".hydra", "tb", "csv") else m.parent for m in marks}
    return sorted(runs)


def is_run(path: Path) -> bool:
    return (path / TRAIN_RECORD).is_file() or (path / ".hydra" / "config.yaml").is_file()


def read_tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points from the run's TensorBoard event files (`<run>/tb`), one per step.

    A resumed run has an event file per launch, and both may hold a step (the resume replays from its checkpoint):
    the value logged last, by wall time, is the one kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            at = latest.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in at or e.wall_time >= at[e.step][0]:
                    at[e.step] = (e.wall_time, e.value)
    return {tag: sorted((step, value) for step, (_, value) in at.items()) for tag, at in latest.items()}


def read_csv_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) points from the CSV logger's <run>/csv/metrics.csv (one column per metric), one
    per step: where a step was logged twice (a resumed run), the row written last."""
    scalars: dict[str, dict[int, float]] = {}
    with open(run / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = row.pop("step", "")
            row.pop("epoch", None)
            for tag, value in row.items():
                if value not in ("", None) and step != "":
                    scalars.setdefault(tag, {})[int(float(step))] = float(value)
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def read_curves(run: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """(scalars, source): every logged scalar's (step, value) points, sorted by step, from TensorBoard's events when
    the run has any, else the CSV logger's metrics.csv; source is "tensorboard", "csv" or "none". The one place that
    reads a run's curves: every report and plot goes through it."""
    if any((run / "tb").glob("events.out.tfevents.*")):
        return read_tensorboard_scalars(run), "tensorboard"
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


def _resolved(node):
    """A config node as plain containers, resolved key by key: a value whose interpolation cannot be resolved
    outside its run (`${hydra:runtime.output_dir}`, a resolver not registered here) keeps its text."""
    if OmegaConf.is_dict(node):
        out = {}
        for key in node:
            try:
                value = node[key] if not OmegaConf.is_missing(node, key) else "???"
            except Exception:  # unresolvable interpolation: keep it as written
                value = node._get_node(key)._value()
            out[str(key)] = _resolved(value)
        return out
    if OmegaConf.is_list(node):
        out = []
        for i in range(len(node)):
            try:
                out.append(_resolved(node[i]) if not OmegaConf.is_missing(node, i) else "???")
            except Exception:
                out.append(node._get_node(i)._value())
        return out
    return node


def read_config(run: Path) -> dict | None:
    """The run's resolved config (Hydra saves `.hydra/config.yaml` unresolved: mha's kv_groups is ${.n_heads})."""
    cfg_file = run / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    from gpt_lightning.training.model_config import register_resolvers

    register_resolvers()  # ${attention_label:...} and friends resolve as they did in the run
    return _resolved(OmegaConf.load(cfg_file))


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


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


SHAPE_FIELDS = ("attention", "n_head", "kv_groups", "n_layer", "n_embd", "mlp_hidden", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha")
RECORD_FIELDS = ("status", "attention", "n_head", "kv_groups", "n_layer", "n_embd", "mlp_hidden", "parameters",
                 "best_val_loss", "test_loss", "test_ppl", "val_bpb", "test_bpb", "train_tokens_per_sec",
                 "decode_tokens_per_sec", "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_mha")


def read_run(run: Path, root: Path) -> dict:
    """One row: the run's name (relative to root), its resolved config, record figures, and its val/loss curve.

    A figure the run did not record (a crash, or a record from before that figure existed) is None, never 0. Never
    raises for one bad run: what cannot be read (config, events, record) is named in `status`.
    """
    try:
        name = str(run.relative_to(root)) or "."
    except ValueError:  # a parent run read from outside the folder (init_from of a study arm)
        name = str(run)
    problems = []
    try:
        config = read_config(run)
    except Exception as e:  # not YAML, or an interpolation that no longer resolves
        config = None
        problems.append(f"unreadable .hydra/config.yaml ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    row: dict = {"run": name, "path": run, "config": config}
    att = (config or {}).get("attention") or {}
    model = (config or {}).get("model") or {}
    problem = _shape(att, model) if isinstance(att, dict) and isinstance(model, dict) and att else None
    valid_shape = bool(att) and isinstance(att, dict) and isinstance(model, dict) and problem is None
    if problem:
        problems.append(f"invalid config: {problem}")
    elif valid_shape:
        row.update(attention=attention_label(att["n_heads"], att["kv_groups"]), n_head=att["n_heads"],
                   kv_groups=att["kv_groups"])
    row["seed"] = (config or {}).get("seed")
    uptrain = (config or {}).get("uptrain") or {}
    if isinstance(uptrain, dict) and _finite(uptrain.get("alpha")) is not None:  # a conversion-study arm
        row.update(uptrain_method=uptrain.get("method"), uptrain_alpha=float(uptrain["alpha"]))
    try:
        scalars, row["curves"] = read_curves(run)
    except Exception as e:  # a truncated or foreign event file
        scalars, row["curves"] = {}, "none"
        problems.append(f"unreadable logs ({type(e).__name__})")
    curve = scalars.get("val/loss", [])
    record = None
    if (run / TRAIN_RECORD).is_file():
        # when the run finished: train writes its record once, at the end (a seed run twice keeps the newer)
        row["finished_at"] = (run / TRAIN_RECORD).stat().st_mtime
        try:
            record = RunRecord.load(run / TRAIN_RECORD)
        except RecordError as e:
            problems.append(f"unreadable record: {e}")
    if record is not None:
        fields = RECORD_FIELDS if record.n_head is not None else [k for k in RECORD_FIELDS if k not in SHAPE_FIELDS]
        row.update({k: getattr(record, k) for k in fields}, steps=record.global_step)  # a failed run has no shape
        if record.status == "failed":
            row["status"] = f"failed: {record.error}"
    else:
        has_ckpt = any((run / "checkpoints").glob("*.ckpt"))
        row["status"] = "incomplete (no summary; last checkpoint kept)" if has_ckpt else "crashed (no checkpoint)"
        row["best_val_loss"] = min((v for _, v in curve), default=None)
        row["steps"] = max((s for s, _ in scalars.get("train/loss", [])), default=None)
        # ThroughputMonitor: train/device/items_per_sec on one device, train/items_per_sec (all ranks) with DDP
        tput = scalars.get("train/items_per_sec") or scalars.get("train/device/items_per_sec") or []
        row["train_tokens_per_sec"] = tput[-1][1] if tput else None
        if valid_shape:
            head_dim = model["n_embd"] // att["n_heads"]
            row["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model["n_layer"], att["kv_groups"], head_dim)
            row["kv_cache_bytes_per_token_mha"] = kv_cache_bytes_per_token(model["n_layer"], att["n_heads"], head_dim)
    # the decode grid `evaluate decode.contexts=[...]` left beside a checkpoint; an unreadable one costs only the grid
    row["decode_grid"], row["decode_grid_problem"] = read_eval_grid(run)
    if problems:
        row["status"] = "; ".join([row.get("status") or "unreadable", *problems])
    for key in ("best_val_loss", "test_loss", "test_ppl", "val_bpb", "test_bpb", "train_tokens_per_sec",
                "decode_tokens_per_sec"):
        row[key] = _finite(row.get(key))
    row["val_ppl"] = math.exp(row["best_val_loss"]) if row["best_val_loss"] is not None else None
    row["val_curve"] = curve
    return row


def _launch_dir(run: Path) -> Path:
    hydra_file = run / ".hydra" / "hydra.yaml"
    try:
        return Path(OmegaConf.load(hydra_file).hydra.runtime.cwd)
    except Exception:  # no hydra.yaml (copied runs): the current directory is the best guess
        return Path.cwd()


def parents_of(rows: list[dict], known: set[Path]) -> list[Path]:
    """Run directories of the MHA parents that conversion-study arms started from (`init_from`), when they are
    gpt_lightning runs not already among `known`: the study's baseline lives where the parent was trained."""
    found = []
    for row in rows:
        init_from = ((row.get("config") or {}).get("init_from")) if row.get("uptrain_alpha") is not None else None
        if not isinstance(init_from, str) or init_from.startswith("hf:"):
            continue
        path = Path(init_from).expanduser()
        if not path.is_absolute():  # relative to where the arm was launched (Hydra keeps that in hydra.yaml)
            path = _launch_dir(row["path"]) / path
        run = path.resolve().parent.parent  # <run>/checkpoints/<name>.ckpt
        if is_run(run) and run not in known and run not in found:
            found.append(run)
    return found
