"""`compare` never dies on one bad run: each unreadable record or config is listed with the reason."""

import csv
import json

import yaml

from gpt_lightning.analysis.report import compare
from gpt_lightning.training.run_record import RunRecord


def make_run(root, name, *, n_heads=4, kv_groups=2, summary=None, record=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"attention": {"type": "gqa", "n_heads": n_heads, "kv_groups": kv_groups},
              "model": {"n_heads": 4, "n_layer": 2, "n_embd": 64, "block_size": 64}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (run / "summary.json").write_text(summary)
    if record is not None:
        record.save(run / "summary.json")
    return run


def test_every_bad_run_is_a_row_with_its_reason(tmp_path):
    good = RunRecord(kind="train", n_layer=2, n_embd=64, n_head=4, kv_groups=4, attention="mha", parameters=1000,
                     best_val_loss=2.0, test_ppl=8.0, global_step=20, decode_tokens_per_sec=100.0,
                     kv_cache_bytes_per_token=512)
    make_run(tmp_path, "0_good", kv_groups=4, record=good)  # MHA: compare's default baseline
    make_run(tmp_path, "1_corrupt", summary='{"kind": "train", "status": ')
    make_run(tmp_path, "2_empty_object", summary="{}")
    make_run(tmp_path, "3_json_list", summary="[1, 2]")
    make_run(tmp_path, "4_zero_heads", n_heads=0)
    make_run(tmp_path, "5_kv_abc", kv_groups="abc", summary=json.dumps({"kind": "train", "status": "complete",
                                                                        "kv_groups": "abc"}))
    make_run(tmp_path, "6_failed", record=RunRecord(kind="train", status="failed",
                                                    error="attention.kv_groups=3 does not divide attention.n_heads=4"))
    (tmp_path / "7_bad_yaml" / ".hydra").mkdir(parents=True)
    (tmp_path / "7_bad_yaml" / ".hydra" / "config.yaml").write_text("attention: [unclosed\n")

    rows = {r["run"]: r for r in compare(tmp_path).rows}

    assert rows["0_good"]["status"] == "complete" and rows["0_good"]["kv_groups"] == 4
    assert "unreadable record" in rows["1_corrupt"]["status"]
    assert "not a readable JSON record" in rows["1_corrupt"]["status"]
    assert "an empty JSON object, not a run record" in rows["2_empty_object"]["status"]
    assert "a record is a JSON object, found list" in rows["3_json_list"]["status"]
    assert "invalid config: attention.n_heads=0 is not a positive integer" in rows["4_zero_heads"]["status"]
    assert rows["4_zero_heads"].get("kv_cache_bytes_per_token") is None
    assert "kv_groups='abc' is not a non-negative integer" in rows["5_kv_abc"]["status"]
    assert "invalid config: attention.kv_groups='abc'" in rows["5_kv_abc"]["status"]
    assert rows["5_kv_abc"].get("kv_groups") is None  # no garbage in the column
    assert rows["6_failed"]["status"] == "failed: attention.kv_groups=3 does not divide attention.n_heads=4"
    assert rows["6_failed"]["kv_groups"] == 2  # the shape comes from its config
    assert "unreadable .hydra/config.yaml" in rows["7_bad_yaml"]["status"]

    with open(tmp_path / "runs.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == sorted(rows)
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {name} |" in table for name in rows)


def test_a_run_without_its_hydra_config_is_listed_not_made_an_arm_of_its_own(tmp_path):
    import shutil

    def record(kv, bpb):
        return RunRecord(kind="train", n_layer=2, n_embd=64, n_head=4, kv_groups=kv, parameters=1000, test_bpb=bpb,
                         best_val_loss=2.0, global_step=20, kv_cache_bytes_per_token=128 * kv)

    for kv in (2, 4):
        for seed in (1, 2, 3):
            make_run(tmp_path, f"kv{kv}_s{seed}", kv_groups=kv, record=record(kv, 2.0 + seed / 100 + kv / 1000))
    shutil.rmtree(tmp_path / "kv4_s3" / ".hydra")  # copied without its config

    c = compare(tmp_path)

    assert [(a.label, a.n) for a in c.arms] == [("kv_groups=2", 3), ("kv_groups=4", 2)]
    assert [r["run"] for r in c.ungrouped] == ["kv4_s3"]
    with open(tmp_path / "runs.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["run"] == "kv4_s3")
    assert row["arm"] == "" and row["status"] == "complete; no readable .hydra/config.yaml: not grouped"
    assert "Not grouped (no readable .hydra/config.yaml, while other runs have one; not counted): `kv4_s3`." in (
        tmp_path / "report.md").read_text()


def test_an_unreadable_or_ill_shaped_search_file_is_a_note_not_a_traceback(tmp_path):
    good = RunRecord(kind="train", n_layer=2, n_embd=64, n_head=4, kv_groups=4, parameters=1000, best_val_loss=2.0)
    make_run(tmp_path, "0_mha", kv_groups=4, record=good)
    for folder, text in (("cut", 'objective: val\narms:\n  - arm: {kv: 1}\n    best_run: "0_kv'),  # truncated
                         ("listed", "- 1\n- 2\n"),                                              # a YAML list
                         ("arms_text", "arms: nothing\n"),
                         ("good", "objective: best_val_loss\narms:\n  - arm: {kv: 4}\n    best_value: 2.5\n"
                                  "    best_params: {lr: 0.001}\n    trials: {complete: 2, fail: 1}\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "optimization_results.yaml").write_text(text)

    compare(tmp_path)

    md = (tmp_path / "comparison.md").read_text()
    section = md[md.index("## Hyperparameter search"):]
    assert "| good | kv=4 | lr=0.001 | 2.5000 | 2 / 1 | — |" in section
    assert "Not read: cut/optimization_results.yaml: ScannerError: while scanning a quoted scalar" in section
    assert "Not read: listed/optimization_results.yaml: a mapping with an `arms` list expected, found a list." in section
    assert "Not read: arms_text/optimization_results.yaml: `arms` is not a list of mappings." in section
