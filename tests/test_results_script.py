"""scripts/run_results.py: which evaluation a table cell reads, and the rewrite of docs/results.md's tables."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from test_storage import make_set
from ddtool.storage import append_evaluation, save_synthetic_set

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "run_results.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("run_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_results"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _record(name: str, epochs: int, runs: int, arch: str, mean: float) -> dict:
    return {"protocol": {"name": name, "epochs": epochs}, "arch": arch, "runs": [mean] * runs,
            "baselines": {"random_subset": {"mean": 0.5, "std": 0.01, "runs": [0.5] * runs}}, "seconds": 60.0}


def test_cell_reads_the_newest_matching_evaluation(tmp_path, results):
    path = tmp_path / "set.h5"
    sset = make_set(channels=1, size=6)
    sset.method = "mtt"
    sset.config = {"student_arch": "convnet:width=32", "seconds": 120.0}
    save_synthetic_set(path, sset)
    cell = results.Cell(key="mtt-ipc2", label="mtt", method="mtt", ipc=2, path=path)
    assert results.find_evaluation(cell, results.load(cell), None) is None
    append_evaluation(path, _record("mtt", 1000, 5, "convnetw32", 0.70))  # alias of the student network
    append_evaluation(path, _record("mtt", 1000, 3, "convnet:width=32", 0.99))  # too few runs
    append_evaluation(path, _record("mtt", 300, 5, "convnet:width=32", 0.98))  # other epochs
    append_evaluation(path, _record("classic", 1000, 5, "convnet:width=32", 0.97))  # other protocol
    append_evaluation(path, _record("mtt", 1000, 5, "alexnet", 0.60))  # other network
    assert results.find_evaluation(cell, results.load(cell), None)["mean"] == pytest.approx(0.70)
    assert results.find_evaluation(cell, results.load(cell), "alexnet")["mean"] == pytest.approx(0.60)
    append_evaluation(path, _record("mtt", 1000, 5, "convnet:width=32", 0.75))
    assert results.find_evaluation(cell, results.load(cell), None)["mean"] == pytest.approx(0.75)
    table = results.render_main([cell, results.Cell(key="mtt-ipc9", label="mtt", method="mtt", ipc=9,
                                                    path=tmp_path / "absent.h5")])
    assert "75.00 ± 0.00" in table and "not run" in table and "2: 50.00 ± 1.00" in table and "2: 2 + 1" in table


def test_results_page_tables_replace_only_between_markers(tmp_path, results):
    assert results.RESULTS_PAGE == SCRIPT.parent.parent / "docs" / "results.md"  # not the README
    page = tmp_path / "results.md"
    page.write_text("intro\n<!-- results:main -->\nold table\n<!-- /results:main -->\noutro\n")
    assert results.write_tables({"main": "| new |", "ablation": "| x |"}, page) == ["main"]
    assert page.read_text() == "intro\n<!-- results:main -->\n| new |\n<!-- /results:main -->\noutro\n"
    page.write_text("<!-- results:main -->\n<!-- /results:main -->\n")  # empty, as first written
    results.write_tables({"main": "| a |\n| b |"}, page)
    assert page.read_text() == "<!-- results:main -->\n| a |\n| b |\n<!-- /results:main -->\n"


def test_the_shipped_results_page_has_every_tables_markers(results):
    text = results.RESULTS_PAGE.read_text()
    for name in (*results.TABLES, "published"):
        assert f"<!-- results:{name} -->\n" in text and f"<!-- /results:{name} -->" in text, name


def test_plans_cover_every_method_and_ipc(results):
    main = results.main_table()
    assert {c.method for c in main} == {"random", "herding", "kcenter", "mtt", "tesla", "ftd", "datm", "sre2l", "cda"}
    assert {c.ipc for c in main} == {1, 10, 50} and len({c.path for c in main}) == len(main)
    ablation = results.ablation_table()
    assert all(c.protocol == "mtt" and c.ipc == 10 for c in ablation)
    # every ablation row is a valid configuration of its method, on the same budget whatever
    # the IPC-10 presets of the main table move to: 3 experts x 6 epochs, N = 10, 100 iterations
    from ddtool.methods.base import build_config, get_method_class, parse_overrides

    budgets = set()
    for c in ablation:
        cls = get_method_class(c.method)
        config = build_config(cls, None, parse_overrides(cls.config_class, list(c.settings)), ipc=c.ipc)
        budgets.add((config.experts, config.expert_train_epochs, config.syn_steps, config.iterations))
    assert budgets == {(3, 6, 10, 100)}
    assert not {c.path for c in ablation} & {c.path for c in main}  # its own sets, not the main table's


def _evaluated_set(path, results, method: str, ipc: int, mean: float):
    sset = make_set(channels=1, size=6)
    sset.method = method
    sset.config = {"student_arch": "convnet:width=32", "seconds": 60.0}
    save_synthetic_set(path, sset)
    append_evaluation(path, _record("mtt", 1000, 5, "convnet:width=32", mean))
    return results.Cell(key=f"{method}-ipc{ipc}", label=method, method=method, ipc=ipc, path=path, protocol="mtt")


def test_published_comparison_puts_each_number_beside_its_paper(tmp_path, results):
    cells = [_evaluated_set(tmp_path / "r.h5", results, "random", 10, 0.731),
             _evaluated_set(tmp_path / "m.h5", results, "mtt", 10, 0.785),
             results.Cell(key="mtt-ipc1", label="mtt", method="mtt", ipc=1, path=tmp_path / "absent.h5")]
    rows = {line.split(" | ")[0].strip("| "): line for line in results.render_published(cells).splitlines()}
    assert "| 73.10 ± 0.00 (mtt) | 73.8 ± 0.7 |" in rows["random real subset"]
    assert rows["random real subset"].startswith("| random real subset | - | 51.4 ± 3.8 |")  # IPC 1 not run
    assert "not in ddtool | 84.6" in rows["DSA"]
    assert "| 78.50 ± 0.00 (mtt) | - |" in rows["mtt"]  # ours, with no published number beside it


def test_plots_are_written_as_png(tmp_path, results):
    pytest.importorskip("matplotlib")
    cells = [_evaluated_set(tmp_path / f"m{ipc}.h5", results, "mtt", ipc, 0.7 + ipc / 1000) for ipc in (1, 10)]
    (tmp_path / "m10.log.jsonl").write_text('{"iteration": 0, "loss": 0.9}\n{"iteration": 1, "loss": 0.8}\n')
    made = results.plots(cells, [], [], folder=tmp_path / "plots")
    assert {p.name for p in made} == {"grid_mtt_ipc10.png", "accuracy_vs_ipc.png", "matching_loss.png"}
    budget = [_budgeted_set(tmp_path / "b10.h5", results, "10m", 540.0, 0.78),
              _budgeted_set(tmp_path / "b30.h5", results, "30m", 1790.0, 0.82)]
    made = results.plots(cells, [], budget, folder=tmp_path / "plots")
    assert "accuracy_vs_budget.png" in {p.name for p in made}
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 300


def _budgeted_set(path, results, budget: str, total_s: float, mean: float):
    sset = make_set(channels=1, size=6)
    sset.method = "datm"
    sset.config = {"student_arch": "convnet:width=32"}
    sset.timings = {"experts_s": 0.7 * total_s, "distill_s": 0.3 * total_s, "total_s": total_s, "hardware": "cpu"}
    save_synthetic_set(path, sset)
    append_evaluation(path, _record("datm", 1000, 5, "convnet:width=32", mean))
    return results.Cell(key=f"datm-ipc10-{budget}", label=budget, method="datm", ipc=10, budget=budget, path=path)


def test_budget_table_reads_each_sets_cost_and_the_bars_beside_it(tmp_path, results):
    budget = [_budgeted_set(tmp_path / "b30.h5", results, "30m", 1800.0, 0.82),
              results.Cell(key="datm-ipc10-60m", label="60m", method="datm", ipc=10, budget="60m",
                           path=tmp_path / "absent.h5")]
    assert budget[0].recipe() == ["--method", "datm", "--ipc", "10", "--budget", "30m"]  # no preset: the default recipe
    assert results.preset_drift(budget[0], results.load(budget[0])) == {}  # sized by the machine, not the preset
    rows = results.render_budget(budget).splitlines()[2:]
    # the herding and random + KD bars are the shipped main-table sets' records at IPC 10
    herding = results.own_record(*(lambda c: (c, results.load(c)))(
        next(c for c in results.main_table(ipcs=(10,)) if c.method == "herding")))
    shown = f"{100 * herding['mean']:.2f} ± {100 * herding['std']:.2f}"
    assert rows[0].startswith("| 10 | 30m | 30.0 min (21.0 + 9.0) | 82.00 ± 0.00 | 50.00 ± 1.00 | " + shown)
    assert rows[1].startswith("| 10 | 60m | not run |")


def test_whole_dataset_reference_is_trained_once_per_recipe_and_shown(tmp_path, results, fashion_root, monkeypatch):
    from ddtool.data import prepare
    from ddtool.evaluation import PROTOCOLS
    from ddtool.evaluation import evaluate as evaluation
    from ddtool.storage import SyntheticSet

    monkeypatch.setenv("DDTOOL_DATA", str(fashion_root))
    for name in ("mtt", "datm"):  # one epoch over the tiny split instead of 30
        monkeypatch.setitem(PROTOCOLS, name, PROTOCOLS[name].with_overrides(reference_epochs=1))
    trained = []
    real = evaluation.train_fresh_network
    monkeypatch.setattr(evaluation, "train_fresh_network", lambda *a, **k: trained.append(k["arch"]) or real(*a, **k))
    data = prepare("fashion-mnist", fashion_root)
    cells = []
    for method in ("mtt", "datm"):
        sset = SyntheticSet(images=data.train_x[:20], labels=data.train_y[:20], classes=list(data.spec.classes),
                            preprocessing=data.preprocessing, dataset="fashion-mnist", ipc=2, method=method,
                            config={"student_arch": "convnet:width=8"})
        save_synthetic_set(tmp_path / f"{method}.h5", sset)
        cells.append(results.Cell(key=f"{method}-ipc2", label=method, method=method, ipc=2,
                                  path=tmp_path / f"{method}.h5"))
    store = tmp_path / "whole_dataset.json"
    for cell in cells + cells:
        results.run_reference(cell, lambda message: None, store)
    references = results.read_references(store)
    assert set(references) == {"mtt on convnet:width=8", "datm on convnet:width=8"}
    # datm trains the reference exactly as mtt does (only their synthetic-set batch differs): one network
    assert trained == ["convnet:width=8"]
    assert references["mtt on convnet:width=8"]["runs"] == references["datm on convnet:width=8"]["runs"]
    assert references["mtt on convnet:width=8"]["epochs"] == 1
    assert references["datm on convnet:width=8"]["compiled"] is False  # as computed (by mtt's call), cached
    mean = references["mtt on convnet:width=8"]["mean"]
    table = results.render_main(cells[:1], references_path=store)
    assert f"| {100 * mean:.2f} (1 run, 1 ep) |" in table


def test_merge_adds_only_the_copys_new_records_and_refuses_other_images(tmp_path, results):
    shipped, copy = tmp_path / "set.h5", tmp_path / "gpu" / "set.h5"
    save_synthetic_set(shipped, make_set(channels=1, size=6))
    append_evaluation(shipped, _record("mtt", 1000, 5, "convnet:width=32", 0.70))
    copy.parent.mkdir()
    copy.write_bytes(shipped.read_bytes())
    append_evaluation(copy, {**_record("mtt", 1000, 5, "alexnet", 0.60), "device": "cuda:0"})
    append_evaluation(shipped, _record("mtt", 1000, 5, "vgg11", 0.65))  # made here meanwhile
    assert results.merge_evaluations(copy, shipped) == 1
    assert results.merge_evaluations(copy, shipped) == 0  # nothing new the second time
    archs = [r["arch"] for r in results.load(results.Cell("k", "l", "mtt", 2, shipped)).evaluations]
    assert archs == ["convnet:width=32", "vgg11", "alexnet"]
    cell = results.Cell(key="mtt-xarch", label="mtt", method="mtt", ipc=2, path=shipped,
                        archs=("convnet:width=32", "alexnet"))
    rendered = results.render_cross_arch([cell])
    assert "| 60.00 ± 0.00 (GPU) [50.00] |" in rendered and "| 65.00 ± 0.00 [50.00] |" in rendered
    other = tmp_path / "other.h5"
    save_synthetic_set(other, make_set(channels=1, size=6, ipc=3))
    with pytest.raises(SystemExit, match="images differ"):
        results.merge_evaluations(other, shipped)


def test_run_evaluates_only_the_networks_asked_for(tmp_path, results, monkeypatch):
    path = tmp_path / "set.h5"
    sset = make_set(channels=1, size=6)
    sset.method = "mtt"
    save_synthetic_set(path, sset)
    cell = results.Cell(key="mtt-xarch", label="mtt", method="mtt", ipc=2, path=path, protocol="mtt",
                        archs=results.CROSS_ARCHS)
    commands = []
    monkeypatch.setattr(results.subprocess, "run", lambda command, **kwargs: commands.append(command))
    results.run_cell(cell, lambda message: None, archs=["alexnet", "vgg11"])
    assert [command[command.index("--arch") + 1] for command in commands] == ["alexnet", "vgg11"]
    # evaluations resume what an interrupted one finished; the matched baseline is trained
    assert all("--resume" in command and "--no-baselines" not in command for command in commands)
    commands.clear()
    results.run_cell(cell, lambda message: None)
    assert len(commands) == len(results.CROSS_ARCHS)
    # except for the random row, itself a random subset
    random_row = next(c for c in results.cross_arch_table() if c.method == "random")
    assert "--no-baselines" in random_row.evaluate_command("alexnet")
    # --processes 2: the same evaluation under torchrun, its runs spread over two processes
    results.run_cell(cell, lambda message: None, archs=["vgg11"], processes=2)
    assert commands[-1][:6] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "ddtool"]
    assert commands[-1][6:] == cell.evaluate_command("vgg11")[1:]


def test_a_set_made_before_its_preset_changed_is_flagged_and_not_taken_as_done(tmp_path, results, monkeypatch):
    import dataclasses

    from ddtool.methods.base import build_config, get_method_class

    preset = dataclasses.asdict(build_config(get_method_class("mtt"), None, {}, ipc=50))
    path = tmp_path / "set.h5"
    sset = make_set(channels=1, size=6)
    sset.method = "mtt"
    sset.config = {**preset, "student_arch": "convnet:width=32", "seconds": 1.0, "checkpoint_every": 7}
    save_synthetic_set(path, sset)
    cell = results.Cell(key="mtt-ipc50", label="mtt", method="mtt", ipc=50, path=path)
    assert results.preset_drift(cell, results.load(cell)) == {}  # run-only settings do not count

    sset.config = {**sset.config, "max_start_epoch": preset["max_start_epoch"] - 3}
    save_synthetic_set(path, sset)
    drift = results.preset_drift(cell, results.load(cell))
    assert drift == {"max_start_epoch": (preset["max_start_epoch"] - 3, preset["max_start_epoch"])}
    # a set made before match_span_epochs was renamed records it as expert_epochs: still compared
    renamed = {k: v for k, v in sset.config.items() if k != "match_span_epochs"}
    sset.config = {**renamed, "max_start_epoch": preset["max_start_epoch"], "expert_epochs": 3}
    save_synthetic_set(path, sset)
    assert results.preset_drift(cell, results.load(cell)) == {"match_span_epochs": (3, preset["match_span_epochs"])}
    sset.config = {**sset.config, "max_start_epoch": preset["max_start_epoch"] - 3}
    save_synthetic_set(path, sset)
    commands, messages = [], []
    monkeypatch.setattr(results.subprocess, "run", lambda command, **kwargs: commands.append(command))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    results.run_cell(cell, messages.append)
    assert commands == [] and "SKIPPED" in messages[-1] and "max_start_epoch" in messages[-1]


def test_plan_names_an_interrupted_baseline_by_its_recipe_or_protocol(results):
    recipe = {"kind": "random_subset", "ipc": 10, "arch": "alexnet", "compiled": True,
              "recipe": {"epochs": 1000, "batch_size": 100}}
    assert results.describe_kept_baseline(recipe, [0, 2]) == \
        "random subset IPC 10 on alexnet (1000 epochs, batch 100) compiled: run(s) 0, 2"
    named = {"kind": "whole_dataset", "arch": "vgg11", "compiled": False, "protocol": {"name": "kd"}}
    assert results.describe_kept_baseline(named, [1]) == "whole dataset on vgg11 (kd): run(s) 1"


def test_run_puts_back_the_baselines_the_sets_record(tmp_path, results, fashion_root, monkeypatch):
    import shutil

    from ddtool.data import prepare
    from ddtool.evaluation import evaluate_set, get_protocol, random_subset_baseline
    from ddtool.evaluation import evaluate as evaluation
    from ddtool.paths import cache_dir
    from ddtool.storage import SyntheticSet

    monkeypatch.setenv("DDTOOL_DATA", str(fashion_root))
    data = prepare("fashion-mnist", fashion_root)
    protocol = get_protocol("mtt").with_overrides(epochs=1, runs=2)
    sset = SyntheticSet(images=data.train_x[:10], labels=data.train_y[:10], classes=list(data.spec.classes),
                        preprocessing=data.preprocessing, dataset="fashion-mnist", ipc=1, method="mtt")
    save_synthetic_set(tmp_path / "mtt.h5", sset)
    report = evaluate_set(sset, data, protocol=protocol, arch="convnet:width=4", progress=False, reference=False)
    append_evaluation(tmp_path / "mtt.h5", report.to_record())
    shutil.rmtree(cache_dir("baselines"))
    cells = [results.Cell(key="mtt-ipc1", label="mtt", method="mtt", ipc=1, path=tmp_path / "mtt.h5"),
             results.Cell(key="absent", label="x", method="mtt", ipc=1, path=tmp_path / "absent.h5")]
    said = []
    assert results.adopt_recorded_baselines(cells, said.append) == 1
    assert said == ["1 random baseline(s) recorded in the sets' files put back in the cache"]
    assert results.adopt_recorded_baselines(cells, said.append) == 0 and len(said) == 1
    monkeypatch.setattr(evaluation, "train_fresh_network", lambda *a, **k: pytest.fail("the baseline was retrained"))
    found = random_subset_baseline(data, ipc=1, protocol=protocol, arch="convnet:width=4", progress=False)
    assert found.runs == report.random_subset.runs


def test_kept_runs_are_carried_beside_the_sets_and_put_back_on_a_new_machine(tmp_path, results, monkeypatch):
    from ddtool.evaluation import FinishedRuns
    from ddtool.evaluation import evaluate as evaluation
    from ddtool.evaluation.evaluate import KeptRun

    key = {"kind": "synthetic_set", "set": "abc", "arch": "alexnet"}
    runs = FinishedRuns(key, 5)
    runs.keep(0, 0.75, 1600.0)
    runs.keep(2, 0.76, 1650.0)
    carried = tmp_path / "repo" / "kept_runs"
    assert results.carry_kept_runs(carried) == 2
    assert sorted(p.name for p in carried.glob("*/run-*.json")) == ["run-0.json", "run-2.json"]
    monkeypatch.setenv("DDTOOL_CACHE", str(tmp_path / "new-machine-cache"))  # the next session's empty cache
    assert FinishedRuns(key, 5).read(0) is None
    said = []
    assert results.restore_kept_runs(said.append, carried) == 2 and "2 kept run(s)" in said[0]
    assert [FinishedRuns(key, 5).read(r) for r in range(3)] == [KeptRun(0.75, 1600.0), None, KeptRun(0.76, 1650.0)]
    assert evaluation.kept_runs_where(lambda k: k.get("set") == "abc") == [(key, [0, 2])]
    assert results.restore_kept_runs(said.append, carried) == 0  # already there
    # once the evaluation is recorded its runs are discarded, and the next mirror carries nothing
    FinishedRuns(key, 5).discard()
    assert results.carry_kept_runs(carried) == 0 and not carried.exists()
    assert sorted(p.name for p in carried.parent.iterdir()) == []  # no staging folder or lock left


def test_the_hardware_note_counts_what_the_records_name(results):
    old = _record("mtt", 1000, 5, "convnet", 0.7)  # made before records named their hardware
    new = _record("mtt", 1000, 5, "convnet", 0.7)
    new["hardware"] = {"AMD EPYC (AVX2)": [0, 1, 2], "NVIDIA H200": [3, 4]}
    new["baselines"]["random_subset"]["hardware"] = {"AMD EPYC (AVX2)": [0, 1, 2, 3, 4]}
    assert results.hardware_note([new]) == "AMD EPYC (AVX2): 8 runs; NVIDIA H200: 2 runs"
    assert results.hardware_note([old, new]).endswith(
        "; 10 runs on 2-core CPU machines (AMD EPYC), recorded before records named the hardware")
    assert results.hardware_note([]) == "no runs recorded"


def test_a_bf16_evaluation_is_not_a_cell_of_the_float32_tables(tmp_path, results):
    path = tmp_path / "set.h5"
    sset = make_set(channels=1, size=6)
    sset.method, sset.config = "mtt", {"student_arch": "convnet"}
    save_synthetic_set(path, sset)
    cell = results.Cell(key="mtt-ipc2", label="mtt", method="mtt", ipc=2, path=path)
    append_evaluation(path, _record("mtt", 1000, 5, "convnet", 0.70))
    bf16 = _record("mtt", 1000, 5, "convnet", 0.90)
    bf16["protocol"]["precision"] = "bf16"
    append_evaluation(path, bf16)  # newer, but trained at another precision
    assert results.find_evaluation(cell, results.load(cell), None)["mean"] == pytest.approx(0.70)
    hard = _record("mtt", 1000, 5, "convnet", 0.95)
    hard["protocol"]["soft_labels"] = False  # `ddtool evaluate --hard-labels`: not the set's own labels
    append_evaluation(path, hard)
    assert results.find_evaluation(cell, results.load(cell), None)["mean"] == pytest.approx(0.70)


def test_gpu_table_distils_with_the_gpu_presets_and_refuses_a_cpu(tmp_path, results):
    import dataclasses
    import subprocess

    import torch

    from ddtool.methods.base import build_config, get_method_class

    cells = results.gpu_table()
    assert {c.method for c in cells} == set(results.GPU_METHODS) and {c.ipc for c in cells} == {1, 10, 50}
    assert not {c.path for c in cells} & {c.path for name in ("main", "ablation") for c in results.TABLES[name]()}
    cell = next(c for c in cells if c.key == "datm-gpu-ipc50")
    command = cell.distill_command()
    assert command[command.index("--preset") + 1] == "fashion-gpu"
    # a set made with the GPU preset is up to date; one made with the CPU preset is not that cell
    for preset, drifts in (("fashion-gpu", False), ("fashion-cpu", True)):
        config = dataclasses.asdict(build_config(get_method_class("datm"), preset, {}, ipc=50))
        sset = make_set(channels=1, size=6)
        sset.method, sset.config = "datm", {**config, "seconds": 1.0}
        path = tmp_path / f"{preset}.h5"
        save_synthetic_set(path, sset)
        made_as = dataclasses.replace(cell, path=path)
        assert bool(results.preset_drift(made_as, results.load(made_as))) is drifts
    absent = [dataclasses.replace(c, path=tmp_path / f"{c.key}.h5") for c in cells]
    assert "No set of this table has been made yet" in results.render_gpu(absent)
    sset = make_set(channels=1, size=6)
    sset.method, sset.config = absent[0].method, {"seconds": 600.0}
    save_synthetic_set(absent[0].path, sset)
    append_evaluation(absent[0].path, _record("mtt", 1000, 5, "convnet", 0.8))
    table = results.render_gpu(absent)
    assert "80.00 ± 0.00" in table and "not run" in table
    if not torch.cuda.is_available():  # a CPU would take days over the GPU presets: refused at once
        done = subprocess.run([sys.executable, str(SCRIPT), "run", "--table", "gpu"], capture_output=True, text=True)
        assert done.returncode == 2 and "machine with CUDA" in done.stderr
