"""The conversion study (GQA paper, arXiv 2305.13245, section 3.3 in miniature): how an MHA parent becomes a
GQA/MQA model (`uptrain.method`), and for how many of the parent's steps it is trained afterwards (`uptrain.alpha`).

The `uptrain` config node:
- `method`: mean | first | random — how `init_from`'s KV heads are pooled (any `init_from` run);
  `scratch` — a study arm that ignores the parent's weights and trains a fresh model instead.
- `alpha`: null outside the study (trainer.max_steps as usual). A number turns the run into a study arm:
  a converted model trains round(alpha * P) steps, P = the parent checkpoint's global_step (alpha = 0: no
  training at all, the converted model is validated and tested as is); `scratch` trains P + round(alpha * P)
  steps, the parent's budget plus the same extra steps.
- `optim`: optimizer settings laid over `optim.*` for runs that start from `init_from` weights (a converted model
  needs a small learning rate: a fresh AdamW at the peak rate undoes the pooling); `scratch` keeps `optim.*`.
- `parent`: `train` trains the MHA parent first, once per sweep, into `<sweep dir>/parent/` (one subprocess, under
  a file lock so parallel jobs wait for it) and uses its `last.ckpt` as `init_from`. A parent counts as trained
  when its run record says complete and its last.ckpt is there; an interrupted one (a checkpoint, no record) is
  resumed; a failed one is moved aside to `parent.failed-N/` and trained again, once per process (the later jobs
  of a sweep whose parent failed fail with the same line instead of retraining it each); a complete one whose
  last.ckpt is gone is refused (a new parent would split the study's arms).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.model.convert import POOL_METHODS, check_pool_method
from gpt_lightning.training.checkpoints import load_checkpoint
from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord

log = logging.getLogger(__name__)

SCRATCH = "scratch"
STUDY_METHODS = (*POOL_METHODS, SCRATCH)
PARENT_DIR = "parent"
# The parent's checkpoint, for the other ranks of a DDP job: Lightning starts them as single runs (hydra.mode=RUN)
# whose own directory holds no parent; they inherit the environment of rank 0, which resolved it.
PARENT_ENV = "GPT_LIGHTNING_UPTRAIN_PARENT"
# Overrides of a study job that the parent must not take: it is the MHA model every arm starts from.
NOT_FOR_THE_PARENT = ("uptrain.", "init_from", "attention.kv_groups", "seed", "ckpt_path")


def settings(cfg) -> dict:
    """The `uptrain` node as a plain dict with every key present (configs from before it existed: defaults)."""
    node = OmegaConf.select(cfg, "uptrain", default=None)
    node = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return {"method": "mean", "alpha": None, "optim": None, "parent": None, "needs_init_from": False, **node}


def check(cfg) -> dict:
    """Refuse contradictory `uptrain.*` settings in one line, before any data or model work; return them."""
    u = settings(cfg)
    method, alpha, parent = u["method"], u["alpha"], u["parent"]
    if method != SCRATCH:
        check_pool_method(method, "uptrain.method")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha < 0):
        raise UserError(f"uptrain.alpha={alpha!r} must be null or a number >= 0 (a fraction of the parent's steps)")
    if method == SCRATCH and alpha is None:
        raise UserError("uptrain.method=scratch is a conversion-study arm: set uptrain.alpha (it trains the parent's "
                        "steps + alpha x steps from scratch)")
    if parent not in (None, "train"):
        raise UserError(f"uptrain.parent={parent!r}: use null, or train (train the MHA parent first)")
    if u["needs_init_from"] and not cfg.init_from and parent is None:  # a preset that only makes sense from weights
        raise UserError("this preset converts an MHA checkpoint: pass init_from=<MHA run>/checkpoints/last.ckpt "
                        "(e.g. experiment=uptrain_gqa init_from=outputs/runs/<mha run>/checkpoints/last.ckpt)")
    if parent == "train" and cfg.init_from:
        raise UserError(f"uptrain.parent=train trains its own parent, but init_from={cfg.init_from} is set too; "
                        f"drop one of them")
    if alpha is not None and parent is None and not cfg.init_from:
        raise UserError(f"uptrain.alpha={alpha} needs a parent: set init_from=<MHA checkpoint> "
                        f"(or uptrain.parent=train)")
    if alpha is not None and str(cfg.init_from or "").startswith("hf:"):
        raise UserError(f"uptrain.alpha counts the parent's steps, which init_from={cfg.init_from} does not have; "
                        f"use a gpt_lightning .ckpt")
    if u["optim"] is not None and not isinstance(u["optim"], dict):
        raise UserError(f"uptrain.optim={u['optim']!r} must be null or a mapping of optim keys (e.g. {{lr: 1.0e-4}})")
    unknown = sorted(set(u["optim"] or {}) - set(cfg.optim))
    if unknown:
        raise UserError(f"uptrain.optim has unknown key(s) {', '.join(unknown)}; valid: {', '.join(cfg.optim)}")
    if u["optim"]:
        check_optim_over(OmegaConf.to_container(cfg.optim, resolve=True), u["optim"])
    return u


def check_optim_over(optim: dict, over: dict) -> None:
    """`uptrain.optim` laid over `optim.*` passes optim's own checks, a bad value named as the uptrain key."""
    from gpt_lightning.training.config_checks import check_optim  # config_checks imports more of the package

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key, value in over.items():
        if isinstance(optim[key], (list, tuple)):
            if not (isinstance(value, (list, tuple)) and all(number(x) for x in value)):
                raise UserError(f"uptrain.optim.{key}={value!r} must be a list of numbers, as optim.{key}")
        elif not number(value):
            raise UserError(f"uptrain.optim.{key}={value!r} must be a number, as optim.{key}")
    try:
        check_optim(OmegaConf.create({**optim, **over}))
    except UserError as e:
        key = str(e).split("=", 1)[0].removeprefix("optim.")
        if key in over:  # the value laid over optim.* is the bad one
            raise UserError(f"uptrain.{e}") from None
        raise


