"""`compare` on synthetic run folders (a Hydra config + a run record each, no training): arms, intervals, Welch
tests against the baseline, report sentences, plots and bad input."""

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from gpt_lightning.analysis.plots import band
from gpt_lightning.analysis.report import compare
from gpt_lightning.analysis.stats import compare_means, describe, runs_needed
from gpt_lightning.common.errors import UserError
from gpt_lightning.compare import main as compare_main
from gpt_lightning.model import kv_cache_bytes_per_token
from gpt_lightning.training.run_record import RunRecord

HEADS, LAYERS, EMBD = 4, 2, 64


def make_run(root: Path, name: str, kv_groups: int, seed: int, test_bpb: float | None = 2.0, *, lr: float = 1e-3,
             record: bool = True, curve: list[float] | None = None, uptrain: dict | None = None,
             init_from: str | None = None, params: int | None = None) -> Path:
    """A run folder as train leaves it: .hydra/config.yaml (unresolved, as Hydra saves it) and summary.json."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {
        "data": {"encoding": "gpt2", "split_seed": 42, "seed": "${seed}", "block_size": "${model.block_size}"},
        "model": {"n_heads": HEADS, "n_layer": LAYERS, "n_embd": EMBD, "block_size": 32, "match_params": False},
        "attention": {"type": "gqa", "n_heads": "${model.n_heads}", "kv_groups": kv_groups},
        "optim": {"lr": lr},
        "callbacks": {"model_checkpoint": {"dirpath": "${hydra:runtime.output_dir}/checkpoints"}},
        "logger": {"tensorboard": {"save_dir": "${hydra:runtime.output_dir}"}},
        "seed": seed, "ckpt_path": None, "init_from": init_from,
        "uptrain": {"method": "mean", "alpha": None, "optim": None, "parent": None, **(uptrain or {})},
    }
    OmegaConf.save(OmegaConf.create(config), run / ".hydra" / "config.yaml")
    if record:
        loss = 3.0 + (test_bpb or 2.0) / 10
        RunRecord(kind="train", n_layer=LAYERS, n_embd=EMBD, n_head=HEADS, kv_groups=kv_groups, mlp_hidden=4 * EMBD,
                  parameters=params or 100_000 + 1000 * kv_groups, global_step=20,
                  kv_cache_bytes_per_token=kv_cache_bytes_per_token(LAYERS, kv_groups, EMBD // HEADS),
                  kv_cache_bytes_per_token_mha=kv_cache_bytes_per_token(LAYERS, HEADS, EMBD // HEADS),
                  best_val_loss=loss - 0.01, test_loss=loss, test_ppl=math.exp(loss), test_bpb=test_bpb,
                  train_tokens_per_sec=1000.0 + seed, decode_tokens_per_sec=200.0 + 10 * kv_groups + seed,
                  ).save(run / "summary.json")
    if curve:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run / "tb")) as w:
            for step, value in enumerate(curve):
                w.add_scalar("val/loss", value, (step + 1) * 10)
    return run


MHA_BPB, MQA_BPB, GQA_BPB = [2.00, 2.02, 2.01], [2.10, 2.13, 2.11], [2.00, 2.03, 1.99]


@pytest.fixture
def sweep(tmp_path):
    """kv_groups 1, 2 and 4 (MHA) on three seeds: MQA clearly worse in bpb, GQA indistinguishable from MHA."""
    root = tmp_path / "sweep"
    job = 0
    for kv, values in ((1, MQA_BPB), (2, GQA_BPB), (4, MHA_BPB)):
        for seed, bpb in zip((1, 2, 3), values):
            make_run(root, f"{job}_kv{kv}_s{seed}", kv, seed, bpb, curve=[3.0 + 0.01 * seed, 2.5 + 0.01 * seed])
            job += 1
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def arms_by_label(root: Path) -> dict[str, dict]:
    return {r["arm"]: r for r in read_csv(root / "comparison.csv")}


def test_runs_differing_only_in_seed_form_one_arm(sweep):
    compare(sweep)
    arms = arms_by_label(sweep)
    assert list(arms) == ["kv_groups=1", "kv_groups=2", "kv_groups=4"]
    assert [(a["runs"], a["n"], a["attention"]) for a in arms.values()] == [("3", "3", "mqa"), ("3", "3", "gqa"),
                                                                           ("3", "3", "mha")]
    assert arms["kv_groups=4"]["baseline"] == "True"  # the default baseline: kv_groups = n_heads
    runs = read_csv(sweep / "runs.csv")
    assert len(runs) == 9 and {r["arm"] for r in runs if r["run"].startswith("0_")} == {"kv_groups=1"}


def test_a_run_differing_in_seed_and_another_setting_is_another_arm(sweep):
    make_run(sweep, "9_kv1_s1_lr", 1, 1, 2.2, lr=3e-3)
    make_run(sweep, "10_kv1_s2_lr", 1, 2, 2.3, lr=3e-3)
    compare(sweep)
    arms = arms_by_label(sweep)
    assert {"kv_groups=1, optim.lr=0.001", "kv_groups=1, optim.lr=0.003"} <= set(arms)
    assert arms["kv_groups=1, optim.lr=0.003"]["n"] == "2" and arms["kv_groups=1, optim.lr=0.001"]["n"] == "3"


def test_arm_statistics_are_describe_and_welch_on_the_seeds(sweep):
    compare(sweep)
    mqa = arms_by_label(sweep)["kv_groups=1"]
    s, d = describe(MQA_BPB), compare_means(MQA_BPB, MHA_BPB)
    assert float(mqa["test_bpb_mean"]) == pytest.approx(np.mean(MQA_BPB))
    assert float(mqa["test_bpb_std"]) == pytest.approx(np.std(MQA_BPB, ddof=1))
    assert (float(mqa["test_bpb_ci_low"]), float(mqa["test_bpb_ci_high"])) == pytest.approx((s.ci_low, s.ci_high))
    assert float(mqa["test_bpb_diff"]) == pytest.approx(np.mean(MQA_BPB) - np.mean(MHA_BPB))
    assert (float(mqa["test_bpb_diff_ci_low"]), float(mqa["test_bpb_diff_ci_high"])) == pytest.approx((d.ci_low, d.ci_high))
    assert float(mqa["test_bpb_p_value"]) == pytest.approx(scipy_stats.ttest_ind(MQA_BPB, MHA_BPB, equal_var=False).pvalue)
    assert arms_by_label(sweep)["kv_groups=4"]["test_bpb_diff"] == ""  # the baseline is not compared with itself


def test_comparison_md_shows_the_arm_table_first_then_the_runs(sweep):
    compare(sweep)
    md = (sweep / "comparison.md").read_text()
    assert md.index("## Arms") < md.index("## Against the baseline") < md.index("## Runs")
    arms_table = md[md.index("## Arms"):md.index("## Against")]
    assert arms_table.index("kv_groups=1 (MQA)") < arms_table.index("kv_groups=4 (MHA) (baseline)")
    header = arms_table.splitlines()[2]
    assert header.index("test bpb") < header.index("best val loss")  # bpb is the headline quality column
    assert f"{np.mean(MQA_BPB):.4f} ± {describe(MQA_BPB).half_width:.4f}" in arms_table
    assert "| 0_kv1_s1 | kv_groups=1 | 1 | complete |" in md


def test_report_states_a_detected_difference_with_its_interval_and_the_kv_cache_share(sweep):
    compare(sweep)
    report = (sweep / "report.md").read_text()
    d = compare_means(MQA_BPB, MHA_BPB)
    assert d.ci_low > 0  # the fixture's MQA difference is resolved at n = 3
    sentence = next(line for line in report.splitlines() if line.startswith("- kv_groups=1 (MQA)"))
    assert sentence.startswith(f"- kv_groups=1 (MQA): test bpb +{d.diff:.3f} ± ")
    assert "vs kv_groups=4 (MHA)" in sentence and "n = 3 each" in sentence
    assert sentence.endswith("KV cache 1/4 of MHA's, parameters 0.97x")
    assert "resolved at n = 3 vs 3" in report


def test_report_says_no_difference_detected_and_how_many_seeds_would_resolve_it(sweep):
    compare(sweep)
    report = (sweep / "report.md").read_text()
    sentence = next(line for line in report.splitlines() if line.startswith("- kv_groups=2 (GQA)"))
    assert "no difference detected at n = 3 each" in sentence and "KV cache 1/2 of MHA's" in sentence
    gqa, mha = describe(GQA_BPB), describe(MHA_BPB)
    needed = runs_needed(gqa.std, mha.std, gqa.mean - mha.mean)
    take = report[report.index("## What it would take"):]
    assert f"kv_groups=2 (GQA): a true test bpb difference of" in take and f"**{needed} seeds per arm**" in take


def test_one_run_per_arm_reports_n_1_without_an_interval(tmp_path):
    root = tmp_path / "single"
    make_run(root, "0_kv1", 1, 1, 2.1)
    make_run(root, "1_kv4", 4, 1, 2.0)
    compare(root)
    arm = arms_by_label(root)["kv_groups=1"]
    assert arm["n"] == "1" and arm["test_bpb_mean"] == "2.1" and arm["test_bpb_ci_low"] == arm["test_bpb_std"] == ""
    assert arm["test_bpb_diff"] != "" and arm["test_bpb_p_value"] == ""
    report = (root / "report.md").read_text()
    assert "n = 1 each: no interval" in report and "a spread needs at least 2 runs per arm" in report
    assert "| kv_groups=1 (MQA) | 1 |" in (root / "comparison.md").read_text()


def test_a_run_without_bpb_shows_an_empty_cell_never_zero(sweep):
    make_run(sweep, "9_old_kv4", 4, 7, test_bpb=None)  # a record from before bits per byte
    compare(sweep)
    old = next(r for r in read_csv(sweep / "runs.csv") if r["run"] == "9_old_kv4")
    assert old["test_bpb"] == "" and old["best_val_loss"] != ""
    row = next(line for line in (sweep / "comparison.md").read_text().splitlines() if line.startswith("| 9_old_kv4"))
    assert row.split(" | ")[7] == ""  # the test bpb column
    mha = arms_by_label(sweep)["kv_groups=4"]
    assert (mha["runs"], mha["n"], mha["test_bpb_n"]) == ("4", "4", "3")  # not averaged in as 0
    assert float(mha["test_bpb_mean"]) == pytest.approx(np.mean(MHA_BPB))


def test_plots_have_error_bars_and_bands_and_report_links_every_png(sweep):
    c = compare(sweep)
    report = (sweep / "report.md").read_text()
    assert {"val_loss.png", "quality_vs_kv_cache.png", "decode_vs_kv_groups.png"} <= set(c.images)
    for name in c.images:
        assert (sweep / name).stat().st_size > 0 and f"![{name}]({name})" in report


def test_band_is_the_mean_and_std_of_the_arm_curves_at_each_step():
    steps, mean, std = band([[(10, 1.0), (20, 0.5)], [(10, 3.0), (20, 0.7)], [(10, 2.0)]])
    assert steps.tolist() == [10, 20]
    assert mean.tolist() == pytest.approx([2.0, 0.6]) and std.tolist() == pytest.approx([1.0, np.std([0.5, 0.7], ddof=1)])


def test_no_mha_arm_names_the_missing_baseline_and_the_arms_found(tmp_path, capsys):
    root = tmp_path / "gqa_only"
    make_run(root, "0_kv1", 1, 1)
    make_run(root, "1_kv2", 2, 1)
    with pytest.raises(SystemExit) as exit:
        compare_main([str(root)])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no MHA arm (kv_groups = n_heads)")
    assert "'kv_groups=1' (mqa, 1 run); 'kv_groups=2' (gqa, 1 run)" in err and "--baseline" in err
    assert not (root / "comparison.md").exists() and not (root / "report.md").exists()  # refused before writing


def test_a_baseline_that_names_no_arm_lists_the_arms(sweep):
    with pytest.raises(UserError, match=r"--baseline 'kv_groups=3' names no arm.*'kv_groups=1'.*'kv_groups=2'.*"
                                        r"'kv_groups=4'"):
        compare(sweep, baseline="kv_groups=3")


def test_the_baseline_option_sets_every_arm_against_the_one_it_names(sweep):
    c = compare(sweep, baseline="kv_groups=2")
    assert c.baseline.label == "kv_groups=2"
    mha = arms_by_label(sweep)["kv_groups=4"]
    assert float(mha["test_bpb_diff"]) == pytest.approx(np.mean(MHA_BPB) - np.mean(GQA_BPB))
    assert "vs kv_groups=2 (GQA)" in (sweep / "report.md").read_text()


def test_a_conversion_study_draws_quality_against_alpha_with_the_parent_as_baseline(tmp_path):
    parent = make_run(tmp_path / "elsewhere", "mha_parent", 4, 1, 2.0)  # outside the compared folder
    ckpt = parent / "checkpoints" / "last.ckpt"
    root = tmp_path / "study"
    job = 0
    for method in ("mean", "first", "random", "scratch"):
        for alpha in (0, 0.05, 0.1):
            bpb = 2.0 + {"mean": 0.01, "first": 0.02, "random": 0.5, "scratch": 0.03}[method] * (1 - 5 * alpha)
            make_run(root, f"{job}_{method}_a{alpha}", 2, 1, bpb, uptrain={"method": method, "alpha": alpha},
                     init_from=str(ckpt))
            job += 1
    c = compare(root)
    assert c.baseline.label.startswith("kv_groups=4") and c.parents == [str(parent)]
    assert {"uptrain_alpha.png", "uptrain_methods.png"} <= set(c.images)
    arms = arms_by_label(root)
    first = "kv_groups=2, init_from=…/mha_parent/checkpoints/last.ckpt, alpha=0.05, method=first"
    assert len(arms) == 13 and arms[first]["uptrain_method"] == "first" and arms[first]["uptrain_alpha"] == "0.05"
    assert "![uptrain_alpha.png](uptrain_alpha.png)" in (root / "report.md").read_text()


def test_a_single_arm_is_described_without_a_baseline_to_beat(tmp_path):
    root = tmp_path / "one"
    make_run(root, "0_kv2_s1", 2, 1, 2.0)
    make_run(root, "1_kv2_s2", 2, 2, 2.1)
    c = compare(root)
    assert c.baseline.label == "all runs" and c.baseline.n == 2
    assert "Only one arm" in (root / "report.md").read_text()


def test_report_tracks_each_arms_val_loss_gap_over_training_with_its_interval(tmp_path):
    root = tmp_path / "sweep"
    mqa = {1: [3.00, 2.60], 2: [3.02, 2.63], 3: [3.01, 2.61]}  # the gap to MHA widens from ~0 to ~+0.1
    mha = {1: [3.00, 2.50], 2: [3.01, 2.52], 3: [3.02, 2.51]}
    for seed in (1, 2, 3):
        make_run(root, f"{seed}_kv1_s{seed}", 1, seed, 2.1, curve=mqa[seed])
        make_run(root, f"{seed + 3}_kv4_s{seed}", 4, seed, 2.0, curve=mha[seed])
    compare(root)
    report = (root / "report.md").read_text()
    table = report[report.index("### Val-loss gap over training"):report.index("## Plots")]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert list(rows) == ["10", "20"]
    for step, i in (("10", 0), ("20", 1)):
        d = compare_means([mqa[s][i] for s in (1, 2, 3)], [mha[s][i] for s in (1, 2, 3)])
        diff, half = (float(x) for x in rows[step].split(" ± "))
        assert diff == pytest.approx(d.diff, abs=1e-4) and half == pytest.approx(d.half_width, rel=1e-2)


# ------------------------------------------------------------------ the decode grid from `evaluate` records

def make_eval(run: Path, kv_groups: int, rates: dict[tuple[int, int], float], name: str = "last",
              budget_gb: float = 1.0, compute_bound: dict[tuple[int, int], float] | None = None) -> Path:
    """`evaluate ... decode.contexts=[...]`'s record beside the run's checkpoint: one grid row per (batch, context),
    with bytes read per step and a roofline as measure.decode_grid writes them: read-bound (1e10 B/s) unless the
    cell is in `compute_bound`, which gives its roofline tokens/s."""
    (run / "checkpoints").mkdir(exist_ok=True)
    rows = []
    for (b, L), rate in rates.items():
        read = 1_000_000 + b * L * 100 * kv_groups  # weights + every row's cache at L positions
        roof = (compute_bound or {}).get((b, L), b * 1e10 / read)
        rows.append({"kv_groups": kv_groups, "attention": "mha" if kv_groups == HEADS else "gqa", "batch": b,
                     "context": L, "tokens_per_sec": {"median": rate, "min": rate, "max": rate, "n": 3},
                     "bytes_read_per_step": read, "roofline_tokens_per_sec": roof,
                     "limited_by": "matmul" if (b, L) in (compute_bound or {}) else "read",
                     "fraction_of_roofline": rate / roof})
    budget = [{"kv_groups": kv_groups, "context": L, "budget_gb": budget_gb, "largest_batch": 1000 // kv_groups}
              for L in sorted({L for _, L in rates})]
    path = run / "checkpoints" / f"{name}.eval.json"
    details = {"decode_grid": rows, "decode_grid_budget": budget}
    RunRecord(kind="evaluate", kv_groups=kv_groups, details=details).save(path)
    return path


@pytest.fixture
def grid_sweep(sweep):
    """The sweep's runs with evaluate grids: MQA ~2x MHA at batch 8, context 64 (three seeds each), GQA ~1.3x; at
    batch 1 all alike. Batch 8, context 64 is bound by compute (roofline MQA 6000 tokens/s, MHA 4000). One GQA run
    has no record; one MQA run's grid is in best.eval.json, its last.eval.json unreadable."""
    runs = {p.name: p for p in sweep.iterdir()}
    speed = {1: 2.0, 2: 1.3, 4: 1.0}
    for name, run in runs.items():
        kv, seed = int(name.split("_kv")[1][0]), int(name[-1])
        if kv == 2 and seed == 3:
            continue
        make_eval(run, kv, {(1, 16): 400.0 + seed, (8, 16): 2000.0 * speed[kv] + 10 * seed,
                            (8, 64): 1500.0 * speed[kv] + 10 * seed}, name="best" if name == "0_kv1_s1" else "last",
                  compute_bound={(8, 64): {1: 6000.0, 2: 5000.0, 4: 4000.0}[kv]})
    (runs["0_kv1_s1"] / "checkpoints" / "last.eval.json").write_text("{not json")
    return sweep


