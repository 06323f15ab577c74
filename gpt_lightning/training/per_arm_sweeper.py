"""The per-arm Optuna sweeper: `python -m gpt_lightning.train -m hparams_search=lr attention.kv_groups=1,2,4,8`.

Hydra's Optuna sweeper would treat `attention.kv_groups=1,2,4,8` as one more search dimension: one study would pick
kv_groups as it picks the learning rate, and the arms would not each get their best learning rate. This sweeper
(hydra-optuna-sweeper's, with `sweep` replaced) splits the overrides instead:

- a list (`a=1,2`, `choice(...)`, `range(...)`), on the command line or in `hydra.sweeper.params` (an experiment
  preset's sweep: `experiment=kv_sweep`'s kv_groups, `kv_sweep_seeds`' seeds), is an **arm** dimension: every
  combination of them is an arm, and each arm gets its own Optuna study;
- an `interval(...)` in `hydra.sweeper.params` (the hparams_search preset's) or on the command line
  (`'optim.weight_decay=interval(0,0.2)'`, `'optim.lr=tag(log,interval(1e-4,1e-2))'`, which replaces the preset's
  range) is the **search space** of every study;
- everything else is fixed, the same for every trial (the seed included).

Each study lives in SQLite under the sweep folder (`sqlite:///<sweep dir>/optuna.db`), named `<study_name>[<arm>]`,
so the same command with the same `hydra.sweep.dir` continues where it stopped: each arm runs until it has
`n_trials` finished trials (a trial left running by an interrupted search is marked failed), and a study made with
other fixed overrides is refused. A job that raises or returns NaN/inf (a diverged run) is a failed trial; the study
goes on. At the end, `<sweep dir>/optimization_results.yaml` lists each arm's best parameters.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from gpt_lightning.common.errors import UserError
from gpt_lightning.common.files import atomic_write_text

try:
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2.10 uses the SQLAlchemy 1.4 API
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up lines would flood the console
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_optuna_distribution_from_override
except ImportError as e:
    raise UserError(f'hparams_search needs the search extra ({e.name} is not installed): pip install -e ".[search]"') \
        from None
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's multivariate option

log = logging.getLogger(__name__)
RESULTS = "optimization_results.yaml"
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def flatten(params: Any, prefix: str = "") -> dict[str, str]:
    """hydra.sweeper.params as {"optim.lr": "tag(log, interval(...))"}: YAML keys may be dotted or nested."""
    if params is None:
        return {}
    out = {}
    for k, v in (OmegaConf.to_container(params) if isinstance(params, DictConfig) else dict(params)).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def bare(key: str) -> str:
    return key.lstrip("+~")


def split_overrides(arguments: list[str], params: dict[str, str]) -> tuple[dict, dict, list[str]]:
    """(arms {key: [values]}, search space {key: distribution}, fixed overrides) from hydra.sweeper.params and the
    command line's overrides, the same rules for both: lists are arms, intervals are searched, the rest is fixed.
    A key given on the command line wins over the same key in params."""
    parser = OverridesParser.create()
    arms: dict[str, list[str]] = {}
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}  # key -> override
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(arguments)):
        key = o.get_key_element()
        for kind in (arms, space, fixed):  # a later value of the key replaces an earlier one
            kind.pop(key, None)
        if o.is_choice_sweep() or o.is_range_sweep():
            arms[key] = list(o.sweep_string_iterator())
        elif o.is_interval_sweep():
            space[key] = create_optuna_distribution_from_override(o)
        elif o.is_sweep_override():
            raise UserError(f"{o.input_line}: glob sweeps are not supported by the per-arm search; list the values")
        else:
            fixed[key] = o.input_line
    return arms, space, list(fixed.values())


def arm_label(arm: dict[str, str]) -> str:
    return ",".join(f"{bare(k)}={v}" for k, v in arm.items()) or "all"


class PerArmSearch(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper (its setup, launcher and settings), with one study per arm. The sampler is a
    config (`_recursive_: false` in conf/hydra/sweeper/per_arm_optuna.yaml), instantiated afresh for every study."""

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()  # hydra.sweeper.search_space (deprecated) -> params
        arms, space, fixed = split_overrides(arguments, flatten(self.params))
        if not space:
            raise UserError("nothing to search: set hydra.sweeper.params or pass an interval, e.g. "
                            "'optim.lr=tag(log,interval(1e-4,1e-2))'")
        if self.n_trials < 1:
            raise UserError(f"hydra.sweeper.n_trials={self.n_trials} must be >= 1 (trials per arm)")
        directions = self._get_directions()
        if len(directions) != 1:
            raise UserError(f"hydra.sweeper.direction={directions}: the per-arm search minimises one value")
        sweep_dir = Path(self.config.hydra.sweep.dir).expanduser().resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        base = self.study_name or "search"
        combos = [dict(zip(arms, values)) for values in itertools.product(*arms.values())] or [{}]
        studies = [(arm, f"{base}[{arm_label(arm)}]") for arm in combos]
        log.info("per-arm search: %d arm(s) x %d trials over %s; studies in %s (the same command with "
                 "hydra.sweep.dir=%s continues)", len(studies), self.n_trials, ", ".join(space), storage, sweep_dir)
        self.job_idx = self._next_job_number(storage)
        results = []
        for arm, name in studies:  # the file is rewritten after each arm: an interrupted search lists the arms done
            results.append(self._search_arm(arm, name, space, fixed, storage, directions[0], sweep_dir))
            atomic_write_text(sweep_dir / RESULTS, OmegaConf.to_yaml(OmegaConf.create({
                "name": "optuna-per-arm", "direction": directions[0], "storage": storage, "n_trials": self.n_trials,
                "objective": "best val/bpb (best val/loss where the run has no bpb)",
                "search_space": {k: repr(v) for k, v in space.items()}, "fixed": fixed, "arms": results})))
        log.info("best parameters per arm: %s", sweep_dir / RESULTS)

    def _next_job_number(self, storage: str) -> int:
        """Job numbers continue after the ones already in this storage, so a resumed search never reuses (and
        mixes files into) an earlier trial's job folder."""
        numbers = [t.user_attrs.get("job_num", -1) for s in optuna.get_all_study_summaries(storage)
                   for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]
        return 1 + max(numbers, default=-1)

    def _study(self, name: str, fixed: list[str], storage: str, direction: str):
        exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
        study = optuna.create_study(study_name=name, storage=storage, sampler=self._sampler(0), direction=direction,
                                    load_if_exists=True)
        made_with = study.user_attrs.get("fixed")
        if not exists:
            study.set_user_attr("fixed", fixed)
        elif made_with is not None and sorted(made_with) != sorted(fixed):
            raise UserError(f"study {name!r} in {storage} was made with the fixed overrides {sorted(made_with)}, "
                            f"this command has {sorted(fixed)}: repeat those to continue it, or pass another "
                            f"hydra.sweep.dir")
        return study

    def _sampler(self, seed_offset: int):
        """A fresh sampler per study. Every arm starts from the same seed (the arms see the same first random
        draws); a resumed study is seeded past the trials it has, so it does not repeat them."""
        cfg = OmegaConf.to_container(self.sampler, resolve=True) if isinstance(self.sampler, DictConfig) \
            else dict(self.sampler)
        if cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + seed_offset
        return instantiate(cfg)

    def _search_arm(self, arm: dict, name: str, space: dict, fixed: list[str], storage: str, direction: str,
                    sweep_dir: Path) -> dict:
        study = self._study(name, fixed, storage, direction)
        for t in study.trials:  # left running by an interrupted search: it will never report
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
        done = sum(t.state in FINISHED for t in study.trials)
        if done:
            study.sampler = self._sampler(done)
            log.info("%s: %d of %d trials already finished", name, done, self.n_trials)
        arm_overrides = [f"{k}={v}" for k, v in arm.items()]
        while done < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = []
            for i, trial in enumerate(trials):
                searched = [f"{k}={trial._suggest(k, d)}" for k, d in space.items()]  # as hydra-optuna-sweeper does
                trial.set_user_attr("job_num", self.job_idx + i)
                batch.append((*fixed, *arm_overrides, *searched))
            try:
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            except BaseException:  # a job exited (a bad config: every trial would fail) or Ctrl-C
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                if ret.hydra_cfg is not None:  # the job's folder, relative to the sweep folder
                    trial.set_user_attr("run", os.path.relpath(ret.hydra_cfg.hydra.runtime.output_dir, sweep_dir))
                self._tell(study, trial, ret, name)
            done += len(trials)
        # to repeat the best trial as a single run: no hparams_search (that would start a search)
        single = [o for o in fixed if bare(o.partition("=")[0]) != "hparams_search"]
        return self._arm_result(study, arm, name, arm_overrides + single)

    @staticmethod
    def _tell(study, trial, ret, name: str) -> None:
        try:
            value = float(ret.return_value)  # raises the job's exception if it failed
        except Exception as e:
            study.tell(trial, state=TrialState.FAIL)
            log.warning("%s trial %d failed: %s: %s", name, trial.number, type(e).__name__,
                        (str(e).splitlines() or [""])[0])
            return
        if math.isfinite(value):
            study.tell(trial, value)
            log.info("%s trial %d: %s -> %.4f", name, trial.number, trial.params, value)
        else:  # diverged (NaN/inf loss), or no validation happened
            study.tell(trial, state=TrialState.FAIL)
            log.warning("%s trial %d failed: objective %s with %s", name, trial.number, value, trial.params)

    @staticmethod
    def _arm_result(study, arm: dict, name: str, overrides: list[str]) -> dict:
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        counts = {state.name.lower(): sum(t.state == state for t in study.trials) for state in FINISHED}
        # arm values as the config has them ("2" -> 2)
        result = {"arm": {bare(k): yaml.safe_load(v) for k, v in arm.items()}, "study_name": name, "trials": counts,
                  "best_params": dict(best.params) if best else None, "best_value": best.value if best else None,
                  "best_run": best.user_attrs.get("run") if best else None,
                  "best_overrides": [*overrides, *(f"{k}={v}" for k, v in best.params.items())] if best else None}
        if best:
            log.info("%s: best %.4f with %s (%s)", name, best.value, best.params, result["best_run"])
        else:
            log.warning("%s: no trial completed (%s)", name, counts)
        return result
