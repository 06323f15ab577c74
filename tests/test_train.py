"""`python -m gpt_lightning.train` end to end, as a user runs it: subprocesses against a loopback-served corpus."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_train as train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_lightning.training.run_record import RunRecord

pytestmark = pytest.mark.slow  # subprocess runs of the real entry points


def events(run_dir: Path) -> tuple[set[str], set[str]]:
    scalars, tensors = set(), set()
    for f in (run_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        tensors |= set(acc.Tags()["tensors"])
    return scalars, tensors


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("launch")
    result = train(corpus, cwd, "hydra.run.dir=run", "callbacks.throughput.window_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run", result


def test_twenty_steps_write_checkpoints_and_tensorboard(first_run):
    run_dir, result = first_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert global_step(run_dir / "checkpoints" / "best-step=20.ckpt") == 20
    scalars, tensors = events(run_dir)
    assert {"train/loss", "val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb", "train/tokens"} <= scalars
    assert any(t.startswith("lr-") for t in scalars)
    assert {"train/device/items_per_sec", "train/device/mfu"} <= scalars  # tokens/s, MFU vs the measured CPU peak
    assert "samples/text_summary" in tensors
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"checkpoints: {run_dir.resolve() / 'checkpoints'}" in result.stderr + result.stdout


def test_samples_are_logged_to_the_console(first_run):
    _, result = first_run
    assert "samples at step 10:" in result.stderr + result.stdout
    assert "> Capítulo I" in result.stderr + result.stdout


def test_ckpt_path_last_continues_from_the_saved_step(first_run, corpus):
    run_dir, _ = first_run
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 20
    result = train(corpus, run_dir.parent, f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=30")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in result.stderr + result.stdout
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 30


def test_init_from_an_mha_checkpoint_pools_it_into_gqa(corpus, tmp_path):
    mha = train(corpus, tmp_path, "hydra.run.dir=mha", "attention=mha", "trainer.max_steps=10")
    assert mha.returncode == 0, mha.stderr[-3000:]
    ckpt = tmp_path / "mha" / "checkpoints" / "last.ckpt"
    gqa = train(corpus, tmp_path, "hydra.run.dir=gqa", "attention=gqa", "attention.kv_groups=1",
                f"init_from={ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert gqa.returncode == 0, gqa.stderr[-3000:]
    state = torch.load(tmp_path / "gqa" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["model"]["n_kv_groups"] == 1
    assert state["state_dict"]["model.transformer.h.0.attn.c_attn.weight"].shape == (64 + 2 * 16, 64)


@pytest.fixture(scope="module")
def sweep(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep_launch")
    result = train(corpus, cwd, "attention=gqa", "attention.kv_groups=1,2", "trainer.max_steps=4",
                   "trainer.val_check_interval=2", "hydra.sweep.dir=sweep", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "sweep"


def test_multirun_sweeps_kv_groups_into_separate_directories(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_mqa_h4_kv1_s1337", "1_gqa_h4_kv2_s1337"]  # the label comes from the counts
    for job, kv, label in zip(jobs, (1, 2), ("mqa", "gqa")):
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["model"]["n_kv_groups"] == kv
        assert "val/loss" in events(job)[0]
        record = RunRecord.load(job / "summary.json")
        assert (record.kind, record.status, record.attention, record.kv_groups) == ("train", "complete", label, kv)
        assert record.kv_cache_bytes_per_token == 2 * 2 * kv * 16 * 4 and record.kv_cache_bytes_per_token_mha == 2 * 2 * 4 * 16 * 4
        # bytes encoding: bpb is loss / ln 2, a little more for the <|endoftext|> targets (0 bytes)
        assert record.test_loss / math.log(2) * (1 - 1e-5) <= record.test_bpb < record.test_loss / math.log(2) * 1.01


def test_hparams_tab_lists_each_run_with_its_attention(sweep):
    from tensorboard.plugins.hparams import plugin_data_pb2

    for job, kv, label in zip(sorted(p for p in sweep.iterdir() if p.is_dir()), (1, 2), ("mqa", "gqa")):
        found = {}
        for f in (job / "tb").glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(f)).Reload()
            try:
                contents = acc.PluginTagToContent("hparams")
            except KeyError:  # the test phase writes its own event file, without hparams
                continue
            for tag, content in contents.items():
                data = plugin_data_pb2.HParamsPluginData.FromString(content)
                if data.WhichOneof("data") == "session_start_info":
                    found = {k: v for k, v in data.session_start_info.hparams.items()}
        assert found["attention"].string_value == label and found["kv_groups"].number_value == kv
        finals = {}
        for f in (job / "tb").glob("events.out.tfevents.*"):
            acc = EventAccumulator(str(f)).Reload()
            for tag in ("hp/best_val_loss", "hp/test_ppl", "hp/decode_tokens_per_sec"):
                if tag in acc.Tags()["scalars"]:  # the step-0 placeholder and the final value may sit in two files
                    last = max(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
                    if tag not in finals or (last.step, last.wall_time) > (finals[tag].step, finals[tag].wall_time):
                        finals[tag] = last
        assert set(finals) == {"hp/best_val_loss", "hp/test_ppl", "hp/decode_tokens_per_sec"}
        assert all(e.step == 4 and math.isfinite(e.value) and e.value > 0 for e in finals.values())


def test_compare_reports_the_sweep_and_lists_a_crashed_run(sweep, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    crashed = runs / "2_crashed" / ".hydra"
    crashed.mkdir(parents=True)
    shutil.copy(sweep / "0_mqa_h4_kv1_s1337" / ".hydra" / "config.yaml", crashed)
    killed = runs / "3_killed_mha"  # checkpoints and events but no summary; its config as Hydra saves mha's
    shutil.copytree(sweep / "1_gqa_h4_kv2_s1337", killed)
    (killed / "summary.json").unlink()
    config = (killed / ".hydra" / "config.yaml").read_text()
    (killed / ".hydra" / "config.yaml").write_text(
        config.replace("type: gqa", "type: mha").replace("kv_groups: 2", "kv_groups: ${.n_heads}"))
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.compare", str(runs)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(runs / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["kv_groups"]) for r in rows] == [
        ("0_mqa_h4_kv1_s1337", "complete", "1"), ("1_gqa_h4_kv2_s1337", "complete", "2"),
        ("2_crashed", "crashed (no checkpoint)", "1"),
        ("3_killed_mha", "incomplete (no summary; last checkpoint kept)", "4")]
    assert [r["attention"] for r in rows] == ["mqa", "gqa", "mqa", "mha"]
    assert int(rows[3]["kv_cache_bytes_per_token"]) == 2 * 2 * 4 * 16 * 4 and float(rows[3]["best_val_loss"]) > 0
    assert int(rows[1]["kv_cache_bytes_per_token"]) == 2 * int(rows[0]["kv_cache_bytes_per_token"])
    assert float(rows[0]["best_val_loss"]) > 0 and float(rows[0]["decode_tokens_per_sec"]) > 0
    assert float(rows[0]["test_ppl"]) > 1 and int(rows[0]["parameters"]) > 0
    for name in ("comparison.md", "report.md", "val_loss.png", "quality_vs_kv_cache.png", "decode_vs_kv_groups.png"):
        assert (runs / name).stat().st_size > 0
    crashed_row = next(line for line in (runs / "comparison.md").read_text().splitlines() if line.startswith("| 2_crashed"))
    assert "| 1337 | crashed (no checkpoint) |" in crashed_row
    with open(runs / "comparison.csv") as f:
        arms = list(csv.DictReader(f))
    # the crashed run joins its arm (same config) without counting; the killed MHA arm is the baseline, n = 0
    assert [(a["kv_groups"], a["runs"], a["n"], a["baseline"]) for a in arms] == [
        ("1", "2", "1", "False"), ("2", "1", "1", "False"), ("4", "1", "0", "True")]
    assert "Not counted (unfinished)" in (runs / "report.md").read_text()


def test_seeds_repeat_each_arm_and_compare_groups_them(corpus, tmp_path):
    result = train(corpus, tmp_path, "attention=gqa", "attention.kv_groups=1,4", "seed=1,2", "trainer.max_steps=4",
                   "trainer.val_check_interval=2", "hydra.sweep.dir=sweep", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "0_mqa_h4_kv1_s1", "1_mqa_h4_kv1_s2", "2_mha_h4_kv4_s1", "3_mha_h4_kv4_s2"]
    losses = [RunRecord.load(sweep / job / "summary.json").test_loss for job in ("0_mqa_h4_kv1_s1", "1_mqa_h4_kv1_s2")]
    assert losses[0] != losses[1]  # another seed, another model
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.compare", str(sweep)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(sweep / "comparison.csv") as f:
        arms = {a["arm"]: a for a in csv.DictReader(f)}
    assert [(a, arms[a]["n"], arms[a]["baseline"]) for a in arms] == [("kv_groups=1", "2", "False"),
                                                                      ("kv_groups=4", "2", "True")]
    assert float(arms["kv_groups=1"]["best_val_loss_std"]) > 0 and arms["kv_groups=1"]["best_val_loss_p_value"] != ""
    assert "- kv_groups=1 (MQA): " in (sweep / "report.md").read_text()


def test_a_parameter_matched_model_trains_resumes_and_evaluates(corpus, tmp_path):
    result = train(corpus, tmp_path, "hydra.run.dir=matched", "attention=mqa", "model.match_params=true",
                   "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    record = RunRecord.load(tmp_path / "matched" / "summary.json")
    assert record.mlp_hidden == 304 and record.kv_groups == 1  # 4 * 64 widened by ~3 heads x 16 dims
    result = train(corpus, tmp_path, "hydra.run.dir=matched", "attention=mqa", "model.match_params=true",
                   "ckpt_path=last", "trainer.max_steps=6", "trainer.val_check_interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert global_step(tmp_path / "matched" / "checkpoints" / "last.ckpt") == 6
    ckpt = tmp_path / "matched" / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.evaluate", f"ckpt_path={ckpt}", "decode.repeats=1",
                             "decode.new_tokens=8", "decode.batch_sizes=[1]", "device=cpu"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = RunRecord.load(ckpt.with_suffix(".eval.json"))
    assert (evaluated.mlp_hidden, evaluated.parameters) == (304, record.parameters)


def test_the_conversion_study_trains_its_parent_once_then_every_arm(corpus, tmp_path):
    # the study preset replaces debug's keys (the later experiment wins): shrink it the same way, one grid corner
    result = train(corpus, tmp_path, "experiment=uptrain_study_with_parent", "model.n_heads=4", "model.n_layer=2",
                   "model.n_embd=64", "model.block_size=64", "data.encoding=bytes", "data.batch_size=8",
                   "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.limit_val_batches=4",
                   "trainer.limit_test_batches=4", "optim.warmup_steps=2", "callbacks.generation.max_new_tokens=8",
                   "callbacks.throughput.window_size=2", "uptrain.method=first,scratch", "uptrain.alpha=0,0.5",
                   "hydra.sweep.dir=study")
    assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "study"
    assert (result.stdout + result.stderr).count("training the MHA parent first") == 1
    parent = RunRecord.load(study / "parent" / "summary.json")
    assert (parent.attention, parent.global_step) == ("mha", 10)
    steps = {job.name.split("_", 1)[1]: RunRecord.load(job / "summary.json") for job in study.glob("[0-9]*")}
    assert {name: r.global_step for name, r in steps.items()} == {
        "first_a0.0_gqa_kv2_s1337": 0, "first_a0.5_gqa_kv2_s1337": 5,  # alpha x the parent's 10 steps
        "scratch_a0.0_gqa_kv2_s1337": 10, "scratch_a0.5_gqa_kv2_s1337": 15}  # the parent's steps + alpha x steps
    converted = steps["first_a0.0_gqa_kv2_s1337"]  # evaluated right after conversion, and saved for evaluate
    assert converted.details["uptrain"]["method"] == "first" and converted.test_loss > 0
    assert (study / "0_first_a0.0_gqa_kv2_s1337" / "checkpoints" / "last.ckpt").is_file()
    assert converted.test_loss < steps["scratch_a0.0_gqa_kv2_s1337"].test_loss + 1  # sanity: it kept the parent's weights
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.compare", str(study)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (study / "report.md").read_text()
    assert "(MHA)** (the MHA arm" in report and "![uptrain_alpha.png](uptrain_alpha.png)" in report
    assert (study / "uptrain_alpha.png").stat().st_size > 0


def test_compare_refuses_a_folder_without_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.compare", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no runs under")


@pytest.mark.parametrize("overrides, message", [
    (["attention=mha", "attention.kv_groups=2"], "error: attention=mha needs kv_groups = n_heads, got kv_groups=2"),
    (["attention.kv_groups=3"], "error: attention.kv_groups=3 does not divide attention.n_heads=4"),
    (["ckpt_path=nowhere.ckpt"], "error: ckpt_path=nowhere.ckpt: no such file"),
    (["init_from=nowhere.ckpt"], "error: init_from=nowhere.ckpt:"),
    (["init_from=nowhere.ckpt", "uptrain.method=median"], "error: uptrain.method='median' is not a KV-head "
                                                          "conversion method; use one of mean, first, random"),
    (["experiment=uptrain_study", "hydra.mode=RUN"], "error: uptrain.alpha=0.05 needs a parent: set init_from="),
    (["init_from=nowhere.ckpt", "uptrain.optim={lr:0}"], "error: uptrain.optim.lr=0 must be > 0"),
    (["trainer.limit_val_batches=-1"], "error: trainer.limit_val_batches=-1: refused by lightning.Trainer"),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, overrides, message):
    result = train(corpus, tmp_path, "hydra.run.dir=bad", *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_evaluate_reports_test_metrics_and_kv_bytes_in_the_ratio_kv_groups_over_heads(first_run):
    run_dir, _ = first_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-m", "gpt_lightning.evaluate", f"ckpt_path={ckpt}",
                             "decode.new_tokens=8", "decode.repeats=1"], capture_output=True, text=True,
                            timeout=300, cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    r = RunRecord.load(run_dir / "checkpoints" / "last.eval.json")
    assert (r.kind, r.attention, r.n_head, r.kv_groups) == ("evaluate", "gqa", 4, 2)
    assert r.kv_cache_bytes_per_token * 4 == r.kv_cache_bytes_per_token_mha * 2
    summary = RunRecord.load(run_dir / "summary.json")
    assert r.test_ppl == pytest.approx(summary.test_ppl, rel=0.02)  # fp32 here, bf16 autocast in training
    assert r.test_bpb == pytest.approx(summary.test_bpb, rel=0.02)
    assert r.parameters == summary.parameters > 0 and r.peak_memory_bytes > 0
    by_batch = r.details["decode_tokens_per_sec_by_batch"]
    assert by_batch["b1"] == r.decode_tokens_per_sec > 0 and by_batch["b8"] > 0
    assert r.details["decode_cuda_graph"] is False  # a CPU decodes eagerly whatever decode.cuda_graph says
    assert "kv_cache_bytes_per_token" in result.stdout


def generate(ckpt, *args):
    return subprocess.run([sys.executable, "-m", "gpt_lightning.generate", f"ckpt_path={ckpt}", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_with_a_seed_is_reproducible_and_streams_the_prompt(first_run):
    ckpt = first_run[0] / "checkpoints" / "last.ckpt"
    args = ["prompt=Capítulo I, o dia", "max_new_tokens=20", "temperature=1.0", "top_k=40", "top_p=0.95"]
    a, b = generate(ckpt, *args, "seed=3"), generate(ckpt, *args, "seed=3")
    other = generate(ckpt, *args, "seed=4")
    assert a.returncode == 0, a.stderr[-3000:]
    assert a.stdout == b.stdout and a.stdout.startswith("Capítulo I, o dia") and a.stdout != other.stdout
    eager = generate(ckpt, *args, "seed=3", "cuda_graph=false")  # the key exists; on a CPU nothing changes
    assert eager.returncode == 0 and eager.stdout == a.stdout, eager.stderr[-3000:]


def test_generate_crops_a_long_prompt_and_starts_an_empty_one_from_endoftext(first_run):
    ckpt = first_run[0] / "checkpoints" / "last.ckpt"
    long = generate(ckpt, "prompt=" + "a casa " * 40, "max_new_tokens=4", "seed=1")
    assert long.returncode == 0 and "the model sees only its last 64" in long.stderr
    empty = generate(ckpt, "prompt=", "max_new_tokens=6", "temperature=0")
    assert empty.returncode == 0, empty.stderr[-2000:]
    # The greedy continuation of exactly one <|endoftext|> token (bytes encoding: id 256), nothing else.
    from gpt_lightning.training.checkpoints import load_gpt

    model, _ = load_gpt(ckpt)
    expected = model.generate(torch.tensor([[256]]), 6, temperature=0)[0, 1:].tolist()
    assert empty.stdout == bytes(expected).decode("utf-8", errors="replace") + "\n"
    bad = generate(ckpt, "prompt=x", "top_p=1.5")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: top_p=1.5")


@pytest.mark.parametrize("prompt", ["Capítulo I, o 'dia'", "a\\nb", "x ${y} z", "ends with \\", "«Se o jardim»"])
def test_any_prompt_text_survives_hydra_quoting(prompt):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from gpt_lightning.generate import quote_prompt_override

    (override,) = quote_prompt_override([f"prompt={prompt}"])
    value = OverridesParser.create().parse_override(override).value()
    assert OmegaConf.create({"prompt": value}).prompt == prompt