def test_compare_reads_the_decode_grid_of_every_runs_evaluate_record(grid_sweep):
    c = compare(grid_sweep)
    by = {(r["kv_groups"], r["batch"], r["context"]): r for r in c.grid}
    assert set(by) == {(g, b, L) for g in (1, 2, 4) for b, L in ((1, 16), (8, 16), (8, 64))}
    mqa, mha, gqa = by[(1, 8, 64)], by[(4, 8, 64)], by[(2, 8, 64)]
    assert (mqa["n"], mha["n"], gqa["n"]) == (3, 3, 2)  # the GQA run without a record adds no figure
    s = describe([3010.0, 3020.0, 3030.0])
    assert mqa["tokens_per_sec_mean"] == pytest.approx(s.mean)
    assert mqa["tokens_per_sec_ci_low"] == pytest.approx(s.ci_low)
    assert mqa["speedup_vs_baseline"] == pytest.approx(3020.0 / 1520.0)
    d = compare_means([3010.0, 3020.0, 3030.0], [1510.0, 1520.0, 1530.0])
    assert (mqa["diff_ci_low"], mqa["diff_ci_high"]) == (pytest.approx(d.ci_low), pytest.approx(d.ci_high))
    assert mqa["bytes_read_bound"] == pytest.approx((1_000_000 + 8 * 64 * 400) / (1_000_000 + 8 * 64 * 100))
    assert mqa["roofline_ratio"] == pytest.approx(6000.0 / 4000.0) and mqa["limited_by"] == "matmul"
    assert by[(1, 8, 16)]["roofline_ratio"] == pytest.approx(by[(1, 8, 16)]["bytes_read_bound"])  # read-bound
    assert "speedup_vs_baseline" not in mha and mha["baseline"]
    # the unreadable record is named, and the run's grid still counts: it came from best.eval.json
    assert len(c.grid_notes) == 1 and "0_kv1_s1" in c.grid_notes[0] and "last.eval.json" in c.grid_notes[0]
    assert by[(1, 1, 16)]["n"] == 3


