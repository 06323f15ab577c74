"""`hydra.sweeper._target_` of `hparams_search=...`: one Optuna study per arm (see gpt_lightning/training/per_arm_sweeper.py).

Hydra imports every module under `hydra_plugins` at start-up, for every command, so this one imports only Hydra;
optuna and the hydra-optuna-sweeper package are imported when a search starts.
"""

from __future__ import annotations

from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PerArmOptunaSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from gpt_lightning.common.cli import exits_on_user_error

        with exits_on_user_error():  # without the [search] extra: one line with the pip command
            from gpt_lightning.training.per_arm_sweeper import PerArmSearch

            self.sweeper = PerArmSearch(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        from gpt_lightning.common.cli import exits_on_user_error

        with exits_on_user_error():
            return self.sweeper.sweep(arguments)
