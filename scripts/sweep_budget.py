"""Validation curves of distillation recipes against wall-clock: how a time budget is best spent.

Each cell is one `ddtool distill` run (a subprocess, one thread unless --threads) that scores
its set on the validation split every --every outer iterations (`eval_every`, with
--networks fresh networks of --epochs epochs each). The cell's curve pairs each score with
the distillation seconds spent until then (the run log's per-iteration seconds, validation
excluded) and with the recorded training seconds of the experts it used, so recipes with
cheap and costly experts can be compared at equal total cost. Nothing here touches the test
split.

    python scripts/sweep_budget.py run --out docs/results/budget_sweep.json \\
        --cell "datm-2x10:datm:experts=2,max_start_epoch=2,max_start_epoch_final=8" \\
        --cell "datm-4x20:datm:experts=4" --iterations 800 --every 100
    python scripts/sweep_budget.py table docs/results/budget_sweep.json

Cells run one after another; start several processes (one per core, each with its own --out)
to run cells side by side. Experts are found in (or trained into) the cache as `distill` does;
train them first (`ddtool buffer ...`) so that their time is recorded once and not inside a
cell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_VALIDATION = re.compile(r"Iteration (\d+): validation accuracy ([\d.]+)%")
_WORK_DIR = re.compile(r"checkpoints and log in (\S+)")


def parse_cell(text: str) -> dict:
    """'name:method:key=value,key=value' -> {"name", "method", "settings"}."""
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--cell {text!r}: expected NAME:METHOD[:KEY=VALUE,...].")
    settings = [pair for pair in (parts[2].split(",") if len(parts) == 3 else []) if pair]
    return {"name": parts[0], "method": parts[1], "settings": settings}


def run_cell(cell: dict, args: argparse.Namespace) -> dict:
    settings = [*cell["settings"], f"eval_every={args.every}", f"eval_epochs={args.epochs}",
                f"eval_networks={args.networks}", f"checkpoint_every={args.every}"]
    if not any(s.startswith("window_grow_iterations=") for s in settings) and cell["method"] == "datm":
        settings.append(f"window_grow_iterations={args.iterations}")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "ddtool", "distill", "--method", cell["method"], "--ipc", str(args.ipc),
                   "--iterations", str(args.iterations), "--no-eval", "-q", "-o", str(Path(tmp) / "set.h5"),
                   "--seed", str(args.seed)]
        for pair in settings:
            command += ["--set", pair]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"cell {cell['name']} failed:\n{done.stdout}\n{done.stderr}")
        work_dir = Path(_WORK_DIR.search(done.stdout).group(1))
        log = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
        import h5py

        with h5py.File(Path(tmp) / "set.h5", "r") as f:
            timings = json.loads(f.attrs["timings"]) if "timings" in f.attrs else {}
    elapsed, seconds_at = 0.0, {}
    for record in log:
        elapsed += record["seconds"]
        seconds_at[record["iteration"]] = elapsed
    curve = [{"iteration": int(it), "distill_s": round(seconds_at[int(it)], 1), "val_accuracy": float(acc)}
             for it, acc in _VALIDATION.findall(done.stderr)]
    return {**cell, "settings": settings, "ipc": args.ipc, "seed": args.seed, "threads": args.threads,
            "experts_s": timings.get("experts_s"), "hardware": timings.get("hardware"), "curve": curve}


def table(path: Path) -> str:
    """A row per validation point, a column per cell: validation accuracy (%) and, in brackets,
    the minutes of distillation until then (one thread; the experts' cost apart, named below)."""
    cells = json.loads(path.read_text())
    iterations = sorted({point["iteration"] for cell in cells for point in cell["curve"]})
    lines = ["| outer iterations | " + " | ".join(cell["name"] for cell in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for it in iterations:
        row = []
        for cell in cells:
            point = next((p for p in cell["curve"] if p["iteration"] == it), None)
            row.append("-" if point is None else f"{point['val_accuracy']:.2f} ({point['distill_s'] / 60:.0f} min)")
        lines.append(f"| {it} | " + " | ".join(row) + " |")
    costs = [f"{cell['name']} {cell['experts_s'] / 60:.0f} min" for cell in cells if cell.get("experts_s")]
    if costs:
        lines.append("")
        lines.append("Experts' recorded cost: " + ", ".join(costs) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--cell", action="append", required=True, help="NAME:METHOD[:KEY=VALUE,...] (repeatable)")
    run.add_argument("--out", type=Path, required=True, help="JSON file the curves are appended to")
    run.add_argument("--ipc", type=int, default=10)
    run.add_argument("--iterations", type=int, default=800)
    run.add_argument("--every", type=int, default=100, help="validate every N outer iterations")
    run.add_argument("--networks", type=int, default=2, help="fresh networks per validation")
    run.add_argument("--epochs", type=int, default=300, help="epochs of each validation network")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    show = sub.add_parser("table")
    show.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "table":
        print(table(args.path))
        return
    for cell in map(parse_cell, args.cell):
        result = run_cell(cell, args)
        cells = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([c for c in cells if c["name"] != result["name"]] + [result], indent=1))
        print(f"{result['name']}: " + ", ".join(f"{p['iteration']}: {p['val_accuracy']:.2f}" for p in result["curve"]),
              flush=True)


if __name__ == "__main__":
    main()