def test_compare_writes_the_grid_table_csv_plots_and_findings(grid_sweep):
    c = compare(grid_sweep)
    md = (grid_sweep / "comparison.md").read_text()
    assert "## Decode over batch × context" in md and "bytes-read bound" in md and "roofline ratio" in md
    assert md.index("## Decode over batch × context") < md.index("## Runs")
    assert "Not read: `0_kv1_s1` checkpoints/last.eval.json" in md
    rows = read_csv(grid_sweep / "decode_grid.csv")
    assert len(rows) == 9 and {r["batch"] for r in rows} == {"1", "8"}
    mqa = next(r for r in rows if (r["kv_groups"], r["batch"], r["context"]) == ("1", "8", "64"))
    assert float(mqa["speedup_vs_baseline"]) == pytest.approx(3020.0 / 1520.0)
    report = (grid_sweep / "report.md").read_text()
    section = report.split("## Decode over batch × context")[1].split("## Plots")[0]
    # at the largest batch of the longest context: MQA resolved faster, with its interval and both bounds
    line = next(x for x in section.splitlines() if x.startswith("- kv_groups=1"))
    assert "decodes 1.99× kv_groups=4 (MHA)'s tokens/s at batch 8, context 64" in line
    assert "bytes-read bound 1.15×" in line and "roofline ratio 1.50×" in line and "n = 3 vs 3" in line
    assert {"decode_grid_vs_kv_groups.png", "largest_batch_vs_kv_groups.png"} <= set(c.images)
    assert all((grid_sweep / name).stat().st_size > 1000 for name in c.images)
    assert "decode_vs_kv_groups.png" in c.images  # compare's own batch-1 plot is still there, not overwritten


