"""One short GPU session's checks, time-boxed to fit a lease of about ten minutes.

1. scripts/bench_matching.py on the GPU, alone, so that its timings are clean, then
   scripts/bench_evaluation.py's training speed in float32 and in bf16 autocast;
2. the test suite's CUDA tests, while
3. the `fashion-gpu` experts train as parallel `ddtool buffer --shard` processes (a ConvNet-3
   on 28x28 images leaves a large GPU mostly idle, so shards add throughput), merged into
   the cache where `ddtool distill` finds them; the run uses the longest prefix 0..K-1 of
   finished experts;
4. mtt, tesla and datm distilled at IPC 10 in parallel on those experts with the `fashion-gpu`
   preset, cut to as many outer iterations as the benchmark's speed allows in the time left
   (recorded in each file), each evaluated under its own protocol, 5 fresh networks;
5. from stage 2 on, beside the rest: the cross-architecture table's evaluations the shipped
   IPC-10 sets lack (AlexNet, VGG11, ResNet-18 for 1000 epochs are CPU-days), on copies in
   OUT_DIR/cross-arch; `python scripts/run_results.py merge OUT_DIR/cross-arch/*.h5` brings
   their records home.

Everything a stage prints goes to OUT_DIR as it happens, so a run stopped at the lease's
limit still leaves what it measured.

    python scripts/gpu_check.py OUT_DIR --budget 540
    python scripts/gpu_check.py /tmp/smoke --device cpu --budget 400 --width 8 --expert-epochs 3 \\
        --set max_start_epoch=1 --set syn_steps=4   # a CPU rehearsal of the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--expert-epochs", type=int, default=30)
    parser.add_argument("--experts", type=int, default=16, help="experts asked for (the time box may finish fewer)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--expert-seconds", type=float, default=150,
                        help="time box for the experts (stretched up to twice while none is finished)")
    parser.add_argument("--bench-seconds", type=float, default=150)
    parser.add_argument("--syn-steps", type=int, default=40, help="the preset's N, to size the iterations")
    parser.add_argument("--methods", nargs="+", default=["mtt", "tesla", "datm"])
    parser.add_argument("--set", dest="settings", action="append", default=[], help="passed to every distill")
    parser.add_argument("--eval-reserve", type=float, default=100, help="seconds kept for the evaluations")
    parser.add_argument("--no-cross-arch", dest="cross_arch", action="store_false",
                        help="skip stage 5 (the shipped sets' cross-architecture evaluations)")
    args = parser.parse_args()

    deadline = time.monotonic() + args.budget
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("DDTOOL_CACHE", "/tmp/ddtool-gpu-cache"))
    env = dict(os.environ, DDTOOL_CACHE=str(cache), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    summary: dict = {"device": args.device}
    ddtool = [sys.executable, "-m", "ddtool"]

    def save_summary() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    # 1. the benchmark, alone on the device
    began = time.monotonic()
    bench_steps = ["10", "20", "40", "80"]
    code = _run([sys.executable, "scripts/bench_matching.py", "--device", args.device, "--width", str(args.width),
                 "--iterations", "3", "--steps", *bench_steps], out / "bench_matching.txt", env, args.bench_seconds)
    summary["bench"] = {"exit": code, "seconds": round(time.monotonic() - began, 1)}
    seconds_per_iteration = _exact_seconds(out / "bench_matching.txt", args.syn_steps)
    summary["bench"]["exact_seconds_per_iteration_at_N"] = seconds_per_iteration
    # evaluation's training in float32 and in bf16 autocast, still alone on the device: whether
    # bf16 earns being the GPU default (docs/evaluation.md, "Mixed precision")
    summary["bench_evaluation"] = {}
    for precision in ("fp32", "bf16"):
        summary["bench_evaluation"][precision] = _run(
            [sys.executable, "scripts/bench_evaluation.py", "--device", args.device, "--widths", str(args.width),
             "--protocols", "mtt", "--epochs", "20", "--no-compile", "--precision", precision],
            out / f"bench_evaluation_{precision}.txt", env, 40)
    save_summary()

    # 2 + 3. CUDA tests beside the expert shards
    began = time.monotonic()
    tests = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                              "tests/test_matching_engine.py", "tests/test_networks.py", "tests/test_augment.py"],
                             cwd=ROOT, env=env, stdout=open(out / "pytest_cuda.txt", "w"), stderr=subprocess.STDOUT)
    cross_arch = _start_cross_arch(out / "cross-arch", ddtool, env, args.device) if args.cross_arch else {}
    summary["cross_arch"] = sorted(cross_arch)
    buffer_args = ["buffer", "--width", str(args.width), "--epochs", str(args.expert_epochs),
                   "--experts", str(args.experts), "--device", args.device]
    shards = [subprocess.Popen(ddtool + buffer_args + ["--shard", f"{i}/{args.shards}"], cwd=ROOT, env=env,
                               stdout=open(out / f"buffer_shard{i}.log", "w") if i == 0 else subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
              for i in range(args.shards)]
    # stop at the time box once a first expert is done (else wait up to twice the box), or when
    # the first round (one expert per shard) is done and another round would not fit
    box_end, last_call = time.monotonic() + args.expert_seconds, time.monotonic() + 2 * args.expert_seconds
    while any(p.poll() is None for p in shards) and time.monotonic() < min(last_call, deadline - 60):
        done = _finished_in_shards(cache)
        if time.monotonic() >= box_end and done >= 1:
            break
        time.sleep(2.0)
    _wait_all(shards, 0)
    summary["tests_exit"] = tests.wait(timeout=max(1.0, deadline - time.monotonic()))
    store = _merge_shards(ddtool, cache, env, out)
    finished = _finished_prefix(store) if store else 0
    summary["experts"] = {"finished": finished, "seconds": round(time.monotonic() - began, 1), "store": str(store)}
    save_summary()
    if finished == 0:
        print("no expert finished in the time box; nothing to distill", file=sys.stderr)
        _wait_all(list(cross_arch.values()), deadline - time.monotonic())
        return

    # 4. the methods in parallel, with the iterations the remaining time allows
    left = deadline - time.monotonic() - args.eval_reserve
    # 2x: three processes share the device, and the loop adds expert loading and bookkeeping
    iterations = max(10, min(5000, int(left / (2.0 * (seconds_per_iteration or 0.5)))))
    summary["distill"] = {"iterations": iterations, "experts": finished, "seconds_left": round(left, 1)}
    save_summary()
    runs = {}
    for method in args.methods:
        target = out / f"fashion-mnist_{method}_ipc10_gpu.h5"
        command = ddtool + ["distill", "--method", method, "--ipc", "10", "--preset", "fashion-gpu",
                            "--set", f"experts={finished}", "--set", f"width={args.width}",
                            "--set", f"expert_train_epochs={args.expert_epochs}", "--iterations", str(iterations),
                            "--set", "eval_every=0", "--eval-runs", "5", "--device", args.device, "--quiet",
                            "--output", str(target)]
        for setting in args.settings:
            command += ["--set", setting]
        if method == "datm":  # its window must fit the shortened run and the experts' epochs
            command += ["--set", f"window_grow_iterations={max(1, iterations // 2)}"]
        runs[method] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(out / f"distill_{method}.log", "w"),
                                        stderr=subprocess.STDOUT)
    _wait_all(list(runs.values()) + list(cross_arch.values()), deadline - time.monotonic())
    summary["distill"]["exit"] = {m: p.poll() for m, p in runs.items()}
    summary["distill"]["seconds"] = round(time.monotonic() - began, 1)
    summary["cross_arch_exit"] = {name: p.poll() for name, p in cross_arch.items()}
    save_summary()


def _start_cross_arch(folder: Path, ddtool: list[str], env: dict, device: str) -> dict[str, subprocess.Popen]:
    """One `ddtool evaluate` per shipped IPC-10 set, on a copy, for the networks its file has no
    record of (the table's protocol, epochs and runs: scripts/run_results.py decides them)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_results import cross_arch_table, find_evaluation, load

    folder.mkdir(parents=True, exist_ok=True)
    started = {}
    for cell in cross_arch_table():
        sset = load(cell)
        missing = [arch for arch in cell.archs if sset is not None and find_evaluation(cell, sset, arch) is None]
        if not missing:
            continue
        copy = folder / cell.path.name
        shutil.copyfile(cell.path, copy)
        command = cell.evaluate_command(missing[0])
        command = ddtool + command[1:2] + [str(copy)] + command[3:] + ["--device", device]
        for arch in missing[1:]:
            command += ["--arch", arch]
        started[cell.key] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(folder / f"{cell.key}.log", "w"),
                                             stderr=subprocess.STDOUT)
    return started