@dataclass(frozen=True)
class Plan:
    """What a run with `init_from` (or a study arm) does: where its weights come from and how long it trains."""
    init_from: str | None       # the parent checkpoint
    method: str                 # mean | first | random | scratch
    alpha: float | None         # None outside the study
    parent_steps: int | None    # the parent checkpoint's global_step (study only)
    max_steps: int | None       # None: trainer.max_steps as configured

    @property
    def loads_weights(self) -> bool:
        return bool(self.init_from) and self.method != SCRATCH

    @property
    def evaluate_only(self) -> bool:
        """alpha = 0 on a converted model: no training, validate and test the conversion itself."""
        return self.max_steps == 0

    def details(self) -> dict:
        return {"method": self.method, "alpha": self.alpha, "parent": self.init_from,
                "parent_steps": self.parent_steps}


def plan(u: dict, init_from: str | None) -> Plan:
    """The run's plan from the checked `uptrain` settings and the parent checkpoint (read for its step count)."""
    alpha = u["alpha"]
    if alpha is None:
        return Plan(init_from, u["method"], None, None, None)
    parent_steps = int(load_checkpoint(init_from).get("global_step") or 0)
    extra = round(alpha * parent_steps)
    max_steps = parent_steps + extra if u["method"] == SCRATCH else extra
    log.info("conversion study: method=%s, alpha=%g of the parent's %d steps -> %d training steps%s",
             u["method"], alpha, parent_steps, max_steps, " (validate and test only)" if max_steps == 0 else "")
    return Plan(init_from, u["method"], float(alpha), parent_steps, max_steps)