def test_a_grid_difference_whose_interval_holds_zero_is_no_difference_detected(tmp_path):
    root = tmp_path / "s"
    for kv, rates in ((1, (990.0, 1030.0)), (4, (1000.0, 1010.0))):
        for seed, rate in zip((1, 2), rates):
            make_eval(make_run(root, f"kv{kv}_s{seed}", kv, seed), kv, {(4, 32): rate})
    report = (compare(root).out / "report.md").read_text()
    assert "kv_groups=1 (MQA): no decode-speed difference detected at batch 4, context 32" in report


def test_compare_without_any_evaluate_record_has_no_grid_section(sweep):
    c = compare(sweep)
    assert c.grid == [] and not (sweep / "decode_grid.csv").exists()
    assert "Decode over batch" not in (sweep / "comparison.md").read_text()
    assert "decode_grid_vs_kv_groups.png" not in c.images


def test_arms_sharing_a_kv_groups_get_the_grid_table_but_no_plot_against_kv_groups(tmp_path):
    root = tmp_path / "lr"
    for lr in (1e-3, 3e-3):
        for kv in (1, 4):
            make_eval(make_run(root, f"kv{kv}_lr{lr}", kv, 1, lr=lr), kv, {(2, 8): 100.0 * kv})
    c = compare(root)
    assert len(c.grid) == 4 and "decode_grid_vs_kv_groups.png" not in c.images


