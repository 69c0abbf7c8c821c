"""Copy what an arm's run folder has written so far into results/tables/, so that a machine lost
before the arm finishes loses only its model weights (the run folders live outside the repository).

    python docs/experiments/keep.py runs/t2/gsm8k-np [runs/t2/boolq-train ...]

Every file under 5 MB is copied: settings, state, reports, per-item evaluation files, questions,
answers, data.jsonl, and P_θ's checkpoint where it is that small (NP's and MP's; MC's is over 30 MB).
The students' checkpoint folders (`step-N/`) are not. Files are written atomically, and a second
call copies only what changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import data  # noqa: E402

LIMIT = 5 << 20        # bytes: git holds results, not weights


def keep(run: Path, dest: Path) -> tuple[int, int]:
    """(files copied, files left out for their size)."""
    copied = skipped = 0
    for src in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = src.relative_to(run)
        if any(part.startswith(".") for part in rel.parts):       # temp files of atomic writes, locks
            continue
        if any(part.startswith("step-") for part in rel.parts[:-1]):   # a student's checkpoint folder
            continue
        if src.stat().st_size > LIMIT:
            skipped += 1
            continue
        out = dest / rel
        body = src.read_bytes()
        if out.exists() and out.read_bytes() == body:
            continue
        data.atomic_write(out, lambda tmp: tmp.write_bytes(body))
        copied += 1
    return copied, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (their names become results/tables/NAME)")
    ap.add_argument("--to", type=Path, default=Path(__file__).resolve().parents[2] / "results" / "tables",
                    help="where the copies go (default: results/tables)")
    args = ap.parse_args()
    for run in args.runs:
        if not run.is_dir():
            sys.exit(f"keep.py: {run}: no such run folder")
        copied, skipped = keep(run, args.to / run.name)
        print(f"{run} -> {args.to / run.name}: {copied} files copied, {skipped} over 5 MB left out")


if __name__ == "__main__":
    main()