def optim_settings(optim: dict, u: dict, p: Plan) -> dict:
    """`optim.*`, with `uptrain.optim` on top when the run starts from the parent's weights."""
    return {**optim, **(u["optim"] or {})} if p.loads_weights else dict(optim)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # parallel sweep jobs wait here while the first trains the parent
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parent_command(task_overrides: list[str], parent_dir: Path) -> list[str]:
    """`python -m gpt_lightning.train` for the MHA parent: this job's overrides minus the study's own keys."""
    kept = [o for o in task_overrides if not o.lstrip("~+").startswith(NOT_FOR_THE_PARENT)]
    return [sys.executable, "-m", "gpt_lightning.train", *kept, "uptrain.parent=null", "uptrain.alpha=null",
            "attention.kv_groups=${attention.n_heads}", "hydra.mode=RUN", f"hydra.run.dir={parent_dir}"]


def parent_state(parent_dir: Path) -> str:
    """complete (record says so and last.ckpt is there) | checkpoint missing (the record says complete, last.ckpt is
    gone: deleted by hand, or an unmounted disk) | interrupted (last.ckpt, no record: a signal or a kill stopped it)
    | failed (anything else left in the folder) | absent."""
    record, ckpt = parent_dir / TRAIN_RECORD, parent_dir / "checkpoints" / "last.ckpt"
    if record.is_file():
        try:
            complete = RunRecord.load(record).status == "complete"
        except RecordError:
            complete = False
        if complete:
            return "complete" if ckpt.is_file() else "checkpoint missing"
        return "failed"
    if ckpt.is_file():
        return "interrupted"
    return "failed" if parent_dir.exists() else "absent"


def move_aside(parent_dir: Path) -> Path:
    """Keep a failed parent's files (its log says why) under the first free `parent.failed-N`."""
    n = 1
    while (aside := parent_dir.with_name(f"{parent_dir.name}.failed-{n}")).exists():
        n += 1
    parent_dir.rename(aside)
    return aside


_failed_parents: dict[str, str] = {}  # parent folder -> the error of this process's attempt to train it


def train_parent(home: Path, task_overrides: list[str], launch_dir: Path) -> str:
    """The parent's last.ckpt, trained first (once per `home`: the sweep directory) when it is not there yet."""
    if os.environ.get(PARENT_ENV):  # a DDP rank started by rank 0, or a later job of the same sweep process
        return os.environ[PARENT_ENV]
    parent_dir = home / PARENT_DIR
    ckpt = parent_dir / "checkpoints" / "last.ckpt"
    if str(parent_dir) in _failed_parents:  # a deterministic failure would only repeat for every job
        raise UserError(_failed_parents[str(parent_dir)])
    with _locked(home / ".parent.lock"):
        state = parent_state(parent_dir)
        if state == "checkpoint missing":  # the arms already trained from it: a new parent would split the study
            raise UserError(f"the MHA parent in {parent_dir} finished ({TRAIN_RECORD} says complete) but {ckpt} is "
                            f"missing (deleted, or the parent ran with checkpointing off): put it back, or move "
                            f"{parent_dir} aside to train a new parent (arms trained from the old one then no longer "
                            f"share a parent with new ones)")
        if state == "complete":
            log.info("using the MHA parent trained earlier in this sweep: %s", ckpt)
        else:
            cmd = parent_command(task_overrides, parent_dir)
            if state == "interrupted":
                cmd.append("ckpt_path=last")
                log.info("resuming the interrupted MHA parent in %s from its last.ckpt", parent_dir)
            elif state == "failed":
                log.warning("the MHA parent in %s did not finish; moved it aside to %s and training it again",
                            parent_dir, move_aside(parent_dir))
            log.info("training the MHA parent first, into %s: %s", parent_dir, " ".join(cmd[1:]))
            rc = subprocess.run(cmd, cwd=launch_dir).returncode
            if rc != 0 or parent_state(parent_dir) != "complete":
                error = (f"training the MHA parent failed (exit status {rc}); its log is in {parent_dir}; fix that "
                         f"and rerun the study (a finished parent is reused, a failed one moved aside)")
                _failed_parents[str(parent_dir)] = error
                raise UserError(error)
    os.environ[PARENT_ENV] = str(ckpt)
    return str(ckpt)
