"""Multiruns that survive a bad job: every job checked before the first starts, failures listed at the end.

`SweepGuard` is a Hydra callback (conf/hydra/default.yaml, `hydra.callbacks.sweep_guard`):
- `on_multirun_start`: composes every job of the sweep (the basic sweeper's cartesian product) and runs
  `check_config` on it. Invalid jobs are listed, one line each; by default nothing runs (exit 2). With
  `sweep.skip_invalid=true` the valid jobs run; an invalid job then stops at its own `check_config` within a second
  and is recorded as failed. A job whose config cannot even be composed (a value of the wrong type) cannot be
  skipped: the basic sweeper composes every job before launching any.
- `on_job_end`: a job whose run record (`summary.json`) says "failed" is noted; `train` writes that record and
  returns instead of exiting, so the sweep goes on to the next job.
- `on_multirun_end`: the jobs that failed are listed and the exit status is 1, unless every failure was an
  invalid job skipped on request (then 0).
Other sweepers (Optuna, ...) choose their jobs as they go: their jobs are checked one by one when they start.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gpt_lightning.common.cli import EXIT_USER_ERROR

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> tuple[list[list[str]], set[str]] | None:
    """Every job's overrides, in launch order, and the swept keys; None for a sweeper we cannot enumerate."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    return BasicSweeper.split_arguments(overrides, None)[0], swept


def _label(num: int, job: list[str], swept: set[str]) -> str:
    return f"#{num} " + " ".join(o for o in job if o.split("=", 1)[0] in swept)


class SweepGuard(Callback):
    def __init__(self) -> None:
        self.swept: set[str] = set()
        self.skipped: set[tuple[str, ...]] = set()
        self.failed: list[str] = []
        self.jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from gpt_lightning.common.errors import UserError
        from gpt_lightning.training.config_checks import check_config
        from gpt_lightning.training.config_errors import one_line

        found = sweep_jobs(config)
        if found is None:
            log.info("sweeper %s: jobs are checked as they start", config.hydra.sweeper.get("_target_"))
            return
        jobs, swept = found
        self.jobs, self.swept = len(jobs), swept
        # Hydra private API (hydra._internal.hydra.Hydra.config_loader): the loader the launcher composes each
        # job with, so a job is checked exactly as it will run. Pinned by tests/test_sweeps.py.
        loader = GlobalHydra.instance().hydra.config_loader
        invalid, broken = [], []
        for num, job in enumerate(jobs):
            try:
                job_cfg = loader.load_sweep_config(config, list(job))
            except Exception as e:  # a value of the wrong type, an unknown group option
                broken.append(f"  {_label(num, job, swept)}: {one_line(e)}")
                continue
            try:
                check_config(job_cfg)
            except UserError as e:
                invalid.append((tuple(job), f"  {_label(num, job, swept)}: {e}"))
        if not invalid and not broken:
            return
        bad = len(invalid) + len(broken)
        lines = [line for _, line in invalid] + broken
        skip = bool(config.get("sweep", {}).get("skip_invalid", False))
        if skip and not broken:
            self.skipped = {job for job, _ in invalid}
            print(f"warning: skipping {bad} invalid job(s) of {len(jobs)} (sweep.skip_invalid=true):\n"
                  + "\n".join(lines), file=sys.stderr, flush=True)
            return
        if broken and skip:
            hint = "a value of the wrong type cannot be skipped: fix the sweep"
        else:
            hint = f"fix them, or add sweep.skip_invalid=true to run the {len(jobs) - bad} valid one(s)"
        print(f"error: {bad} of {len(jobs)} sweep jobs are invalid, nothing was run ({hint}):\n"
              + "\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:  # a single run reports its own failure
            return

        from gpt_lightning.training.run_record import TRAIN_RECORD, RecordError, RunRecord

        overrides = tuple(job_return.overrides or ())
        if overrides in self.skipped:
            return
        error = None
        if job_return.status == JobStatus.FAILED:  # an exception escaped the task function
            raised = getattr(job_return, "_return_value", None)  # JobReturn.return_value would re-raise it
            error = f"{type(raised).__name__}: {raised}"
        else:
            record = Path(config.hydra.runtime.output_dir) / TRAIN_RECORD  # (working_dir is the launch dir)
            try:
                if record.is_file() and RunRecord.load(record).status == "failed":
                    error = RunRecord.load(record).error
            except RecordError:
                pass
        if error is not None:
            self.failed.append(f"  #{config.hydra.job.num} {' '.join(self._swept(overrides))} "
                               f"({config.hydra.runtime.output_dir}): {error}")

    def _swept(self, overrides) -> list[str]:
        """The overrides that tell this job from the others (all of them when the sweep was not enumerated)."""
        return [o for o in overrides if o.split("=", 1)[0] in self.swept] or list(overrides)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.skipped and not self.failed:
            print(f"warning: {len(self.skipped)} invalid job(s) were skipped (sweep.skip_invalid=true); "
                  f"the others completed", file=sys.stderr)
        if self.failed and not self.jobs:  # a search sweeper (not enumerated): a failed trial is a study outcome
            print(f"warning: {len(self.failed)} trial(s) failed (recorded as failed in the study; each run "
                  f"directory's summary.json and train.log say why):\n" + "\n".join(self.failed), file=sys.stderr)
            return
        if self.failed:
            print(f"error: {len(self.failed)} of {self.jobs} sweep jobs failed; each run directory's "
                  f"summary.json and train.log say why:\n" + "\n".join(self.failed), file=sys.stderr)
            sys.exit(1)
