"""Lightning's own loggers from the `logger` config group: one or several (`logger=[tensorboard,csv]`), each written
inside the run directory. A logger whose package is an optional extra says which pip command installs it."""

from __future__ import annotations

import importlib.util

from hydra.utils import instantiate

from gpt_lightning.common.errors import UserError

# Lightning logger class -> (the package it imports, what to install)
OPTIONAL = {"WandbLogger": ("wandb", 'pip install -e ".[wandb]" (or pip install wandb)'),
            "MLFlowLogger": ("mlflow", "pip install mlflow"),
            "CometLogger": ("comet_ml", "pip install comet-ml"),
            "NeptuneLogger": ("neptune", "pip install neptune")}


def build_loggers(node) -> list:
    """Instantiate every logger under `cfg.logger` (None entries skipped), checking optional packages first."""
    loggers = []
    for name, conf in (node or {}).items():
        if conf is None:
            continue
        cls = str(conf.get("_target_", "")).rsplit(".", 1)[-1]
        if cls in OPTIONAL:
            package, install = OPTIONAL[cls]
            if importlib.util.find_spec(package) is None:
                raise UserError(f"logger={name} needs the {package} package, which is not installed: {install}")
        loggers.append(instantiate(conf))
    return loggers
