"""Runs -> arms -> figures against a baseline arm: what `compare` reports, before any of it is formatted.

An arm is the set of runs whose resolved configs agree on everything but the seed and the output paths
(`analysis.stats.group_into_arms`); its seeds are repeated measurements of one setting. Only runs that finished
(status "complete") are measurements: a crashed or killed run is listed with its arm but adds no value. A seed
finished twice in one arm (a sweep launched again into the same parent folder) is one measurement: training is
deterministic per seed, so the copy adds no information; the newest is counted, the others are listed as duplicates.
A run without a readable `.hydra/config.yaml`, among runs that have one, joins no arm: it is listed, not counted.
The default baseline is the MHA arm (kv_groups = n_heads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from gpt_lightning.analysis.stats import Difference, Summary, compare_means, describe, group_into_arms
from gpt_lightning.common.errors import UserError


@dataclass(frozen=True)
class Metric:
    key: str        # the run row's / record's field
    name: str       # how a sentence names it
    unit: str = ""


# Quality first: bits per byte is the headline (comparable across tokenizers); loss per token after it.
METRICS = (
    Metric("test_bpb", "test bpb", "bits/byte"),
    Metric("best_val_loss", "best val loss", "nats/token"),
    Metric("test_loss", "test loss", "nats/token"),
    Metric("train_tokens_per_sec", "train tokens/s"),
    Metric("decode_tokens_per_sec", "decode tokens/s"),
)
BY_KEY = {m.key: m for m in METRICS}
# Figures that describe the arm's model rather than vary by seed: taken from its first run that has them.
SHAPE = ("attention", "n_head", "kv_groups", "n_layer", "n_embd", "mlp_hidden", "parameters",
         "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_mha", "uptrain_method", "uptrain_alpha")


def complete(row: dict) -> bool:
    return row.get("status") == "complete"


@dataclass
class Arm:
    label: str
    rows: list[dict]
    duplicates: list[dict] = field(default_factory=list)  # finished runs of a seed counted by a newer run
    summaries: dict[str, Summary] = field(default_factory=dict)
    diffs: dict[str, Difference] = field(default_factory=dict)   # vs the baseline; empty for the baseline
    is_baseline: bool = False

    @property
    def measured(self) -> list[dict]:
        return [r for r in self.rows if complete(r)]

    @property
    def n(self) -> int:
        return len(self.measured)

    def shape(self, key: str):
        for r in self.measured + self.rows:
            if r.get(key) is not None:
                return r[key]
        return None

    @property
    def is_mha(self) -> bool:
        heads, kv = self.shape("n_head"), self.shape("kv_groups")
        return heads is not None and heads == kv

    @property
    def name(self) -> str:
        """The label with the derived attention type, e.g. "kv_groups=1 (MQA)"."""
        att = self.shape("attention")
        return f"{self.label} ({att.upper()})" if att and att.lower() not in self.label.lower() else self.label

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.measured if r.get(key) is not None]


def _display(value, root: Path):
    """Absolute paths under the compared folder shown relative to it (labels stay short; still one-to-one)."""
    if isinstance(value, dict):
        return {k: _display(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_display(v, root) for v in value]
    if isinstance(value, str) and value.startswith(f"{root}/"):
        return value[len(str(root)) + 1:]
    return value


def _short_paths(paths: set[str]) -> dict[str, str]:
    """Absolute paths outside the folder as their shortest tails (3 parts or more) that still tell them apart."""
    for k in range(3, 1 + max((len(Path(p).parts) for p in paths), default=0)):
        short = {p: "…/" + "/".join(Path(p).parts[-k:]) if len(Path(p).parts) > k else p for p in paths}
        if len(set(short.values())) == len(paths):
            return short
    return {p: p for p in paths}


def _arm_config(config: dict, root: Path, short: dict[str, str]) -> dict:
    """What decides a run's arm, as labels show it: paths under the folder made relative, init_from checkpoints
    elsewhere shortened (one-to-one); `uptrain.parent` dropped (whether the parent was trained in the sweep or
    given, the arm trains from it); `uptrain.method` blanked where nothing is converted (no init_from, no study),
    so an MHA parent does not read as "method=mean"."""
    config = _display(config, root)
    if config.get("init_from") in short:
        config = {**config, "init_from": short[config["init_from"]]}
    uptrain = config.get("uptrain")
    if isinstance(uptrain, dict):
        uptrain = {k: v for k, v in uptrain.items() if k != "parent"}
        if uptrain.get("alpha") is None and not config.get("init_from"):
            uptrain["method"] = None
        config = {**config, "uptrain": uptrain}
    return config


def _fallback_config(row: dict) -> dict:
    """Runs without `.hydra/config.yaml` (copied records), when no run has one: grouped by the model shape their
    record states."""
    return {"record": {k: row.get(k) for k in ("n_layer", "n_embd", "n_head", "kv_groups", "mlp_hidden")}}


def one_per_seed(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, duplicates): of an arm's finished runs with the same seed, the newest (by when its record was
    written, then by name) is kept; the others are duplicates. Unfinished runs and runs without a seed are all
    kept (they are not counted anyway, or cannot be told apart). Input order is kept."""
    newest: dict = {}
    for r in rows:
        if complete(r) and r.get("seed") is not None:
            key = json.dumps(r["seed"], sort_keys=True, default=str)
            if key not in newest or _age(r) >= _age(newest[key]):
                newest[key] = r
    kept_ids = {id(r) for r in newest.values()}
    duplicate = [r for r in rows if complete(r) and r.get("seed") is not None and id(r) not in kept_ids]
    dup_ids = {id(r) for r in duplicate}
    for r in duplicate:
        r["duplicate_of"] = newest[json.dumps(r["seed"], sort_keys=True, default=str)]["run"]
    return [r for r in rows if id(r) not in dup_ids], duplicate


