"""The types of every config key: Hydra structured configs (dataclasses in Hydra's ConfigStore).

Each primary config names its schema first in its defaults list (`conf/config.yaml`: `train_schema`;
`bench.yaml`: `bench_schema`; `evaluate.yaml`, `generate.yaml`, `export.yaml`: theirs), so Hydra itself refuses, before any work,
a value of the wrong type (`optim.lr=abc`, `seed=abc`) and a key the schema does not have (`+foo=1`,
`model.typo=1`, `+model.typo=1`). The values (the defaults) stay in the YAML files: a field here is `MISSING`
unless the YAML may leave it out. Ranges and agreements between keys (batch_size >= 1, kv_groups divides
n_heads, data.block_size = model.block_size, ...) are not types: they live in `config_checks.check_config`.

How to add a key (e.g. `model.match_params`):
  1. add the field, with its type, to the group's dataclass below (`ModelConfig.match_params: bool = MISSING`);
  2. give it its default in the group's YAML file (`conf/model/*.yaml`), or a default here if the YAML may omit it;
  3. a range or consistency rule goes into `config_checks.check_config`; 4. document it in README's config reference.
A new group (e.g. `hparams_search`) gets its own dataclass and a field in `TrainConfig`. `trainer`, `callbacks` and
`logger` stay open (see `TrainerConfig`, `TrainConfig`): a key added there needs no schema change.

Importing this module registers the schemas (idempotent); every entry point and `model_config` import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class DataConfig:  # conf/data/*.yaml -> gpt_lightning.data.MachadoDataModule(**data)
    _target_: str = "gpt_lightning.data.MachadoDataModule"
    books: List[int] = MISSING
    base_url: str = MISSING
    root: str = MISSING
    encoding: str = MISSING
    split: str = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    split_seed: int = MISSING
    min_paragraph_chars: int = MISSING
    block_size: int = MISSING           # ${model.block_size}: the windows are the model's context
    train_stride: Optional[int] = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    seed: Optional[int] = MISSING
    timeout: Any = MISSING              # [connect, read] seconds, or one number for both (Any: a union of
                                        # a number and a list is no OmegaConf type; check_data checks it)
    retries: int = MISSING
    backoff_factor: float = MISSING
    pause: float = MISSING


@dataclass
class ModelConfig:  # conf/model/*.yaml
    n_heads: int = MISSING              # the shape's head count; attention.n_heads follows it
    n_layer: int = MISSING
    n_embd: int = MISSING
    block_size: int = MISSING
    dropout: float = MISSING
    bias: bool = MISSING
    compile: bool = MISSING
    match_params: bool = False          # widen a GQA/MQA model's MLP to MHA's parameter count


@dataclass
class AttentionConfig:  # conf/attention/{mha,gqa,mqa}.yaml
    type: str = MISSING
    n_heads: int = MISSING
    kv_groups: int = MISSING


@dataclass
class OptimConfig:  # conf/optim/adamw.yaml
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    warmup_steps: int = MISSING
    min_lr: float = MISSING


@dataclass
class TrainerConfig:  # conf/trainer/*.yaml -> lightning.Trainer(**trainer)
    """The Trainer arguments our presets set, typed. The node is left open (struct off, see `_open`): any other
    `lightning.Trainer` argument may be added (`trainer.accumulate_grad_batches=4`), and `check_config` refuses a
    name that `lightning.Trainer` does not take. Values Lightning accepts in several types are `Any` here and
    checked in `check_config` (precision) or by Lightning."""
    accelerator: str = MISSING
    num_nodes: int = MISSING
    devices: Any = MISSING              # 1, "auto", [0, 1]
    precision: Any = MISSING            # "auto", "bf16-mixed", 32, ...
    max_steps: int = MISSING
    max_epochs: Optional[int] = MISSING
    val_check_interval: Any = MISSING   # steps (int), a fraction of an epoch (float), or a duration (str, dict)
    check_val_every_n_epoch: Optional[int] = MISSING
    limit_val_batches: Any = MISSING    # batches (int) or a fraction (float)
    limit_test_batches: Any = MISSING
    gradient_clip_val: Optional[float] = MISSING
    log_every_n_steps: int = MISSING
    num_sanity_val_steps: int = MISSING
    deterministic: Any = MISSING        # true, false or "warn"
    use_distributed_sampler: bool = MISSING


@dataclass
class SweepConfig:
    skip_invalid: bool = False          # multirun: run the valid jobs when some are invalid (default: run none)


@dataclass
class UptrainConfig:  # conf/config.yaml `uptrain:`; the conversion study (training/uptrain.py checks the values)
    method: str = "mean"                # mean | first | random (scratch: a study arm trained from scratch)
    alpha: Optional[float] = None       # train alpha x the parent's steps; 0: evaluate the converted model only
    optim: Any = None                   # a mapping of optim keys laid over optim.* when starting from init_from
                                        # weights (Any: OmegaConf cannot override an Optional[Dict] that is null)
    parent: Optional[str] = None        # "train": train the MHA parent first, once per sweep
    needs_init_from: bool = False       # set by presets that convert a checkpoint (uptrain_gqa): refuse without one


@dataclass
class TrainConfig:  # conf/config.yaml (train, prepare; bench adds `bench`)
    seed: int = MISSING
    ckpt_path: Optional[str] = None
    init_from: Optional[str] = None
    uptrain: UptrainConfig = field(default_factory=UptrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # a node, so `_open` can open it
    # Each entry is `_target_` plus that class's arguments, and a user may swap the class: a schema would forbid
    # that. hydra.utils.instantiate refuses an unknown argument before any work (train.py says which entry).
    callbacks: Dict[str, Any] = MISSING
    logger: Dict[str, Any] = MISSING


@dataclass
class BenchSection:  # conf/bench.yaml
    steps: int = MISSING
    warmup_steps: int = MISSING
    repeats: int = MISSING
    hf: bool = MISSING
    naive: bool = MISSING
    compile: bool = MISSING
    lightning: bool = MISSING
    decode_batch_sizes: List[int] = MISSING
    decode_prompt_tokens: int = MISSING
    decode_new_tokens: int = MISSING
    decode_bf16: bool = MISSING
    train: bool = MISSING
    unfused_head: bool = MISSING
    peak_memory: bool = MISSING
    memory_repeats: int = MISSING
    profile: bool = MISSING
    decode_grid: bool = MISSING
    decode_linears: bool = MISSING
    kv_groups: Optional[List[int]] = MISSING
    grid_batch_sizes: List[int] = MISSING
    grid_contexts: List[int] = MISSING
    grid_new_tokens: int = MISSING
    memory_budget_gb: float = MISSING
    plots: bool = MISSING
    threads: Optional[int] = MISSING
    cuda_graph: bool = MISSING
    json: str = MISSING


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSection = MISSING


@dataclass
class DecodeSection:  # conf/evaluate.yaml
    prompt_tokens: int = MISSING
    new_tokens: int = MISSING
    batch_sizes: List[int] = MISSING
    repeats: int = MISSING
    contexts: Optional[List[int]] = None
    grid_new_tokens: int = 32
    memory_budget_gb: float = 1.0
    cuda_graph: bool = True


@dataclass
class EvaluateData:
    """evaluate's data overrides: null keeps the checkpoint's setting (block_size and encoding are the model's)."""
    root: Optional[str] = None
    base_url: Optional[str] = None
    books: Optional[List[int]] = None
    split: Optional[str] = None
    val_fraction: Optional[float] = None
    test_fraction: Optional[float] = None
    split_seed: Optional[int] = None
    min_paragraph_chars: Optional[int] = None
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    timeout: Any = None                 # [connect, read] or one number (the datamodule checks it)
    retries: Optional[int] = None
    backoff_factor: Optional[float] = None
    pause: Optional[float] = None


@dataclass
class EvaluateConfig:
    ckpt_path: Optional[str] = None
    device: str = MISSING
    decode: DecodeSection = MISSING
    data: EvaluateData = field(default_factory=EvaluateData)


@dataclass
class GenerateConfig:
    ckpt_path: Optional[str] = None
    prompt: str = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: Optional[int] = MISSING
    top_p: Optional[float] = MISSING
    seed: Optional[int] = MISSING
    device: str = MISSING
    cuda_graph: bool = MISSING


@dataclass
class ExportConfig:  # conf/export.yaml
    ckpt_path: Optional[str] = None
    out: Optional[str] = None
    overwrite: bool = MISSING           # a bool, so overwrite=no / 'false' is False (a string would be truthy)
    architecture: str = MISSING         # auto | gpt2 | gpt_bigcode (model/export.py checks the name)


OPEN = (TrainerConfig,)  # nodes that take keys the schema does not list (checked elsewhere: check_config)


def unknown_keys(cfg) -> list[str]:
    """Keys in `cfg` that its schema does not have. Hydra's `+key=value` adds a key past any schema (it composes
    with force_add), so `+foo=1` and `+model.typo=1` are caught here, by `check_config`, before any work."""
    found: list[str] = []

    def walk(node, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema) or schema in OPEN:
            return
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in fields:
                if not (prefix == "" and key == "hydra"):
                    found.append(f"{prefix}{key}")
            elif not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
                walk(node[key], f"{prefix}{key}.")

    walk(cfg, "")
    return found


def check_known_keys(cfg) -> None:
    """One error line naming every key the schema does not have (`+foo=1`, `+model.typo=1`)."""
    from gpt_lightning.common.errors import UserError

    unknown = unknown_keys(cfg)
    if unknown:
        raise UserError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in the "
                        f"schema (gpt_lightning/training/schema.py); check the spelling")


def _open(schema: type, *paths: str):
    """The schema as a config node, with the nodes at `paths` left open to keys the schema does not list."""
    node = OmegaConf.structured(schema)
    for path in paths:
        OmegaConf.set_struct(OmegaConf.select(node, path), False)
    return node


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=_open(TrainConfig, "trainer"))
    cs.store(name="bench_schema", node=_open(BenchConfig, "trainer"))
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)


register()