def test_bad_or_foreign_evaluate_records_cost_only_their_grid(tmp_path):
    root = tmp_path / "s"
    runs = {kv: make_run(root, f"kv{kv}", kv, 1) for kv in (1, 2, 4)}
    make_eval(runs[4], 4, {(2, 8): 100.0, (4, 8): 150.0})
    (runs[1] / "checkpoints").mkdir()
    (runs[1] / "checkpoints" / "last.eval.json").write_text('{"kind": "evaluate", "details": [1]}')
    RunRecord(kind="bench", details={"decode_grid": [{"kv_groups": 2, "batch": 2, "context": 8,
                                                      "tokens_per_sec": {"median": 50.0}}]}).save(
        (runs[2] / "checkpoints").mkdir() or runs[2] / "checkpoints" / "x.eval.json")
    c = compare(root)
    notes = " ".join(c.grid_notes)
    assert "kv1" in notes and "its details are not an object" in notes and "not an evaluate record" in notes
    assert {a.label: a.n for a in c.arms} == {"kv_groups=1": 1, "kv_groups=2": 1, "kv_groups=4": 1}  # all counted
    assert {r["kv_groups"] for r in c.grid} == {4}


def test_rows_of_another_model_duplicates_and_non_finite_speeds_are_skipped(tmp_path):
    root = tmp_path / "s"
    mha, mqa = make_run(root, "kv4", 4, 1), make_run(root, "kv1", 1, 1)
    make_eval(mha, 4, {(2, 8): 100.0, (4, 8): 200.0})
    path = make_eval(mqa, 1, {(2, 8): 150.0, (4, 8): 300.0})
    record = RunRecord.load(path)
    rows = record.details["decode_grid"]
    rows += [dict(rows[0], tokens_per_sec={"median": 999.0}),  # a duplicate cell: the first row counts
             dict(rows[0], kv_groups=4, tokens_per_sec={"median": 999.0}),  # another model's row (bench-style)
             dict(rows[0], context=16, tokens_per_sec={"median": float("nan")}),
             dict(rows[0], context=32, tokens_per_sec={"median": 0.0}),
             dict(rows[0], batch=float("inf"), context=64)]
    record.save(path)
    c = compare(root)
    assert {(r["kv_groups"], r["batch"], r["context"]) for r in c.grid} == {(4, 2, 8), (4, 4, 8), (1, 2, 8), (1, 4, 8)}
    cell = next(r for r in c.grid if (r["kv_groups"], r["batch"]) == (1, 2))
    assert cell["n"] == 1 and cell["tokens_per_sec_mean"] == 150.0 and cell["speedup_vs_baseline"] == 1.5
    report = (c.out / "report.md").read_text()
    assert "no interval: fewer than 2 runs on a side, or no spread" in report