def _age(row: dict) -> tuple:
    return (row.get("finished_at") or 0.0, row["run"])


def group(rows: list[dict], root: Path) -> tuple[list[Arm], list[dict]]:
    """(arms, ungrouped): arms in label order (kv_groups numerically), each with its runs in input order, one
    finished run per seed (`one_per_seed`); ungrouped are the runs without a config when other runs have one:
    a config-less run would otherwise be an arm of its own, labelled by every key it lacks."""
    by_name = {r["run"]: r for r in rows}
    with_config = [r for r in rows if r.get("config")]
    ungrouped = [r for r in rows if not r.get("config")] if with_config else []
    grouped = with_config or rows
    elsewhere = {c["init_from"] for r in grouped if (c := r.get("config")) and isinstance(c.get("init_from"), str)
                 and c["init_from"].startswith("/") and not c["init_from"].startswith(f"{root}/")}
    short = _short_paths(elsewhere)
    configs = [(r["run"], _arm_config(r["config"], root, short) if r.get("config") else _fallback_config(r))
               for r in grouped]
    arms = []
    for label, names in group_into_arms(configs).items():
        kept, duplicates = one_per_seed([by_name[n] for n in names])
        arms.append(Arm(label, kept, duplicates))
    return arms, ungrouped


def _listing(arms: list[Arm]) -> str:
    return "; ".join(f"'{a.label}' ({a.shape('attention') or '?'}, {len(a.rows)} run{'s' * (len(a.rows) != 1)})"
                     for a in arms)


def pick_baseline(arms: list[Arm], wanted: str | None, root: Path) -> tuple[Arm, str]:
    """The baseline arm and a note on how it was chosen; a clear error when there is none to compare against."""
    if wanted is not None:
        matches = [a for a in arms if wanted in (a.label, a.name)]
        if not matches:
            raise UserError(f"--baseline {wanted!r} names no arm of the runs in {root}; the arms are: "
                            f"{_listing(arms)}")
        return matches[0], f"chosen with --baseline"
    if len(arms) == 1:  # nothing to set against each other: the tables and plots still describe it
        return arms[0], "the only arm"
    mha = [a for a in arms if a.is_mha]
    if not mha:
        raise UserError(f"no MHA arm (kv_groups = n_heads), the default baseline, among the runs in {root}; arms "
                        f"found: {_listing(arms)}. Pass --baseline LABEL with one of them (or add the MHA runs)")
    mha.sort(key=lambda a: -a.n)  # stable: the first MHA arm with the most finished runs
    note = "the MHA arm (kv_groups = n_heads)"
    if len(mha) > 1:
        note += f", the first of {len(mha)} MHA arms ({', '.join(repr(a.label) for a in mha)}); choose with --baseline"
    return mha[0], note


def measure(arms: list[Arm], baseline: Arm) -> None:
    """Fill every arm's per-metric summaries and, except the baseline's, its differences to the baseline."""
    for arm in arms:
        arm.is_baseline = arm is baseline
        arm.summaries = {m.key: describe(arm.values(m.key)) for m in METRICS}
        arm.diffs = ({} if arm is baseline else
                     {m.key: compare_means(arm.values(m.key), baseline.values(m.key)) for m in METRICS})


def headline(arms: list[Arm]) -> Metric:
    """Test bpb when any finished run has it; best val loss for runs from before bpb was recorded."""
    return BY_KEY["test_bpb"] if any(a.values("test_bpb") for a in arms) else BY_KEY["best_val_loss"]


def kv_cache_share(arm: Arm, baseline: Arm) -> str | None:
    """e.g. "KV cache 1/8 of MHA's": the ratio of KV-cache bytes per token, as the fraction it is."""
    a, b = arm.shape("kv_cache_bytes_per_token"), baseline.shape("kv_cache_bytes_per_token")
    if not a or not b:
        return None
    whose = "MHA's" if baseline.is_mha else f"{baseline.label}'s"
    ratio = Fraction(a, b)
    return f"KV cache the same as {whose}" if ratio == 1 else f"KV cache {ratio} of {whose}"


def parameter_share(arm: Arm, baseline: Arm) -> str | None:
    """e.g. "parameters 0.86x" (or "parameters matched (MLP 1,152)" within 0.5%)."""
    a, b = arm.shape("parameters"), baseline.shape("parameters")
    if not a or not b:
        return None
    mlp = arm.shape("mlp_hidden")
    widened = mlp and arm.shape("n_embd") and mlp != 4 * arm.shape("n_embd")
    if abs(a / b - 1) <= 0.005:
        return "parameters matched" + (f" (MLP {mlp:,})" if widened else "")
    return f"parameters {a / b:.2f}x"