def _run(command: list[str], log: Path, env: dict, seconds: float) -> int | None:
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _wait_all([process], seconds)
    return process.poll()


def _wait_all(processes: list[subprocess.Popen], seconds: float) -> None:
    """Wait for every process until `seconds` pass, then stop the ones still running."""
    stop_at = time.monotonic() + max(0.0, seconds)
    while time.monotonic() < stop_at and any(p.poll() is None for p in processes):
        time.sleep(1.0)
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def _exact_seconds(bench_log: Path, steps: int) -> float | None:
    """The benchmark's exact-backend seconds per iteration at N = steps (or the nearest N measured)."""
    found = {int(n): float(s) for n, s in re.findall(r"measured exact N=(\d+): ([0-9.]+) s", bench_log.read_text())}
    if not found:
        return None
    nearest = min(found, key=lambda n: abs(n - steps))
    return found[nearest] * steps / nearest


def _finished_in_shards(cache: Path) -> int:
    """The longest prefix 0..K-1 of experts finished in any shard store."""
    from ddtool.experts.store import expert_file_name

    names = {f.name for folder in (cache / "experts").glob("*.shard-*-of-*.experts") for f in folder.iterdir()}
    count = 0
    while expert_file_name(count) in names:
        count += 1
    return count


def _merge_shards(ddtool: list[str], cache: Path, env: dict, out: Path) -> Path | None:
    shards = sorted((cache / "experts").glob("*.shard-*-of-*.h5"))
    if not shards:
        return None
    store = shards[0].with_name(shards[0].name.split(".shard-")[0] + ".h5")
    with open(out / "buffer_merge.log", "w") as f:
        subprocess.run(ddtool + ["buffer-merge", "--out", str(store), *map(str, shards)], cwd=ROOT, env=env,
                       stdout=f, stderr=subprocess.STDOUT)
    for shard in shards:  # the merged store links the finished experts; what is left is unfinished work
        shard.unlink(missing_ok=True)
        shutil.rmtree(shard.with_name(shard.stem + ".experts"), ignore_errors=True)
    return store if store.exists() else None


def _finished_prefix(store: Path) -> int:
    from ddtool.experts.store import experts_folder, expert_file_name

    folder, count = experts_folder(store), 0
    while (folder / expert_file_name(count)).exists():
        count += 1
    return count


if __name__ == "__main__":
    main()