# ------------------------------------------------------------------ repeated launches, bad --out, what is on disk

def test_a_seed_launched_twice_into_one_folder_counts_once_the_newest(tmp_path):
    root = tmp_path / "parent"
    old, new = {1: [2.10, 2.13, 2.11], 4: [2.00, 2.02, 2.01]}, {1: [2.11, 2.14, 2.12], 4: [2.00, 2.03, 2.01]}
    for launch, values, mtime in (("a", old, 1_000_000), ("b", new, 2_000_000)):
        for kv in (1, 4):
            for seed, bpb in zip((1, 2, 3), values[kv]):
                run = make_run(root / launch, f"kv{kv}_s{seed}", kv, seed, bpb)
                os.utime(run / "summary.json", (mtime, mtime))  # launch b finished later
    c = compare(root)
    arms = arms_by_label(root)
    assert [(a["runs"], a["n"], a["duplicate_seeds"]) for a in arms.values()] == [("3", "3", "3"), ("3", "3", "3")]
    assert float(arms["kv_groups=1"]["test_bpb_mean"]) == pytest.approx(np.mean(new[1]))  # the newer launch
    assert float(arms["kv_groups=1"]["test_bpb_diff_ci_low"]) == pytest.approx(compare_means(new[1], new[4]).ci_low)
    report = (root / "report.md").read_text()
    assert "Duplicate seed, not counted: `a/kv1_s2` (seed 2 of kv_groups=1 (MQA); counted instead: `b/kv1_s2`, finished later)" in report
    runs = {r["run"]: r for r in read_csv(root / "runs.csv")}
    assert runs["a/kv4_s1"]["status"] == "complete; duplicate seed, not counted (counted: b/kv4_s1)"
    assert runs["b/kv4_s1"]["status"] == "complete" and len(c.rows) == 12


