"""Hyperparameter search, the light half (no optuna import): what a run returns to a sweeper, and the one-line check
of `hparams_search=NAME`. The per-arm Optuna sweeper itself is `gpt_lightning/training/per_arm_sweeper.py`."""

from __future__ import annotations

import math
from pathlib import Path

from gpt_lightning.common.errors import UserError
from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord

SEARCH_CONF = Path(__file__).resolve().parents[2] / "conf" / "hparams_search"


def search_objective(record: RunRecord | None) -> float:
    """What `train` returns, and a Hydra sweeper minimises: the run's best validation bits per byte where it measured
    bpb, else its best validation loss; NaN for a failed run (no record, diverged), which the sweeper records as a
    failed trial.

    Best bpb: the record's `best_val_bpb` when it has one; else derived. bpb is the validation loss times a constant of
    the validation windows (tokens per UTF-8 byte / ln 2), the same windows at every validation, so the validation
    with the best loss is also the one with the best bpb: best bpb = best_val_loss * val_bpb / val_loss.
    """
    if record is None or record.status != "complete":
        return float("nan")
    best_loss = record.best_val_loss
    best_bpb = getattr(record, "best_val_bpb", None)
    if best_bpb is None and None not in (best_loss, record.val_bpb, record.val_loss) and record.val_loss > 0:
        best_bpb = best_loss * record.val_bpb / record.val_loss
    value = best_bpb if best_bpb is not None else best_loss
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def run_objective(run_dir: str | Path) -> float:
    """`search_objective` of the run record `train` wrote in `run_dir` (NaN when there is none)."""
    try:
        return search_objective(RunRecord.load(Path(run_dir) / TRAIN_RECORD))
    except RecordError:
        return float("nan")


def check_hparams_search(args: list[str]) -> None:
    """`hparams_search=NAME` with no conf/hparams_search/NAME.yaml: one line naming the available searches (Hydra's
    own message spans several lines and lists its search path)."""
    available = sorted(p.stem for p in SEARCH_CONF.glob("*.yaml"))
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "hparams_search" and value not in ("", "null"):
            for name in value.split(","):
                if name not in available:
                    raise UserError(f"hparams_search={name} is unknown; available: {', '.join(available)} "
                                    f"(conf/hparams_search/)")
