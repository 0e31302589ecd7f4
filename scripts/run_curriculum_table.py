"""SRe2L vs CDA vs random real images + KD on Fashion-MNIST, under the knowledge-distillation
protocol, at IPC 1, 10 and 50: distil, save, evaluate, write a markdown table.

    python scripts/run_curriculum_table.py                      # IPC 1, 10 and 50, 5 runs
    python scripts/run_curriculum_table.py --ipc 10 --runs 5    # one part
    python scripts/run_curriculum_table.py --estimate           # time a few steps, predict the total
    python scripts/run_curriculum_table.py --table-only         # rebuild the table from the saved sets

On a shared CPU run it with one thread per process (OMP_NUM_THREADS=1 or --threads 1):
oversubscribed OpenMP threads made a KD epoch 25x slower on a loaded 2-core machine.

Each set is distilled with the methods' "fashion-cpu" preset (one cached BatchNorm teacher
shared by every row made on one machine), its soft labels stored for exactly the evaluation's epochs, saved to
--out-dir, and evaluated under the "kd" protocol (epochs and runs as given) on --arch. The
random row is the matched baseline evaluate_set computes: random real images at the same IPC
with the same teacher, labelled the same way (stored views), same protocol; it is cached, so
the SRe2L and CDA evaluations share it. Every evaluation is also recorded in its set's file.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from ddtool.data import prepare, sample_per_class
from ddtool.evaluation import Accuracies, evaluate_set, get_protocol, train_fresh_network
from ddtool.evaluation.kd import LiveTeacher
from ddtool.methods.base import build_config, get_method_class
from ddtool.methods.teacher import squeeze
from ddtool.paths import cache_dir
from ddtool.run import prepare_distill
from ddtool.seeding import generator
from ddtool.storage import append_evaluation, load_synthetic_set, save_synthetic_set

METHODS = ("sre2l", "cda")
PRESET = "fashion-cpu"


def hardware() -> str:
    from ddtool.device import describe_hardware

    return (f"{describe_hardware(torch.device('cpu'))}, torch threads: {torch.get_num_threads()} "
            f"({os.cpu_count()} cores visible, shared), torch {torch.__version__}, Python {platform.python_version()}")


def teachers(rows: dict) -> str:
    """Which teacher (its test accuracy and training time) each IPC's sets were made with: a
    teacher trained again on another machine (the cache gone) rounds differently."""
    by_teacher: dict[tuple, list[int]] = {}
    for (_, ipc), (sset, _) in sorted(rows.items(), key=lambda item: item[0][1]):
        key = (sset.config["teacher_test_accuracy"], sset.config["teacher_train_seconds"])
        if ipc not in by_teacher.setdefault(key, []):
            by_teacher[key].append(ipc)
    return "; ".join(f"IPC {', '.join(map(str, ipcs))}: test accuracy {100 * accuracy:.2f}%, trained in {seconds:.0f} s"
                     for (accuracy, seconds), ipcs in by_teacher.items())


def protocol_for(epochs: int, runs: int):
    return get_protocol("kd").with_overrides(epochs=epochs, runs=runs)


def config_for(method: str, epochs: int):
    cls = get_method_class(method)
    return cls, build_config(cls, PRESET, {"relabel_epochs": epochs})


def estimate(data, args) -> None:
    """Time recover iterations and KD epochs per IPC and scale them to the full run. Each is
    timed at two lengths and the difference taken, so warm-up and fixed costs cancel."""
    protocol = protocol_for(args.epochs, args.runs)
    cls, config = config_for("cda", args.epochs)
    teacher = squeeze(data, config.teacher_recipe(), progress=False)
    total = 0.0
    for ipc in args.ipc:
        def recover_seconds(iterations: int) -> float:
            probe = prepare_distill(cls.name, ipc, preset=PRESET, seed=args.seed, device="cpu", progress=False,
                                    settings={"relabel_epochs": args.epochs, "iterations": iterations,
                                              "relabel": "live"},
                                    log=lambda m: None, data=data,
                                    work_dir=cache_dir("runs", "curriculum-table", "estimate"))
            start = time.perf_counter()
            probe.distill()
            return time.perf_counter() - start

        def kd_seconds(epochs: int) -> float:
            idx = sample_per_class(data.train_y, 10, ipc, generator(0, "estimate"))
            start = time.perf_counter()
            train_fresh_network(data.train_x[idx], LiveTeacher(teacher.network), data, protocol=protocol,
                                lr=protocol.lr, arch=args.arch, seed=0, epochs=epochs)
            return time.perf_counter() - start

        recover = (recover_seconds(12) - recover_seconds(2)) / 10 * config.iterations
        epoch = (kd_seconds(6) - kd_seconds(1)) / 5
        # Two methods distilled (recover + relabelling the stored views); three rows evaluated,
        # the random one relabelled once per run; a stored-label epoch costs about a live one.
        part = len(METHODS) * recover + (len(METHODS) + 1) * args.runs * args.epochs * epoch
        total += part
        print(f"IPC {ipc}: recover ~{recover:.0f} s per method, KD epoch ~{epoch:.2f} s -> "
              f"~{part / 60:.1f} min for this IPC", flush=True)
    print(f"Estimated total: ~{total / 60:.1f} min, plus the teacher if not cached (it took "
          f"{teacher.train_seconds:.0f} s when it was trained)")


def set_path(out_dir: Path, method: str, ipc: int) -> Path:
    return out_dir / f"fashion-mnist-{method}-ipc{ipc}.h5"


def run(data, args) -> None:
    protocol = protocol_for(args.epochs, args.runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for ipc in args.ipc:
        for method in METHODS:
            print(f"== {method} IPC {ipc}: distilling ({PRESET} preset)", flush=True)
            sset = prepare_distill(method, ipc, preset=PRESET, settings={"relabel_epochs": args.epochs},
                                   seed=args.seed, device="cpu", progress=args.progress, data=data,
                                   work_dir=cache_dir("runs", "curriculum-table", f"{method}-ipc{ipc}-seed{args.seed}"),
                                   ).distill()
            path = set_path(args.out_dir, method, ipc)
            save_synthetic_set(path, sset)
            print(f"== {method} IPC {ipc}: evaluating under {protocol.name} ({args.runs} runs x {args.epochs} epochs)",
                  flush=True)
            report = evaluate_set(sset, data, protocol=protocol, arch=args.arch, seed=args.seed, reference=False,
                                  progress=args.progress)
            append_evaluation(path, report.to_record())
            print(f"   {method} IPC {ipc}: {report.synthetic} (random + KD {report.random_subset}); distill "
                  f"{sset.config['seconds']:.0f} s, evaluation {report.synthetic.seconds:.0f} s", flush=True)
    print(f"This invocation took {(time.perf_counter() - started) / 60:.1f} min.")
    write_table(args, protocol, data)


def write_table(args, protocol, data) -> None:
    """The table of every set in --out-dir evaluated under `protocol` on --arch (so a later
    run at another IPC adds its column)."""
    wanted = protocol.to_dict()
    rows: dict[tuple[str, int], tuple] = {}
    for method in METHODS:
        for path in sorted(args.out_dir.glob(f"fashion-mnist-{method}-ipc*.h5")):
            sset = load_synthetic_set(path)
            matching = [e for e in sset.evaluations if e["protocol"] == wanted and e["arch"] == args.arch]
            if matching:
                rows[(method, sset.ipc)] = (sset, matching[-1])
    if not rows:
        print(f"No set in {args.out_dir} is evaluated under this protocol on {args.arch}.")
        return
    ipcs = sorted({ipc for _, ipc in rows})

    def acc(record: dict) -> str:
        return str(Accuracies(record["runs"]))

    def minutes(seconds: float) -> str:
        return f"{seconds / 60:.1f}"

    lines = ["| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | minutes (distill + evaluation) |",
             "|---|" + "---|" * len(ipcs) + "---|"]
    for method, label in zip(METHODS, ("SRe2L", "CDA")):
        cells = [acc(rows[(method, i)][1]) if (method, i) in rows else "-" for i in ipcs]
        times = "; ".join(f"IPC {i}: {minutes(rows[(method, i)][0].config['seconds'])} + "
                          f"{minutes(rows[(method, i)][1]['seconds'])}" for i in ipcs if (method, i) in rows)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {times} |")
    baseline = {i: next(r[1]["baselines"]["random_subset"] for (m, ipc), r in rows.items() if ipc == i) for i in ipcs}
    lines.append("| random real + KD (same teacher) | " + " | ".join(acc(baseline[i]) for i in ipcs) + " | "
                 + "; ".join(f"IPC {i}: {minutes(baseline[i]['seconds'])}" for i in ipcs) + " |")
    sset, record = next(iter(rows.values()))
    kd = protocol.kd
    config = sset.config
    text = "\n".join([
        "# SRe2L vs CDA vs random + KD on Fashion-MNIST",
        "",
        f"Test accuracy (%), final epoch, mean ± std over {protocol.runs} fresh {args.arch} students "
        f"(population std). `OMP_NUM_THREADS=1 python scripts/run_curriculum_table.py --ipc IPC --runs {args.runs} "
        f"--epochs {args.epochs} --arch {args.arch}`; sets and their evaluation records in `{args.out_dir}`.",
        "",
        *lines,
        "",
        f"- Protocol `{protocol.name}` with {protocol.epochs} epochs: KL(student/T || teacher/T)·T², "
        f"T = {kd.temperature:g}, {kd.optimizer} lr {protocol.lr:g} (weight decay {protocol.weight_decay:g}), "
        f"{kd.schedule} schedule, batch {protocol.batch_size}, views = random-resized crop "
        f"(area {kd.crop_scale_min:g}-1) + flip + CutMix. Soft labels: {record['teacher']} (teacher logits on "
        f"{record.get('stored_epochs', protocol.epochs)} epochs of views recorded at distillation; the random "
        "baseline's recorded the same way, one new draw of images and views per run).",
        f"- Teacher ({PRESET} preset, one recipe for every row): {config['teacher_arch']} width "
        f"{config['teacher_width']}, {config['teacher_epochs']} epochs on the {data.train_x.shape[0]:,} "
        f"training-split images ({data.val_x.shape[0]:,} held out for validation), cached once trained; "
        f"{teachers(rows)}. Each set carries its teacher and its random baseline uses the same one.",
        f"- Recover: {config['iterations']} iterations, Adam lr {config['lr']:g} ({config['beta1']:g}, "
        f"{config['beta2']:g}), r_bn {config['r_bn']:g}, first BN x{config['first_bn_multiplier']:g}, batches of one "
        "image per class; SRe2L crop bound 0.08 throughout, CDA cosine 1.0 -> 0.08 (milestone 1).",
        f"- Table written on: {hardware()}; evaluations: `{record['device']}`.",
        "",
    ])
    table = args.out_dir / "curriculum_table.md"
    table.write_text(text)
    print(text)
    print(f"(written to {table})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100, help="KD epochs of each student (and stored views)")
    parser.add_argument("--arch", default="convnetw32", help="student architecture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("synthetic_sets/curriculum"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--estimate", action="store_true", help="only time a few steps and predict the total")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the sets in --out-dir")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare("fashion-mnist", args.data_root)
    if args.estimate:
        estimate(data, args)
    elif args.table_only:
        write_table(args, protocol_for(args.epochs, args.runs), data)
    else:
        run(data, args)


if __name__ == "__main__":
    main()