def test_out_naming_an_existing_file_is_refused_in_one_line_before_any_work(sweep, tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    for out in (target, target / "sub"):
        with pytest.raises(SystemExit) as exit:
            compare_main([str(sweep), "--out", str(out)])
        assert exit.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {out}") and "pass --out a folder" in err
    assert target.read_text() == "keep me" and not (sweep / "comparison.md").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_compare_that_fails_while_building_the_report_leaves_the_folder_as_it_was(sweep, monkeypatch):
    compare(sweep)
    before = _snapshot(sweep)
    make_run(sweep, "9_kv4_s4", 4, 4, 2.05, curve=[3.0, 2.4])  # the next report would differ in every table

    def broken(c):
        raise RuntimeError("report_md failed")

    monkeypatch.setattr("gpt_lightning.analysis.report.report_md", broken)
    with pytest.raises(RuntimeError, match="report_md failed"):
        compare(sweep)
    after = {k: v for k, v in _snapshot(sweep).items() if not k.startswith("9_kv4_s4/")}
    assert after == before  # no plot, csv or md rewritten, no temporary left


def test_outputs_of_an_earlier_compare_that_this_one_did_not_produce_are_removed(grid_sweep):
    compare(grid_sweep)
    assert (grid_sweep / "decode_grid.csv").is_file() and (grid_sweep / "decode_grid_vs_kv_groups.png").is_file()
    (grid_sweep / "notes.png").write_bytes(b"mine")  # not a name compare writes: left alone
    for record in grid_sweep.glob("*/checkpoints/*.eval.json"):
        record.unlink()
    c = compare(grid_sweep)
    assert c.grid == [] and not (grid_sweep / "decode_grid.csv").exists()
    assert not (grid_sweep / "decode_grid_vs_kv_groups.png").exists()
    assert not (grid_sweep / "largest_batch_vs_kv_groups.png").exists()
    assert (grid_sweep / "notes.png").read_bytes() == b"mine" and (grid_sweep / "val_loss.png").is_file()
    assert not list(grid_sweep.glob(".compare-*"))


def test_a_file_of_a_compare_name_that_compare_did_not_write_is_left_alone(sweep):
    # bench writes largest_batch_vs_kv_groups.png into its own run folder; a compare there must not delete it
    (sweep / "largest_batch_vs_kv_groups.png").write_bytes(b"bench's")
    compare(sweep)  # no decode grid in this sweep: compare draws no grid plot
    compare(sweep)
    assert (sweep / "largest_batch_vs_kv_groups.png").read_bytes() == b"bench's"
    assert "comparison.md" in (sweep / ".compared-files").read_text().split()


def test_a_folder_compared_before_the_manifest_loses_its_stale_texts_but_not_grid_plots(grid_sweep):
    compare(grid_sweep)
    (grid_sweep / ".compared-files").unlink()  # as an older compare left it
    for record in grid_sweep.glob("*/checkpoints/*.eval.json"):
        record.unlink()
    compare(grid_sweep)
    assert not (grid_sweep / "decode_grid.csv").exists()  # stale: this compare has no grid
    assert (grid_sweep / "largest_batch_vs_kv_groups.png").is_file()  # could be bench's: kept
    assert "decode_grid.csv" not in (grid_sweep / ".compared-files").read_text().split()


def test_a_png_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    import matplotlib.figure

    from gpt_lightning.analysis import plots

    (tmp_path / "x.png").write_bytes(b"previous")

    def half_written(self, fname, **kwargs):
        (open(fname, "wb") if isinstance(fname, (str, Path)) else fname).write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plots._figure(tmp_path, "x.png", lambda ax: ax.plot([1, 2]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and (tmp_path / "x.png").read_bytes() == b"previous"


def test_uptrain_methods_y_limits_hold_every_error_bar():
    from gpt_lightning.analysis.arms import BY_KEY, Arm
    from gpt_lightning.analysis.plots import _pyplot, methods_by_alpha
    from gpt_lightning.analysis.stats import Summary

    metric = BY_KEY["test_bpb"]
    arms = []
    for method, alpha, mean, half in (("mean", 0.05, 2.00, 0.20), ("first", 0.05, 2.01, 0.02)):
        arm = Arm(f"{method}{alpha}", [{"run": method, "status": "complete", "uptrain_method": method,
                                         "uptrain_alpha": alpha}])
        arm.summaries = {metric.key: Summary(3, mean, half, mean - half, mean + half, half)}
        arms.append(arm)
    fig, ax = _pyplot().subplots()
    methods_by_alpha(ax, arms, metric)
    low, high = ax.get_ylim()
    _pyplot().close(fig)
    assert low < 2.00 - 0.20 and high > 2.00 + 0.20


def test_the_val_loss_gap_leaves_out_an_arm_without_curves_and_names_it(tmp_path):
    root = tmp_path / "sweep"
    for seed in (1, 2, 3):
        make_run(root, f"kv1_s{seed}", 1, seed, 2.1, curve=[3.0 + 0.01 * seed, 2.6 + 0.01 * seed])
        make_run(root, f"kv2_s{seed}", 2, seed, 2.05)  # no curves logged
        make_run(root, f"kv4_s{seed}", 4, seed, 2.0, curve=[3.0 + 0.02 * seed, 2.5 + 0.01 * seed])
    report = (compare(root).out / "report.md").read_text()
    table = report[report.index("### Val-loss gap over training"):report.index("## Plots")]
    assert "| step | kv_groups=1 (MQA) |" in table and "| 20 | +0.1000" in table
    assert "Left out (no val-loss curve in their finished runs): kv_groups=2 (GQA)." in table


def test_a_resumed_run_keeps_the_value_logged_last_at_a_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from gpt_lightning.analysis.runs import read_curves

    run = tmp_path / "run"
    # the resume (wall time 200) logged step 20 again, lower; its file may sort before or after the first one's
    for points in ([(10, 3.0, 100.0), (20, 2.5, 110.0)], [(20, 2.4, 200.0), (30, 2.2, 210.0)]):
        with SummaryWriter(str(run / "tb")) as w:
            for step, value, wall in points:
                w.add_scalar("val/loss", value, step, walltime=wall)
    scalars, source = read_curves(run)
    assert source == "tensorboard"
    assert scalars["val/loss"] == [(10, 3.0), (20, pytest.approx(2.4)), (30, pytest.approx(2.2))]
