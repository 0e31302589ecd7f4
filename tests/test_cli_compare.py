"""`ddtool methods NAME` (every setting with its meaning), `ddtool compare` (sets side by side by
their recorded evaluations, never mixing protocols) and `--json` on info, compare and evaluate."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from ddtool.cli import actions, commands  # noqa: F401  (registers the commands)
from ddtool.cli.main import cli
from ddtool.evaluation import get_protocol
from ddtool.methods import build_config, get_method_class, list_methods
from ddtool.methods.settings import meaning_of, missing_meanings, setting
from ddtool.methods.trajectory_config import TrajectoryConfig
from ddtool.storage import load_synthetic_set

from test_cli import _fashion_set, ddtool, ok, user_error


def run(*args):
    """The command in this process (click's runner): stdout and stderr apart, the exit code."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="ddtool")


def ran(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(result, *phrases):
    """Exit 2 with the CLI's one-paragraph message, no traceback."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert result.stderr.startswith("Error") and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in " ".join(result.stderr.split()), result.stderr
    return result


# ---- every setting has a meaning -----------------------------------------------------------
def test_every_setting_of_every_registered_method_has_a_meaning():
    for name in list_methods():
        config_class = get_method_class(name).config_class
        assert missing_meanings(config_class) == [], f"{name} ({config_class.__name__}): settings without a meaning"


def test_the_meaning_check_finds_a_setting_without_one():
    @dataclass(frozen=True)
    class Explained:
        steps: int = setting(3, "how many steps")

    @dataclass(frozen=True)
    class Unexplained(Explained):
        steps: int = 5  # a new default without the meaning: the listing would lose it
        rate: float = 0.1
        blank: float = setting(0.2, " ")
        two_lines: bool = setting(True, "one\ntwo")

    assert missing_meanings(Explained) == []
    assert missing_meanings(Unexplained) == ["steps", "rate", "blank", "two_lines"]


def test_meanings_change_no_setting():
    # field metadata leaves the dataclass as it was: defaults, order, equality, replace
    config = TrajectoryConfig()
    assert config.match_span_epochs == 2 and config.expert_train_epochs == 20 and config.backend == "auto"
    assert dataclasses.replace(config, syn_steps=5) == TrajectoryConfig(syn_steps=5)
    assert [f.name for f in dataclasses.fields(TrajectoryConfig)][:3] == ["arch", "width", "depth"]
    datm = get_method_class("datm").config_class
    assert datm().labels == "learned" and meaning_of(datm, "labels") == meaning_of(TrajectoryConfig, "labels")


# ---- ddtool methods NAME --------------------------------------------------------------------
def _rows(text: str) -> dict[str, str]:
    """The settings table's rows by setting name."""
    body = text.split("\nsetting ", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0]: line for line in body.splitlines()[1:]}


def test_methods_name_lists_every_setting_with_type_default_preset_value_and_meaning():
    text = ran(run("methods", "datm", "--ipc", 10)).stdout
    assert "values of preset fashion-cpu-ipc10 (fashion-cpu's variant for --ipc 10)" in text
    rows = _rows(text)
    assert set(rows) == {f.name for f in dataclasses.fields(get_method_class("datm").config_class)}
    # type, default, the IPC-10 variant's value (marked as changed), meaning
    assert rows["max_start_epoch_final"].split()[:4] == ["max_start_epoch_final", "int", "0", "16"]
    assert "*" in rows["max_start_epoch_final"] and "T⁺" in rows["max_start_epoch_final"]
    assert rows["zca"].split()[:4] == ["zca", "bool", "false", "false"] and "*" not in rows["zca"]
    # the two expert spans say which is which
    assert "M, the matching span" in rows["match_span_epochs"]
    assert "E, how long each expert is trained" in rows["expert_train_epochs"]
    assert "The two expert spans: match_span_epochs is M" in " ".join(text.split())
    # the base preset without --ipc
    assert _rows(ran(run("methods", "datm")).stdout)["max_start_epoch_final"].split()[3] == "4"


def test_methods_name_json_gives_the_configuration_distill_would_start_from():
    for method, preset, ipc in (("mtt", None, 1), ("ftd", "fashion-gpu", 50), ("cda", None, None),
                                ("herding", None, None), ("mtt", "mtt-cifar10-ipc10", 10)):
        args = ["methods", method, "--json"] + (["--preset", preset] if preset else []) + (
            ["--ipc", ipc] if ipc else [])
        described = json.loads(ran(run(*args)).stdout)
        config = build_config(get_method_class(method), preset, {}, ipc=ipc)
        assert {s["name"]: s["value"] for s in described["settings"]} == dataclasses.asdict(config)
        assert all(s["meaning"] and s["type"] for s in described["settings"])
    described = json.loads(ran(run("methods", "mtt", "--ipc", 1, "--json")).stdout)
    assert described["preset"] == "fashion-cpu-ipc1" and described["named_preset"] == "fashion-cpu"
    assert json.loads(ran(run("methods", "random", "--json")).stdout)["settings"] == []


def test_methods_without_a_name_lists_the_methods_as_before():
    text = ran(run("methods")).stdout
    assert any(line.startswith("datm ") and "protocol datm" in line and "fashion-cpu (default)" in line
               for line in text.splitlines())
    listing = json.loads(ran(run("methods", "--json")).stdout)
    assert {entry["name"] for entry in listing} == set(list_methods())


def test_methods_refuses_what_it_cannot_show():
    refused(run("methods", "nope"), "Unknown method 'nope'", "datm")
    refused(run("methods", "datm", "--preset", "nope"), "no preset 'nope'", "fashion-cpu")
    refused(run("methods", "--ipc", 10), "name the method")


# ---- ddtool compare -------------------------------------------------------------------------
def _record(protocol="mtt", arch="convnet", runs=(0.70, 0.72), baseline=(0.60, 0.64), **protocol_changes):
    record = {"protocol": get_protocol(protocol).with_overrides(**protocol_changes).to_dict(), "arch": arch,
              "runs": list(runs)}
    if baseline is not None:
        record["baselines"] = {"random_subset": {"runs": list(baseline), "mean": sum(baseline) / len(baseline),
                                                 "std": abs(baseline[0] - baseline[1]) / 2}}
    return record


@pytest.fixture
def sets(tmp_path):
    """Four small sets: two under mtt on one network (comparable), one of them also under
    classic, one under mtt on another network and with a shorter mtt, and one never evaluated."""
    paths = {name: tmp_path / f"{name}.h5" for name in ("a", "b", "c", "bare")}
    _fashion_set(paths["a"], method="mtt", evaluations=[_record(runs=(0.80, 0.82))],
                 timings={"experts_s": 60.0, "distill_s": 125.0, "total_s": 185.0, "hardware": "Test CPU"})
    _fashion_set(paths["b"], method="datm", evaluations=[
        _record(runs=(0.50, 0.50)), _record(runs=(0.75, 0.77)),  # the earlier record of one evaluation
        _record("classic", runs=(0.61, 0.63))])
    _fashion_set(paths["c"], method="herding", evaluations=[_record(arch="vgg11", runs=(0.66, 0.68)),
                                                            _record(runs=(0.90, 0.90), epochs=5)])
    _fashion_set(paths["bare"], method="random")
    return paths


def test_compare_groups_by_protocol_and_network_and_never_mixes_them(sets):
    text = ran(run("compare", sets["a"], sets["b"], sets["c"], sets["bare"])).stdout
    flat = " ".join(text.split())
    assert "fall into 4 groups" in flat and "an accuracy compares only with those of its own group" in flat
    groups = text.split("\nprotocol ")[1:]
    assert [g.splitlines()[0] for g in groups] == [
        "mtt, network convnet, dataset fashion-mnist", "classic, network convnet, dataset fashion-mnist",
        "mtt, network vgg11, dataset fashion-mnist", "mtt (epochs 5), network convnet, dataset fashion-mnist"]
    mtt = groups[0]
    assert "81.00 ± 1.00" in mtt and "62.00 ± 2.00" in mtt and "3m 05s" in mtt  # mean ± std, baseline, cost
    assert "76.00 ± 1.00" in mtt and "50.00" not in text  # the latest record of an evaluation
    assert str(sets["c"]) not in mtt and "90.00" in groups[3]  # a shorter protocol is not the protocol
    assert "62.00 ± 1.00" in groups[1] and str(sets["a"]) not in groups[1]
    assert f"{sets['bare']}: no recorded evaluation; `ddtool evaluate {sets['bare']}` makes one." in text
    assert "1 older record" in flat


def test_compare_protocol_picks_one_evaluation_of_each_set(sets):
    text = ran(run("compare", sets["a"], sets["b"], sets["c"], "--protocol", "classic")).stdout
    assert "62.00 ± 1.00" in text and "81.00" not in text and "fall into" not in text
    flat = " ".join(text.split())
    assert f"{sets['a']}: no evaluation under the classic protocol (its records: mtt); `ddtool evaluate " \
           f"{sets['a']} --protocol classic` makes one." in flat
    # one group of mtt rows, the variant with 5 epochs apart
    comparison = json.loads(ran(run("compare", sets["a"], sets["b"], sets["c"], "--protocol", "mtt",
                                    "--json")).stdout)
    assert comparison["mixed"] and [len(g["rows"]) for g in comparison["groups"]] == [2, 1, 1]


def test_compare_json_and_csv_are_machine_readable(sets):
    result = ran(run("compare", sets["a"], sets["b"], sets["bare"], "--json"))
    comparison = json.loads(result.stdout)  # stdout is the JSON alone
    assert comparison["sets"] == 3 and comparison["mixed"] is True
    first = comparison["groups"][0]
    assert (first["protocol"], first["network"], first["dataset"]) == ("mtt", "convnet", "fashion-mnist")
    row = first["rows"][0]
    assert row["set"] == str(sets["a"]) and row["method"] == "mtt" and row["ipc"] == 2 and row["runs"] == 2
    assert row["mean"] == pytest.approx(0.81) and row["random_subset"]["mean"] == pytest.approx(0.62)
    assert row["cost_s"] == 185.0 and row["timings"]["hardware"] == "Test CPU"
    assert row["bytes"] == 20 * 28 * 28 * 4 + 20 * 8  # float32 images, int64 labels
    assert comparison["unevaluated"] == [{"set": str(sets["bare"]), "reason": "no recorded evaluation",
                                          "command": f"ddtool evaluate {sets['bare']}"}]
    rows = list(csv.DictReader(io.StringIO(ran(run("compare", sets["a"], sets["b"], "--csv")).stdout)))
    assert [(r["set"], r["protocol"], r["group"]) for r in rows] == [
        (str(sets["a"]), "mtt", "0"), (str(sets["b"]), "mtt", "0"), (str(sets["b"]), "classic", "1")]
    refused(run("compare", sets["a"], "--json", "--csv"), "choose one")


def test_compare_reads_networks_spelt_two_ways_as_one(tmp_path):
    _fashion_set(tmp_path / "x.h5", evaluations=[_record(arch="convnetw32")])
    _fashion_set(tmp_path / "y.h5", evaluations=[_record(arch="convnet:width=32")])
    comparison = json.loads(ran(run("compare", tmp_path / "x.h5", tmp_path / "y.h5", "--json")).stdout)
    assert not comparison["mixed"] and len(comparison["groups"][0]["rows"]) == 2


def test_compare_refuses_a_missing_file_or_one_that_is_not_a_set(tmp_path, sets):
    refused(run("compare", sets["a"], tmp_path / "missing.h5"), "missing.h5 does not exist")
    (tmp_path / "notes.h5").write_text("not a set")
    refused(run("compare", sets["a"], tmp_path / "notes.h5"), "notes.h5 is not an HDF5 file")


def test_compare_through_a_subprocess(sets, tmp_path):
    """The command as a user runs it: the table, JSON alone on stdout, one paragraph and exit 2."""
    text = ok(ddtool("compare", sets["a"], sets["b"], sets["bare"])).stdout
    assert "protocol mtt, network convnet" in text and "81.00 ± 1.00" in text and "no recorded evaluation" in text
    result = ok(ddtool("compare", sets["a"], sets["b"], "--protocol", "mtt", "--json"))
    comparison = json.loads(result.stdout)
    assert [row["method"] for row in comparison["groups"][0]["rows"]] == ["mtt", "datm"]
    user_error(ddtool("compare", tmp_path / "nothing.h5"), "nothing.h5 does not exist")
    assert "compare" in ok(ddtool("--help")).stdout


# ---- --json on info and evaluate ------------------------------------------------------------
def test_info_json_is_the_sets_record(sets):
    summary = json.loads(ran(run("info", sets["b"], "--json")).stdout)
    sset = load_synthetic_set(sets["b"])
    assert summary["method"] == "datm" and summary["ipc"] == 2 and summary["dataset"] == "fashion-mnist"
    assert summary["classes"] == sset.classes and summary["config"] == sset.config
    assert summary["image_shape"] == [1, 28, 28] and summary["timings"] is None
    assert [e["protocol_label"] for e in summary["evaluations"]] == ["mtt", "mtt", "classic"]
    assert summary["evaluations"][1]["runs"] == [0.75, 0.77]
    refused(run("info", sets["a"].with_name("gone.h5"), "--json"), "gone.h5 does not exist")


def test_evaluate_json_prints_the_report_alone_on_stdout(tmp_path, fashion_root):
    path = tmp_path / "e.h5"
    _fashion_set(path)
    result = ok(ddtool("evaluate", path, "--protocol", "classic", "--runs", 1, "--epochs", 1, "--no-baselines",
                       "--data-root", fashion_root, "-q", "--json"))
    report = json.loads(result.stdout)  # nothing but the JSON
    assert report["set"] == str(path) and report["recorded"] is True
    [evaluation] = report["evaluations"]
    assert evaluation["protocol_label"] == "classic (epochs 1, runs 1)" and evaluation["arch"] == "convnet"
    assert len(evaluation["runs"]) == 1 and 0 <= evaluation["mean"] <= 1
    assert "Evaluating" in result.stderr  # what is said on the way goes to stderr
    assert load_synthetic_set(path).evaluations[0]["runs"] == evaluation["runs"]
    # ... and compare reads it back
    compared = json.loads(ok(ddtool("compare", path, "--json")).stdout)
    assert compared["groups"][0]["protocol"] == "classic (epochs 1, runs 1)"


@pytest.mark.parametrize("set_runs,warned", [((0.58, 0.60), True), ((0.62, 0.66), False)])
def test_evaluate_warns_when_the_set_does_not_beat_random_real_images(tmp_path, monkeypatch, set_runs, warned):
    """A distilled set no better than random real images of its size (small images, say) says so."""
    from ddtool.evaluation.evaluate import Accuracies
    from ddtool.evaluation.sets import EvaluationReport

    path = tmp_path / "w.h5"
    _fashion_set(path)
    report = EvaluationReport(protocol=get_protocol("classic"), arch="convnet", lr=0.01, labels="hard",
                              synthetic=Accuracies(list(set_runs)), random_subset=Accuracies([0.60, 0.62]))
    monkeypatch.setattr(actions, "evaluate_file", lambda *a, **k: [report])
    result = ran(run("evaluate", path, "--no-record", "-q"))
    said = " ".join(result.stderr.split())
    assert ("WARNING: on convnet this set scores no better than random real images" in said) is warned
    as_json = json.loads(ran(run("evaluate", path, "--no-record", "-q", "--json")).stdout)
    assert as_json["evaluations"][0]["beats_random_subset"] is (not warned)


def test_info_marks_an_evaluation_no_better_than_random_real_images(tmp_path):
    path = tmp_path / "i.h5"
    _fashion_set(path, evaluations=[_record(runs=(0.80, 0.82)), _record("classic", runs=(0.58, 0.60))])
    lines = [line for line in ran(run("info", path)).stdout.splitlines() if "evaluation " in line]
    assert ["NO BETTER THAN RANDOM" in line for line in lines] == [False, True]


# ---- ddtool --help without the commands -----------------------------------------------------
def test_help_imports_no_torch_and_reads_as_with_everything_loaded():
    """`ddtool --help` answers from main.SUMMARIES and the commands' --help from their
    declarations (torch takes seconds to import): what they print is what they print with
    everything loaded, and the names the options offer are the registries'."""
    probe = ("import json, sys; from click.testing import CliRunner; from ddtool.cli.main import cli; "
             "asked = [[], ['distill', '--help'], ['evaluate', '--help'], ['import', '--help'], ['--help']]; "
             "out = [CliRunner().invoke(cli, a, prog_name='ddtool').output for a in asked]; "
             "print(json.dumps(['torch' in sys.modules, out]))")
    lazy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    imported_torch, lazy_helps = json.loads(lazy)
    assert imported_torch is False
    from ddtool import distributed
    from ddtool.cli import buffer  # noqa: F401  (loads the buffer commands too)
    from ddtool.cli import names
    from ddtool.cli.main import DIST_BACKENDS, SUMMARIES
    from ddtool.data import DEFAULT_DATASET
    from ddtool.evaluation import PROTOCOLS
    from ddtool.storage import EXPORT_FORMATS, IMPORT_FORMATS
    from ddtool.training import PRECISIONS

    assert set(SUMMARIES) == set(cli.commands) and DIST_BACKENDS == distributed.BACKENDS
    assert all(cli.commands[name].short_help == summary for name, summary in SUMMARIES.items())
    from ddtool.data import list_specs
    from ddtool.methods import list_methods
    from ddtool.networks import list_networks

    assert (names.DEFAULT_DATASET, names.PROTOCOL_NAMES, names.PRECISIONS, names.EXPORT_FORMATS,
            names.IMPORT_FORMATS) == (DEFAULT_DATASET, tuple(sorted(PROTOCOLS)), PRECISIONS, EXPORT_FORMATS,
                                      IMPORT_FORMATS)
    assert names.METHOD_NAMES == tuple(list_methods())
    assert names.DATASET_NAMES == tuple(spec.name for spec in list_specs())
    assert names.NETWORK_NAMES == tuple(list_networks())
    for asked, lazy_help in zip([[], ["distill", "--help"], ["evaluate", "--help"], ["import", "--help"],
                                 ["--help"]], lazy_helps):
        assert "Usage: ddtool" in lazy_help and lazy_help == run(*asked).output


def test_shell_completion_offers_the_registries_names():
    env = {**os.environ, "_DDTOOL_COMPLETE": "bash_complete"}
    asked = [(["distill", "--method", "d"], {"datm"}),
             (["evaluate", "x.h5", "--arch", "resnet18-b"], {"resnet18-bn", "resnet18-bn-ap"}),
             (["distill", "--protocol", "kd"], {"kd", "kd-tiny"}), (["dis"], {"distill"})]
    for words, offered in asked:
        answer = subprocess.run([sys.executable, "-m", "ddtool"], capture_output=True, text=True, check=True,
                                env={**env, "COMP_WORDS": " ".join(["ddtool", *words]), "COMP_CWORD": str(len(words))})
        assert {line.split(",", 1)[1] for line in answer.stdout.splitlines()} == offered, answer.stdout
