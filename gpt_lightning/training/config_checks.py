"""Every range and consistency rule of a composed config, in one place, one `error:` line each.

Types are Hydra's job (`schema.py`: `optim.lr=abc` never composes). What a type cannot say is checked here, before
any download, model or Trainer is built: `train` calls `check_config` first, and a multirun checks every job's
config with it before the first job starts (`sweep.py`). `bench` adds `check_bench`.
"""

from __future__ import annotations

import inspect
from typing import get_args

from omegaconf import OmegaConf

from gpt_lightning.common.device import resolve_precision, uses_cuda
from gpt_lightning.common.errors import UserError
from gpt_lightning.data.fetch import check_http
from gpt_lightning.model import GPTConfig
from gpt_lightning.training.memory_check import check_memory
from gpt_lightning.training.model_config import gpt_config_from_cfg
from gpt_lightning.training.schema import check_known_keys

# Set by train.py from other groups: a `trainer.` key of the same name would clash.
TRAINER_ARGS_SET_BY_TRAIN = ("callbacks", "logger", "plugins", "default_root_dir")


def lightning_precisions() -> list[str]:
    """What lightning.Trainer(precision=...) accepts, as strings (Lightning's own list), plus our `auto`."""
    try:
        from lightning.fabric.plugins.precision.precision import (_PRECISION_INPUT_INT, _PRECISION_INPUT_STR,
                                                                  _PRECISION_INPUT_STR_ALIAS)
        accepted = [*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS),
                    *map(str, get_args(_PRECISION_INPUT_INT))]
    except ImportError:  # Lightning moved its private list: the documented values
        accepted = ["16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16"]
    return ["auto", *dict.fromkeys(accepted)]


def _at_least(key: str, value, low, what: str = "") -> None:
    if value is None or value < low:
        raise UserError(f"{key}={value} must be >= {low}{what}")


def check_data(d, model_block_size: int) -> None:
    _at_least("data.batch_size", d.batch_size, 1, " (windows per batch)")
    _at_least("data.num_workers", d.num_workers, 0, " (0 loads batches in the training process)")
    _at_least("data.retries", d.retries, 0)
    _at_least("data.backoff_factor", d.backoff_factor, 0)
    _at_least("data.pause", d.pause, 0)
    # one number for both or [connect, read]: the schema types it Any, the fetcher's own rule checks it
    check_http(OmegaConf.to_container(d.timeout) if OmegaConf.is_config(d.timeout) else d.timeout,
               d.retries, d.backoff_factor, d.pause)
    if d.block_size != model_block_size:
        raise UserError(f"data.block_size={d.block_size} differs from model.block_size={model_block_size}: the "
                        f"windows are the model's context; drop data.block_size (it follows model.block_size) "
                        f"or set model.block_size={d.block_size}")


def check_optim(o) -> None:
    if o.lr is None or o.lr <= 0:
        raise UserError(f"optim.lr={o.lr} must be > 0")
    _at_least("optim.min_lr", o.min_lr, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    betas = list(o.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")


def check_trainer(t: dict) -> None:
    """Names, step counts, precision and devices of the `trainer` group (passed to lightning.Trainer)."""
    import lightning as L
    import torch

    accepted = set(inspect.signature(L.Trainer).parameters) - set(TRAINER_ARGS_SET_BY_TRAIN)
    for key in t:
        if key in TRAINER_ARGS_SET_BY_TRAIN:
            raise UserError(f"trainer.{key} is set by train.py from the {key} group; remove trainer.{key}")
        if key not in accepted:
            raise UserError(f"trainer.{key} is not an argument of lightning.Trainer; check the spelling "
                            f"(any lightning.Trainer argument may be set under trainer.)")
    max_steps, max_epochs = t.get("max_steps", -1), t.get("max_epochs")
    if not isinstance(max_steps, int) or (max_steps != -1 and max_steps < 1):
        raise UserError(f"trainer.max_steps={max_steps} must be >= 1 optimizer steps (or -1 to stop on "
                        f"trainer.max_epochs)")
    if max_epochs is not None and (not isinstance(max_epochs, int) or (max_epochs != -1 and max_epochs < 1)):
        raise UserError(f"trainer.max_epochs={max_epochs} must be >= 1, -1 or null")
    if max_steps == -1 and (max_epochs is None or max_epochs == -1):
        raise UserError("trainer.max_steps=-1 with trainer.max_epochs=-1 never ends, and the learning-rate schedule "
                        "spans the run: set trainer.max_steps (e.g. 3000) or trainer.max_epochs")
    # Lightning divides by these only once training runs (a ZeroDivisionError after the corpus was prepared)
    accumulate = t.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise UserError(f"trainer.accumulate_grad_batches={accumulate} must be an integer >= 1 (batches per "
                        f"optimizer step)")
    interval = t.get("val_check_interval")
    if isinstance(interval, (str, dict)):  # a wall-clock interval: "DD:HH:MM:SS", or a dict of timedelta's keys
        check_duration("trainer.val_check_interval", interval)
    elif interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                   or interval <= 0):
        raise UserError(f"trainer.val_check_interval={interval} must be > 0: an integer number of batches, a fraction "
                        f"of an epoch (0.25), a duration ('00:00:10:00', DD:HH:MM:SS), or null")
    precisions = lightning_precisions()
    if str(t.get("precision", "auto")) not in precisions:
        raise UserError(f"trainer.precision={t.get('precision')!r} is not a Lightning precision; use one of "
                        f"{', '.join(precisions)}")
    accelerator, devices = str(t.get("accelerator", "auto")), t.get("devices", 1)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; "
                        f"use trainer.accelerator=cpu (or auto)")
    if isinstance(devices, int) and uses_cuda(accelerator) and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible; "
                        f"use trainer.devices={torch.cuda.device_count()} or trainer.devices=auto")


