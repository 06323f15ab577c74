"""`python -m gpt_lightning.compare DIR`: the runs in DIR (a sweep, or any folder) grouped into arms and set against
a baseline arm, with confidence intervals, Welch tests, findings and plots.

Reads what the runs logged (Hydra's `.hydra/config.yaml`, the run record `summary.json`, TensorBoard events); never
re-trains. An arm is the runs whose resolved configs differ only in the seed and output paths. A run without
`summary.json` (killed, crashed, still running) is listed with its status, not counted. The logic is in
`gpt_lightning/analysis/` (runs, arms, stats, plots, report).
Writes `comparison.md` (arms, then runs), `comparison.csv` (arms), `runs.csv` (runs), `report.md` (findings) and PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt_lightning.analysis.report import compare
from gpt_lightning.common.cli import exits_on_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_lightning.compare", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a multirun sweep folder or any folder of run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="the arm the others are set against, by its label as the report prints it "
                             "(e.g. 'kv_groups=8'); default: the MHA arm (kv_groups = n_heads)")
    args = parser.parse_args(argv)
    with exits_on_user_error():
        c = compare(args.dir, args.out, args.baseline)
    print((c.out / "report.md").read_text().split("\n## Plots")[0])
    print(f"\nwrote {c.out / 'report.md'}, comparison.md, comparison.csv, runs.csv and {len(c.images)} plots "
          f"({len(c.rows)} runs, {len(c.arms)} arms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
