"""`python -m gpt_lightning.compare DIR`: one table and three plots from the runs in DIR (a sweep, or any folder).

Reads what the runs logged (Hydra's `.hydra/config.yaml`, the run record `summary.json`, TensorBoard events); never
re-trains. The reading is in `gpt_lightning/analysis/`.
A run without `summary.json` (killed, crashed, still running) is listed with its status, not dropped.
Writes `comparison.md`, `comparison.csv`, `val_loss.png`, `quality_vs_kv_cache.png`, `decode_vs_kv_groups.png`.
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
    args = parser.parse_args(argv)
    with exits_on_user_error():
        rows = compare(args.dir, args.out)
    out = (args.out or args.dir).expanduser().resolve()
    print((out / "comparison.md").read_text().split("\n\n![")[0])
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv and plots ({len(rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
