"""The GPU check's verdicts, one line each with its numbers: python summarize.py WORK OUT [--gpu 0|1] ...

Reads what tests/gpu/check.sh left in WORK: steps.tsv (each step's exit status and seconds), env.json, pytest's junit
XML, and the run records (probe.json, runs/*/summary.json, bench.json) through `RunRecord.load`; TensorBoard events
for the validation curve. Writes OUT/summary.txt and OUT/summary.json; exits 1 when any check FAILED.
Statuses: PASS, FAIL (a defect, or a step that broke), SKIP (nothing to check here, e.g. no CUDA), GOAL-MET /
GOAL-MISSED (a target, not a correctness check), INFO (a figure with no pass mark).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt_lightning.measure.sdpa_backends import slower_than, slowest  # noqa: E402
from gpt_lightning.training.run_record import RunRecord  # noqa: E402

MFU_GOAL = 0.40          # compiled bf16 at GPT-2 124M, batch x 1024 tokens (issue 14)
MEMORY_GOAL = 0.3        # training step memory against HF GPT-2's (issue 11)
STEP_TIME_SLACK = 1.10   # GQA/MQA do less work than MHA (smaller KV projection); >10% slower means a slower path


class Summary:
    def __init__(self):
        self.checks: list[dict] = []

    def add(self, name: str, status: str, value: str, detail: str = "") -> None:
        self.checks.append({"check": name, "status": status, "value": value, "detail": detail})


def steps(work: Path) -> dict[str, dict]:
    out = {}
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        name, rc, secs, limit = (line.split("\t") + ["", "", "", ""])[:4]
        out[name] = {"rc": rc, "secs": int(secs or 0), "limit": limit}
    return out


def step_problem(s: dict, name: str) -> str | None:
    """Why a step gives nothing to check (None when it ran and exited 0)."""
    st = s.get(name)
    if st is None:
        return "did not run"
    if st["rc"] == "0":
        return None
    if st["rc"] == "skipped":
        return f"skipped: {st['limit']}s of the budget left"
    if st["rc"] == "no-checkpoint":
        return "not run: train_real left no last.ckpt to resume from"
    if st["rc"] == "not-selected":
        return "not selected (ONLY)"
    if st["rc"] in ("124", "137"):
        return f"timed out after {st['secs']}s (limit {st['limit']}s)"
    return f"exit {st['rc']} after {st['secs']}s (logs/{name}.log)"


def missing(s: dict, name: str) -> str:
    """The verdict for a step that left nothing to check: SKIP when it was not meant to run (not in ONLY, out of
    budget, GPU-only on a CPU), else FAIL."""
    return "SKIP" if s.get(name, {}).get("rc") in ("skipped", "not-selected", "no-gpu") else "FAIL"


def load(path: Path) -> RunRecord | None:
    return RunRecord.load(path) if path.exists() else None


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def speed_of(rec: RunRecord, run_dir: Path) -> tuple[float | None, float | None, bool]:
    """(tokens/s, MFU, from the record?): the record's fields; where they are empty, the last values
    ThroughputMonitor logged to TensorBoard (train/device/*), so a record defect does not hide the figure."""
    if rec.train_tokens_per_sec is not None:
        return rec.train_tokens_per_sec, rec.train_mfu, True
    last = lambda d: d[max(d)] if d else None  # noqa: E731
    return (last(tb_scalars(run_dir, "train/device/items_per_sec")), last(tb_scalars(run_dir, "train/device/mfu")),
            False)


def record_defect(S: Summary, runs: list[str]) -> None:
    if runs:
        S.add("run record speed fields", "FAIL", f"empty in {', '.join(runs)} (TensorBoard has them)",
              "train.py reads trainer.logged_metrics after trainer.test(), which starts a fresh log")


def speed_of(rec: RunRecord, run_dir: Path) -> tuple[float | None, float | None, bool]:
    """(tokens/s, MFU, from the record?): the record's fields; where they are empty, the last values
    ThroughputMonitor logged to TensorBoard (train/device/*), so a record defect does not hide the figure."""
    if rec.train_tokens_per_sec is not None:
        return rec.train_tokens_per_sec, rec.train_mfu, True
    last = lambda d: d[max(d)] if d else None  # noqa: E731
    return (last(tb_scalars(run_dir, "train/device/items_per_sec")), last(tb_scalars(run_dir, "train/device/mfu")),
            False)


def record_defect(S: Summary, runs: list[str]) -> None:
    if runs:
        S.add("run record speed fields", "FAIL", f"empty in {', '.join(runs)} (TensorBoard has them)",
              "train.py reads trainer.logged_metrics after trainer.test(), which starts a fresh log")


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def check_env(S: Summary, work: Path, s: dict, gpu: bool) -> dict:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    problem = step_problem(s, "install")
    if s.get("install", {}).get("rc") == "no-wheels":
        S.add("install", "SKIP", "no .whl/ here", "installed packages used")
    elif problem:
        S.add("install", "FAIL", problem)
    else:
        from_site = str(work / "site") in env.get("hydra_from", "")
        S.add("install", "PASS" if from_site else "FAIL", f"hydra {env.get('hydra')} omegaconf {env.get('omegaconf')}",
              f"hydra imported from {env.get('hydra_from')}")
    problem = step_problem(s, "env")
    if problem:
        S.add("env", "FAIL", problem)
    if env:
        peak = env.get("spec_peak_bf16")
        S.add("device", "INFO", f"{env['device']}" + (f", {env['memory_gib']:.0f} GiB" if env.get("memory_gib") else ""),
              f"torch {env['torch']} (CUDA {env.get('cuda_runtime')}), lightning {env['lightning']}, python "
              f"{env['python']}; dense bf16 peak {peak / 1e12:.1f} TFLOP/s ({env.get('card')})" if peak else
              f"torch {env['torch']}, lightning {env['lightning']}, python {env['python']}; no spec peak (CPU)")
        tok = env.get("gpt2_tokenizer")
        S.add("tokenizer", "PASS" if isinstance(tok, int) else "INFO", f"gpt2: {tok}",
              "from the carried cache" if isinstance(tok, int) else "data.encoding=bytes used instead")
    else:
        S.add("device", "FAIL", step_problem(s, "env") or "no env.json")
    if gpu is False:
        S.add("cuda", "SKIP", "no CUDA visible", "GPU-only checks are skipped; the rest ran at CPU size")
    return env


def check_pytest(S: Summary, work: Path, s: dict) -> None:
    xml = work / "pytest_gpu.xml"
    if not xml.exists():
        S.add("pytest -m gpu", missing(s, "pytest_gpu"), step_problem(s, "pytest_gpu") or "no junit XML")
        return
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = n - fail - err - skip
    value = f"{passed} passed, {fail + err} failed, {skip} skipped"
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    detail = "; ".join(f"{k}: {v}" for k, v in sorted(props.items()))
    if fail + err:
        S.add("pytest -m gpu", "FAIL", value, "failed: " + ", ".join(failed))
    elif passed == 0:
        S.add("pytest -m gpu", "SKIP", value, "no CUDA: every test skipped")
    else:
        S.add("pytest -m gpu", "PASS", value, detail)


def check_probe(S: Summary, work: Path, s: dict, gpu: bool) -> None:
    record = load(work / "probe.json")
    if record is None:
        S.add("attention kernels", missing(s, "probe"), step_problem(s, "probe") or "no probe.json")
        return
    d = record.details
    for e in d.get("errors", []):
        S.add("probe error", "FAIL", e[:160])
    rows = d.get("training", [])
    by = {(r["dtype"], r["attention"]): r for r in rows}
    for dtype in sorted({r["dtype"] for r in rows}):
        mha = by.get((dtype, "mha"))
        for r in (r for r in rows if r["dtype"] == dtype):
            accepted = ",".join(b for b, why in r["accepted"].items() if why is None) or "none"
            refused = "; ".join(f"{b}: {why[:90]}" for b, why in r["accepted"].items() if why)
            S.add(f"sdpa {r['attention']} kv={r['kv_groups']} {dtype}", "INFO",
                  f"ran {'+'.join(r['ran']) or '?'}; alone: {accepted}", refused)
        for r in (r for r in rows if r["dtype"] == dtype and r["attention"] != "mha"):
            if mha is None:
                continue
            slower = slower_than(slowest(r["ran"]), slowest(mha["ran"]))
            S.add(f"{r['attention']} backend vs mha {dtype}", "FAIL" if slower else "PASS",
                  f"{'+'.join(r['ran'])} vs {'+'.join(mha['ran'])}", "GQA/MQA must never take a slower SDPA backend")
            ratio = r["step_ms"] / mha["step_ms"]
            verdict = ("PASS" if ratio <= STEP_TIME_SLACK else "FAIL") if gpu else "INFO"
            S.add(f"{r['attention']} step time vs mha {dtype}", verdict,
                  f"{r['step_ms']:.1f} vs {mha['step_ms']:.1f} ms ({ratio:.2f}x)",
                  f"pass mark {STEP_TIME_SLACK:.2f}x: fewer KV heads is less work" if gpu else
                  "no pass mark on a shared CPU at a tiny shape")
        for r in (r for r in rows if r["dtype"] == dtype):
            S.add(f"train step {r['attention']} kv={r['kv_groups']} {dtype}", "INFO",
                  f"{r['step_ms']:.1f} ms, {fmt_rate(r['tokens_per_sec'])} tokens/s, MFU {pct(r['mfu_spec'])}",
                  f"bare loop, batch {d['shape']['batch_size']} x {d['shape']['block_size']}")
    for r in d.get("loss", []):  # the LM head + loss alone, per chunk size, against the unfused head
        what = "unfused" if r["head"] == "unfused" else f"fused {r['chunks']} x {r['chunk_rows']} rows"
        peak = f", peak +{r['peak_bytes'] / 1e9:.2f} GB" if r.get("peak_bytes") is not None else ""
        S.add(f"lm head + loss {r['dtype']} {what}", "INFO",
              f"{r['ms']:.1f} ms ({r['ms_min']:.1f}-{r['ms_max']:.1f}){peak}",
              f"forward + backward alone at {r['rows']} rows")
    # (attention, batch, replayed from a CUDA graph?); records from before the graph have no key: eager
    dec = {(r["attention"], r["batch"], r.get("cuda_graph", False)): r for r in d.get("decode", [])}
    for (att, b, graph), r in sorted(dec.items()):
        how = ("eager kernels" if not graph else "replayed from CUDA graphs" if r.get("graphs_ran", True)
               else "graphs asked for, capture failed: eager kernels")
        S.add(f"decode {att} b{b}{' graph' if graph else ''}", "INFO",
              f"{fmt_rate(r['tokens_per_sec'])} tokens/s ({r['step_ms']:.2f} ms/step)",
              f"context {r['context']}, {r['dtype']}, {r['bytes_per_step'] / 1e6:.1f} MB read per step, {how}")
    big = max((b for _, b, _ in dec), default=None)
    for graph in (True, False):
        if big is not None and ("mha", big, graph) in dec and ("mqa", big, graph) in dec:
            mha, mqa = dec[("mha", big, graph)], dec[("mqa", big, graph)]
            speedup = mqa["tokens_per_sec"] / mha["tokens_per_sec"]
            ideal = mha["bytes_per_step"] / mqa["bytes_per_step"]
            S.add(f"decode mqa/mha b{big}{' graph' if graph else ''}", "INFO",
                  f"{speedup:.2f}x vs bytes ratio {ideal:.2f}x",
                  f"achieved {speedup / ideal:.0%} of the memory-bound ideal")


def check_real_run(S: Summary, work: Path, s: dict, real_steps: int, resume_steps: int, batch_real: int | None) -> None:
    run = work / "runs" / "real"
    first = load(work / "real_first.json")
    if first is None:
        S.add("real corpus run", missing(s, "train_real"), step_problem(s, "train_real") or "no summary.json")
        return
    val = tb_scalars(run, "val/loss")
    first_steps = sorted(k for k in val if k <= real_steps)
    if len(first_steps) >= 2:
        a, b = val[first_steps[0]], val[first_steps[-1]]
        S.add("val/loss falls", "PASS" if b < a else "FAIL",
              f"{a:.3f} (step {first_steps[0]}) -> {b:.3f} (step {first_steps[-1]})",
              f"{first.global_step} steps, {first.tokens_seen:,} tokens; test/loss {first.test_loss:.3f}"
              if first.test_loss is not None else "")
    else:
        S.add("val/loss falls", "FAIL", f"{len(first_steps)} validation(s) logged", "need two")
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    has_best = any(n.startswith("best") for n in ckpts)
    S.add("checkpoints", "PASS" if "last.ckpt" in ckpts and has_best else "FAIL", ", ".join(ckpts) or "none")
    events = list((run / "tb").glob("events.out.tfevents.*"))
    tags = set(tb_scalars(run, "train/loss")) and {"train/loss"}
    S.add("tensorboard events", "PASS" if events and tags and val else "FAIL",
          f"{len(events)} event file(s)", "train/loss and val/loss scalars")
    tps, mfu, in_record = speed_of(first, run)
    S.add("real run speed", "INFO", f"{fmt_rate(tps)} tokens/s, MFU {pct(mfu)}",
          f"{first.precision}, batch 8, decode {fmt_rate(first.decode_tokens_per_sec)} tokens/s"
          + ("" if in_record or tps is None else "; from TensorBoard"))
    resumed = load(run / "summary.json")
    problem = step_problem(s, "resume")
    if problem or resumed is None or resumed is first:
        S.add("resume from last.ckpt", missing(s, "resume"), problem or "no record")
        return
    want = real_steps + resume_steps
    per_step = (first.tokens_seen or 0) // max(first.global_step or 1, 1)
    train = tb_scalars(run, "train/loss")
    before, after = sorted(k for k in train if k < real_steps), sorted(k for k in train if k >= real_steps)
    # The weights came back too: the first train/loss after the resume continues the curve (a fresh start would
    # be back near ln(vocab)); 1.2x allows for batch-to-batch noise at batch 8.
    continues = bool(before and after) and train[after[0]] < 1.2 * train[before[-1]]
    ok = resumed.global_step == want and resumed.tokens_seen == want * per_step and continues
    S.add("resume from last.ckpt", "PASS" if ok else "FAIL",
          f"step {first.global_step} -> {resumed.global_step}, tokens {first.tokens_seen:,} -> {resumed.tokens_seen:,}",
          f"train/loss {train[before[-1]]:.3f} (step {before[-1]}) -> {train[after[0]]:.3f} (step {after[0]})"
          if before and after else "no train/loss on both sides of the resume")
    val_after = sorted(k for k in val if k > real_steps)
    if val_after:
        S.add("val/loss after resume", "INFO", f"{val[val_after[-1]]:.3f} (step {val_after[-1]})",
              f"{val[first_steps[-1]]:.3f} at step {first_steps[-1]} before it" if first_steps else "")


def check_speed(S: Summary, work: Path, s: dict, gpu: bool) -> None:
    speeds, empty = {}, []
    for name, step_name in (("eager", "speed_eager"), ("compiled", "speed_compiled")):
        run = work / "runs" / name
        rec = load(run / "summary.json")
        if rec is None:
            if s.get(step_name, {}).get("rc") == "no-gpu":
                S.add(f"lightning {name}", "SKIP", "GPU-only (torch.compile at the GPT-2 shape)")
            else:
                S.add(f"lightning {name}", missing(s, step_name), step_problem(s, step_name) or "no record")
            continue
        tps, mfu, in_record = speed_of(rec, run)
        if not in_record and tps is not None:
            empty.append(name)
        speeds[name] = (tps, mfu)
        mem = f", peak {rec.peak_memory_bytes / 2**30:.1f} GiB" if rec.peak_memory_bytes else ""
        S.add(f"lightning {name}", "PASS" if tps else "FAIL", f"{fmt_rate(tps)} tokens/s, MFU {pct(mfu)}",
              f"{rec.precision}, {rec.n_layer}x{rec.n_embd} {rec.attention}, batch x {rec.block_size}{mem}"
              + ("" if in_record else "; from TensorBoard"))
    first = load(work / "real_first.json")
    if first is not None and first.train_tokens_per_sec is None and speed_of(first, work / "runs" / "real")[0]:
        empty.append("real")
    record_defect(S, empty)
    tps_c, mfu_c = speeds.get("compiled", (None, None))
    if gpu and mfu_c is not None:
        tps_e = speeds.get("eager", (None, None))[0]
        S.add("MFU goal (compiled)", "GOAL-MET" if mfu_c >= MFU_GOAL else "GOAL-MISSED", f"{pct(mfu_c)} vs {MFU_GOAL:.0%}",
              f"compiled/eager {tps_c / tps_e:.2f}x" if tps_e and tps_c else "")


def check_bench(S: Summary, work: Path, s: dict) -> None:
    rec = load(work / "bench.json")
    if rec is None:
        problem = step_problem(s, "bench")
        S.add("bench entry point", missing(s, "bench"), problem or "no record")
        return
    d = rec.details
    train = d.get("training_tokens_per_sec", {})
    S.add("bench entry point", "PASS", ", ".join(
        f"{k}: {fmt_rate(v['median'])} tokens/s (MFU spec {pct(v.get('mfu_spec_peak'))})" for k, v in train.items()),
        f"{rec.device}, batch {d['shape']['batch_size']} x {d['shape']['block_size']}")
    for name, path in d.get("sdpa_path", {}).items():
        S.add(f"bench sdpa path {name}", "INFO", path, "what the training step's attention ran")
    mem = d.get("peak_memory", {})
    hf = next((v for k, v in mem.items() if k.startswith("HF")), None)
    for name in ("ours fp32", "ours bf16-mixed"):
        if name in mem and hf:
            ratio = mem[name]["step_bytes"] / hf["step_bytes"]
            S.add(f"bench peak memory {name} / HF", "GOAL-MET" if ratio <= MEMORY_GOAL else "GOAL-MISSED",
                  f"{ratio:.2f}x ({mem[name]['step_bytes'] / 2**30:.2f} vs {hf['step_bytes'] / 2**30:.2f} GiB)",
                  f"{mem[name]['kind']}, 3 training steps in a fresh process; goal <= {MEMORY_GOAL}x")
    for name, lim in d.get("decode_read_limit_b1", {}).items():
        S.add(f"bench decode b1 {name}", "INFO",
              f"{fmt_rate(lim['tokens_per_sec']['median'])} tokens/s = {pct(lim['fraction_of_read_limit'])} of the "
              f"read limit", f"{lim['bytes_read_per_step'] / 1e6:.0f} MB per step at "
              f"{lim['read_bandwidth_bytes_per_sec']['median'] / 1e9:.0f} GB/s: "
              f"{fmt_rate(lim['read_limit_tokens_per_sec'])}/s")
    q = d.get("decode_grid_mqa_over_mha")
    if q:
        S.add(f"bench decode grid MQA / MHA b{q['batch']} ctx{q['context']}", "INFO",
              f"{q['achieved']:.2f}x achieved", f"bytes-read bound {q['bound']:.2f}x (weights + KV cache per step)"
              + (f", roofline ratio {q['roofline_ratio']:.2f}x" if "roofline_ratio" in q else ""))
    elif d.get("decode_grid") is not None:
        S.add("bench decode grid", "FAIL", "no MQA and MHA rows at one (batch, context)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--real-steps", type=int, default=300)
    ap.add_argument("--resume-steps", type=int, default=50)
    a = ap.parse_args()
    S, s = Summary(), steps(a.work)
    env = check_env(S, a.work, s, bool(a.gpu))
    for fn, args in ((check_pytest, ()), (check_probe, (bool(a.gpu),)),
                     (check_real_run, (a.real_steps, a.resume_steps, a.batch)), (check_speed, (bool(a.gpu),)),
                     (check_bench, ())):
        try:
            fn(S, a.work, s, *args)
        except Exception as e:  # a broken reader must not hide the other verdicts
            S.add(fn.__name__, "FAIL", f"summary could not read it: {type(e).__name__}: {e}"[:200])
    total = s.get("total", {}).get("secs")
    limit = int(s.get("total", {}).get("limit") or 420) + 20  # the steps' budget and the summary
    if total is not None:
        S.add("total time", "PASS" if total <= limit or not a.gpu else "FAIL", f"{total}s",
              f"steps' budget {s['total']['limit']}s; under {limit}s on a GPU")
    failed = [c for c in S.checks if c["status"] == "FAIL"]
    result = {"device": env.get("device"), "cuda": bool(a.gpu), "batch": a.batch, "elapsed_s": total,
              "failed": len(failed), "checks": S.checks,
              "steps": s}
    a.out.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(result, indent=1))
    width = max(len(c["check"]) for c in S.checks)
    lines = [f"GPU check: {env.get('device')}  ({len(failed)} failed, {total}s)"]
    for c in S.checks:
        lines.append(f"{c['status']:<11} {c['check']:<{width}}  {c['value']}" + (f"   [{c['detail']}]" if c["detail"] else ""))
    (a.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