def _missing(node, prefix: str = "") -> list[str]:
    """Keys whose value is Hydra's `???` (found without resolving any interpolation)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((f"[{i}]", v) for i, v in enumerate(node))
    else:
        return [prefix.rstrip(".")] if node == "???" else []
    return [k for key, value in items if not (prefix == "" and key == "hydra")
            for k in _missing(value, f"{prefix}{key}." if not str(key).startswith("[") else f"{prefix[:-1]}{key}.")]


def check_config(cfg) -> GPTConfig:
    """Check a composed train/prepare/bench config; return the model shape it describes. Raises UserError."""
    from gpt_lightning.data.tokens import get_encoding

    check_known_keys(cfg)  # `+foo=1`: Hydra's `+` adds keys past the schema
    missing = _missing(OmegaConf.to_container(cfg, resolve=False))
    if missing:  # `???` in a preset, e.g. experiment=uptrain_gqa's init_from
        raise UserError(f"{', '.join(missing)} must be set (the config leaves {'them' if len(missing) > 1 else 'it'} "
                        f"as ???): add {' '.join(f'{k}=...' for k in missing)}")
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise UserError(f"seed={seed} must be an integer in [0, 2**32 - 1] (what numpy and Lightning seed with)")
    check_data(cfg.data, cfg.model.block_size)
    check_optim(cfg.optim)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer(trainer)
    config = gpt_config_from_cfg(cfg, get_encoding(cfg.data.encoding).n_vocab)  # attention and shape rules
    accelerator = str(trainer.get("accelerator", "auto"))
    precision = resolve_precision(trainer.get("precision", "auto"), accelerator)
    devices = trainer.get("devices", 1)
    check_memory(config, cfg.data.batch_size, precision, cuda=uses_cuda(accelerator),
                 processes=devices if isinstance(devices, int) and devices > 0 else 1)
    return config


def check_bench(b) -> None:
    """`bench.*`: a timed round needs steps to time (bench.steps=0 recorded 0 tokens/s)."""
    _at_least("bench.steps", b.steps, 1, " (timed training steps per round)")
    _at_least("bench.warmup_steps", b.warmup_steps, 0)
    _at_least("bench.repeats", b.repeats, 1)
    _at_least("bench.memory_repeats", b.memory_repeats, 1)
    _at_least("bench.decode_prompt_tokens", b.decode_prompt_tokens, 1)
    _at_least("bench.decode_new_tokens", b.decode_new_tokens, 1)
    if not b.decode_batch_sizes or min(b.decode_batch_sizes) < 1:
        raise UserError(f"bench.decode_batch_sizes={list(b.decode_batch_sizes)} must be a non-empty list of "
                        f"batch sizes >= 1")


def check_duration(name: str, value) -> float:
    """Seconds of a Lightning time interval ("DD:HH:MM:SS", or a dict of `datetime.timedelta`'s keys), parsed as
    Lightning will parse it; an unparsable one, or one of 0 s or less (validation after every step), is one line."""
    from lightning.pytorch.trainer.setup import _parse_time_interval_seconds  # Lightning's own parser (private)

    shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    try:
        seconds = _parse_time_interval_seconds(dict(value) if not isinstance(value, str) else value)
    except Exception as e:  # MisconfigurationException, or timedelta's TypeError on an unknown key
        reason = " ".join(str(e).split()).rstrip(".")
        raise UserError(f"{name}={shown!r} is not a duration ({reason}): use 'DD:HH:MM:SS' ('00:00:10:00' for "
                        f"10 minutes) or a dict of timedelta keys ({{minutes:10}})") from None
    if seconds <= 0:
        raise UserError(f"{name}={shown!r} is {seconds:g} s: a duration must be > 0 (e.g. '00:00:10:00')")
    return seconds
