"""Evaluation: fresh networks per run, and the cached baselines (random subset, whole dataset)."""

from __future__ import annotations

import pytest

from conftest import tiny_prepared
from ddtool import evaluation
from ddtool.evaluation import baselines, sets
from ddtool.evaluation import evaluate as runs_module
from ddtool.seeding import derive_seed
from ddtool.evaluation import get_protocol
from ddtool.storage import SyntheticSet

ARCH = "convnet:width=4"


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=4)


@pytest.fixture
def trainings(monkeypatch):
    """Counts the networks trained, to tell a computed baseline from a cached one."""
    count = {"networks": 0}
    real = runs_module.train_fresh_network

    def counting(*args, **kwargs):
        count["networks"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_module, "train_fresh_network", counting)
    return count


def small(name: str):
    return get_protocol(name).with_overrides(epochs=2, runs=2, reference_epochs=1)


def test_whole_dataset_reference_is_computed_once_and_shared_by_equal_recipes(data, trainings):
    mtt, datm = small("mtt"), small("datm")
    assert mtt.batch_size != datm.batch_size  # they differ on synthetic sets only
    assert evaluation.whole_dataset_reference(data, protocol=mtt, arch=ARCH, progress=False,
                                              compute_if_missing=False) is None
    assert trainings["networks"] == 0
    first = evaluation.whole_dataset_reference(data, protocol=mtt, arch=ARCH, progress=False)
    assert trainings["networks"] == 1 and len(first.runs) == 1
    # datm's reference trains exactly as mtt's (reference batch size, epochs, lr): the cache serves it
    shared = evaluation.whole_dataset_reference(data, protocol=datm, arch=ARCH, progress=False,
                                                compute_if_missing=False)
    assert shared is not None and shared.runs == first.runs and trainings["networks"] == 1
    # a different recipe (here more reference epochs) is another reference
    longer = mtt.with_overrides(reference_epochs=2)
    assert evaluation.whole_dataset_reference(data, protocol=longer, arch=ARCH, progress=False,
                                              compute_if_missing=False) is None


def test_random_subset_baseline_draws_per_run_and_is_cached(data, trainings):
    protocol = small("classic")
    first = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, progress=False)
    assert trainings["networks"] == 2 and len(first.runs) == 2
    again = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, progress=False,
                                              compile=True)
    assert again.runs == first.runs and trainings["networks"] == 2
    # the cached result says how it was computed (eagerly), not how the later caller would have
    assert first.compiled is False and again.compiled is False and again.to_dict()["compiled"] is False
    # another IPC or seed is another baseline
    evaluation.random_subset_baseline(data, ipc=2, protocol=protocol, arch=ARCH, progress=False)
    assert trainings["networks"] == 4


def test_an_evaluation_repeats_exactly_from_its_seed(data):
    protocol = small("classic")
    images, labels = data.train_x[:20], data.train_y[:20]
    twice = [evaluation.evaluate_images(images, labels, data, protocol=protocol, lr=0.01, arch=ARCH, seed=3,
                                        progress=False).runs for _ in range(2)]
    assert twice[0] == twice[1]


def test_a_run_can_be_replayed_from_its_parts(data):
    # scripts/dead_units.py replays evaluation runs from fresh_network, fit_network and
    # random_subset: they must train exactly what the baseline's run r trained.
    from ddtool.training import accuracy

    protocol = small("mtt")
    baseline = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=5, progress=False)
    for run in range(protocol.runs):
        images, labels = evaluation.random_subset(data, ipc=1, protocol=protocol, seed=5, run=run)
        net = evaluation.fresh_network(ARCH, data, derive_seed(5, "run", run))
        evaluation.fit_network(net, images, labels, data, protocol=protocol, lr=protocol.lr,
                               seed=derive_seed(5, "run", run))
        assert accuracy(net, data.test_x, data.test_y) == baseline.runs[run]
    draws = [evaluation.random_subset(data, ipc=1, protocol=protocol, seed=5, run=run)[0] for run in range(2)]
    assert not (draws[0] == draws[1]).all()  # each run its own draw, replayed as such


def test_compiled_networks_train_like_eager_ones(data, monkeypatch):
    import torch

    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(type(net).__name__) or real_compile(net, **kw))
    protocol = small("mtt")  # DSA and the lr decay on the way
    images, labels = data.train_x[:20], data.train_y[:20]
    runs = {compile: evaluation.evaluate_images(images, labels, data, protocol=protocol, lr=0.01, arch=ARCH, seed=3,
                                                progress=False, compile=compile).runs for compile in (False, True)}
    assert len(compiled) == 2  # one fresh network per run, each compiled; none in the eager pass
    # the same training fused into other kernels: at most a rounding-flipped test prediction apart
    assert runs[True] == pytest.approx(runs[False], abs=1 / data.test_y.shape[0] + 1e-9)
    sset = SyntheticSet(images=images, labels=labels, classes=list(data.spec.classes), preprocessing=data.preprocessing,
                        dataset=data.spec.name, ipc=2, method="mtt")
    for compile in (False, True):
        report = evaluation.evaluate_set(sset, data, protocol=protocol, arch=ARCH, seed=3, baselines=False,
                                         reference=False, progress=False, compile=compile)
        assert report.to_record()["compiled"] is compile and report.synthetic.runs == runs[compile]


def test_a_baseline_computed_elsewhere_meanwhile_is_waited_for_not_recomputed():
    import threading

    key = {"kind": "test", "n": 1}
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow() -> evaluation.Accuracies:  # the first process's computation, held open by the test
        calls.append("first")
        started.set()
        release.wait(timeout=30)
        return evaluation.Accuracies([0.5, 0.7])

    first = threading.Thread(target=lambda: baselines._cached(key, slow))
    first.start()
    assert started.wait(timeout=30)
    results = []
    second = threading.Thread(target=lambda: results.append(
        baselines._cached(key, lambda: calls.append("second") or evaluation.Accuracies([0.0]))))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and not results  # waits on the first one's lock
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert calls == ["first"] and results[0].runs == [0.5, 0.7]


def _kept_runs():
    from ddtool.paths import cache_root

    return sorted(p.name for p in (cache_root() / "evaluations").glob("*/run-*.json"))


def test_an_interrupted_evaluation_resumes_from_the_runs_it_finished(data, monkeypatch):
    protocol = small("mtt").with_overrides(runs=3)
    images, labels = data.train_x[:20], data.train_y[:20]
    key = {"kind": "test", "what": "these 20 images"}
    # A stand-in network whose accuracy is its seed's: every run scores differently, so a run
    # read back in the wrong place, or trained again with another seed, shows.
    trained: list[int] = []
    interrupt_at = {"call": None}

    def train(*args, seed, **kwargs):
        trained.append(seed)
        if len(trained) == interrupt_at["call"]:
            raise KeyboardInterrupt
        return (seed % 1000) / 1000

    monkeypatch.setattr(runs_module, "train_fresh_network", train)

    def evaluate(seed=3, **kwargs):
        return evaluation.evaluate_images(images, labels, data, protocol=protocol, lr=0.01, arch=ARCH, seed=seed,
                                          progress=False, checkpoint={**key, "seed": seed}, **kwargs)

    uninterrupted = evaluate()
    assert len(set(uninterrupted.runs)) == 3 and _kept_runs() == []  # kept only until the evaluation is done

    trained.clear()
    interrupt_at["call"] = 3
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    assert _kept_runs() == ["run-0.json", "run-1.json"]

    trained.clear()
    interrupt_at["call"] = None
    other = evaluate(seed=4, resume=True)  # another checkpoint key does not take them
    assert len(trained) == 3 and set(other.runs).isdisjoint(uninterrupted.runs)
    trained.clear()
    resumed = evaluate(resume=True)
    assert trained == [derive_seed(3, "run", 2)]  # only the third run is trained again
    assert resumed.runs == uninterrupted.runs and _kept_runs() == []
    assert resumed.resumed == [0, 1] and resumed.to_dict()["resumed_runs"] == [0, 1]
    assert uninterrupted.resumed == [] and "resumed_runs" not in uninterrupted.to_dict()


def test_without_resume_an_evaluation_trains_every_run_again(data, trainings, monkeypatch):
    protocol = small("classic").with_overrides(runs=2)
    images, labels = data.train_x[:20], data.train_y[:20]
    key = {"kind": "test"}
    finished = evaluation.FinishedRuns(key, runs=2)
    finished.keep(0, 0.123, 1.0)  # as if an interrupted evaluation had left it
    fresh = evaluation.evaluate_images(images, labels, data, protocol=protocol, lr=0.01, arch=ARCH, seed=3,
                                       progress=False, checkpoint=key)
    assert trainings["networks"] == 2 and fresh.runs[0] != 0.123 and _kept_runs() == []


@pytest.mark.parametrize("protocol, used", [("mtt", 0.03), ("datm", 0.03), ("classic", 0.01)])
def test_the_learned_lr_trains_the_networks_only_under_protocols_that_use_it(data, monkeypatch, protocol, used):
    # 0.03: neither protocol's own lr (0.01), so the lr that reaches the training tells which was used
    sset = SyntheticSet(images=data.train_x[:20], labels=data.train_y[:20], classes=list(data.spec.classes),
                        preprocessing=data.preprocessing, dataset=data.spec.name, ipc=2, method="mtt",
                        learned_lr=0.03)
    assert get_protocol(protocol).lr == 0.01
    trained_with = []
    real = runs_module.train_fresh_network

    def recording(*args, **kwargs):
        trained_with.append(kwargs["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_module, "train_fresh_network", recording)
    report = evaluation.evaluate_set(sset, data, protocol=get_protocol(protocol).with_overrides(epochs=1, runs=1),
                                     arch=ARCH, progress=False, baselines=False, reference=False)
    assert trained_with == [used] and report.lr == used


def test_a_sets_checkpoint_key_follows_what_its_networks_learn_from(data):
    images, labels = data.train_x[:20].clone(), data.train_y[:20]
    sset = SyntheticSet(images=images, labels=labels, classes=list(data.spec.classes), preprocessing=data.preprocessing,
                        dataset=data.spec.name, ipc=2, method="mtt", learned_lr=0.01)
    protocol = small("mtt")

    def key(s, **kw):
        return sets._set_checkpoint(s, data, kw.get("protocol", protocol), kw.get("arch", ARCH),
                                          kw.get("seed", 0), kw.get("compile", False))

    base = key(sset)
    assert key(sset) == base
    from dataclasses import replace

    changed = [replace(sset, images=images + 1e-3), replace(sset, learned_lr=0.02),
               replace(sset, config={"iterations": 7}, method="datm")]
    assert [key(s) == base for s in changed] == [False, False, True]  # provenance is not what networks learn from
    assert key(sset, seed=1) != base and key(sset, compile=True) != base and key(sset, arch="convnet:width=8") != base
    assert key(sset, protocol=protocol.with_overrides(epochs=3)) != base


def test_a_sets_runs_are_kept_until_its_report_is_stored_and_a_baselines_until_cached(data, trainings):
    protocol = small("classic")
    sset = SyntheticSet(images=data.train_x[:20], labels=data.train_y[:20], classes=list(data.spec.classes),
                        preprocessing=data.preprocessing, dataset=data.spec.name, ipc=2, method="random")
    evaluation.evaluate_set(sset, data, protocol=protocol, arch=ARCH, progress=False, reference=False)
    assert _kept_runs() == []  # by default nothing stays once all ran
    report = evaluation.evaluate_set(sset, data, protocol=protocol, arch=ARCH, progress=False, reference=False,
                                     keep_runs=True)
    # the baseline is in its cache and needs no kept runs; the set's wait for the report's record
    assert report.random_subset is not None and _kept_runs() == ["run-0.json", "run-1.json"]
    [(key, runs)] = evaluation.kept_runs_of_set(sset)  # what `run_results.py plan` shows
    assert runs == [0, 1] and key["arch"] == ARCH and key["protocol"]["name"] == "classic"
    trained = trainings["networks"]
    resumed = evaluation.evaluate_set(sset, data, protocol=protocol, arch=ARCH, progress=False, reference=False,
                                      resume=True, keep_runs=True)
    assert trainings["networks"] == trained  # both read back: the set's kept runs, the cached baseline
    assert resumed.synthetic.runs == report.synthetic.runs
    report.release_kept_runs()
    assert _kept_runs() == [] and evaluation.kept_runs_of_set(sset) == []


def test_protocols_that_train_subsets_alike_share_one_random_baseline(data, trainings):
    mtt, datm = small("mtt"), small("datm")
    first = evaluation.random_subset_baseline(data, ipc=1, protocol=mtt, arch=ARCH, progress=False)
    assert trainings["networks"] == 2
    # 10 images: batch 256 and 128 are both the whole subset in one step, so the runs are the same
    assert evaluation.random_subset_baseline(data, ipc=1, protocol=datm, arch=ARCH, progress=False).runs == first.runs
    assert trainings["networks"] == 2
    # a batch smaller than the subset trains differently: another baseline
    evaluation.random_subset_baseline(data, ipc=1, protocol=mtt.with_overrides(batch_size=4), arch=ARCH,
                                      progress=False)
    assert trainings["networks"] == 4


def _keyed_by_protocol(key: dict, protocol) -> dict:
    """A random baseline's key as caches written before keys named the recipe had it."""
    return {k: v for k, v in key.items() if k != "recipe"} | {"protocol": protocol.to_dict()}


def test_baselines_cached_under_the_protocols_name_are_still_found(data, trainings, monkeypatch):
    import json

    from ddtool.paths import cache_dir, key_digest

    mtt, datm = small("mtt"), small("datm")
    computed = evaluation.random_subset_baseline(data, ipc=1, protocol=mtt, arch=ARCH, seed=9, progress=False)
    [path] = [p for p in cache_dir("baselines").glob("*.json") if json.loads(p.read_text())["key"].get("seed") == 9]
    entry = json.loads(path.read_text())
    legacy = _keyed_by_protocol(entry["key"], mtt)
    path.unlink()
    (path.parent / f"{key_digest(legacy)}.json").write_text(json.dumps({**entry, "key": legacy}))
    trained = trainings["networks"]
    # a protocol that trains subsets as mtt does finds mtt's entry when the registry names mtt
    monkeypatch.setattr(baselines, "PROTOCOLS", {"mtt": mtt})
    found = evaluation.random_subset_baseline(data, ipc=1, protocol=datm, arch=ARCH, seed=9, progress=False)
    assert found.runs == computed.runs and trainings["networks"] == trained
    # an interrupted computation's kept runs are taken over too, and resumed from
    for path in cache_dir("baselines").glob("*.json"):
        if json.loads(path.read_text())["key"].get("seed") == 9:
            path.unlink()
    legacy_runs = runs_module.FinishedRuns({**legacy, "compiled": False}, 2)
    legacy_runs.keep(1, 0.5, 3.0)
    [(key, runs)] = evaluation.kept_runs_of_baselines()  # what `run_results.py plan` lists
    assert runs == [1] and key["protocol"]["name"] == "mtt" and key["ipc"] == 1
    resumed = evaluation.random_subset_baseline(data, ipc=1, protocol=mtt, arch=ARCH, seed=9, progress=False,
                                                resume=True)
    assert resumed.runs == [computed.runs[0], 0.5] and resumed.resumed == [1]
    assert trainings["networks"] == trained + 1 and _kept_runs() == [] and evaluation.kept_runs_of_baselines() == []


def test_baselines_recorded_in_set_files_refill_an_empty_cache(data, trainings, tmp_path):
    import shutil

    from ddtool.paths import cache_dir
    from ddtool.storage import append_evaluation, load_synthetic_set, save_synthetic_set

    mtt = small("mtt")
    path = tmp_path / "set.h5"
    save_synthetic_set(path, SyntheticSet(images=data.train_x[:10], labels=data.train_y[:10],
                                          classes=list(data.spec.classes), preprocessing=data.preprocessing,
                                          dataset=data.spec.name, ipc=1, method="mtt", learned_lr=0.01))
    report = evaluation.evaluate_set(load_synthetic_set(path), data, protocol=mtt, arch=ARCH, seed=5, progress=False,
                                     reference=False)
    append_evaluation(path, report.to_record())
    shutil.rmtree(cache_dir("baselines"))  # a new machine: the cache is empty, the file has the record
    recorded = evaluation.recorded_random_baselines(load_synthetic_set(path), data)
    assert [key["arch"] for _, key, _ in recorded] == [ARCH]
    assert len(evaluation.adopt_recorded_baselines(recorded)) == 1
    assert evaluation.adopt_recorded_baselines(recorded) == []  # cached now: nothing to put back
    trained = trainings["networks"]
    # the set's own protocol, and datm (which trains 10-image subsets alike), read it untrained
    for protocol in (mtt, small("datm")):
        found = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=5, progress=False)
        assert found.runs == report.random_subset.runs and found.seconds == report.random_subset.seconds
    assert trainings["networks"] == trained
    # what the record does not cover is trained: another network
    evaluation.random_subset_baseline(data, ipc=1, protocol=mtt, arch="convnet:width=8", seed=5, progress=False)
    assert trainings["networks"] == trained + 2

    # a cache of later training code puts back none of this code's records, and its own records say so
    import ddtool.evaluation.evaluate as runs_of

    original = runs_of.EVALUATION_REVISION
    try:
        runs_of.EVALUATION_REVISION = 2
        assert evaluation.recorded_random_baselines(load_synthetic_set(path), data) == []
        assert report.to_record()["evaluation_revision"] == 2
    finally:
        runs_of.EVALUATION_REVISION = original
    assert "evaluation_revision" not in report.to_record()


def test_the_newest_record_of_a_baseline_is_the_one_put_back(data):
    key = {"kind": "random_subset", "test": "newest"}
    entry = {"key": key, "runs": [0.5], "seconds": 1.0, "compiled": False, "resumed": []}
    older, newer = ("2026-01-01T00:00:00", key, entry), ("2026-02-01T00:00:00", key, {**entry, "runs": [0.6]})
    assert len(evaluation.adopt_recorded_baselines([older, newer])) == 1
    assert baselines._read_cached(baselines.cache_dir("baselines") / f"{baselines.key_digest(key)}.json",
                                  key).runs == [0.6]


def test_a_baselines_kept_runs_outlive_a_kill_before_its_cache_write(data, trainings, monkeypatch):
    protocol = small("classic")
    real_atomic_path = baselines.atomic_path
    at_cache_write = []

    def killed_at_cache_write(path):
        at_cache_write.append(_kept_runs())
        raise KeyboardInterrupt  # the process dies between the last run and the cache entry

    monkeypatch.setattr(baselines, "atomic_path", killed_at_cache_write)
    with pytest.raises(KeyboardInterrupt):
        evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=11, progress=False)
    assert trainings["networks"] == 2 and at_cache_write == [["run-0.json", "run-1.json"]]
    assert _kept_runs() == ["run-0.json", "run-1.json"]  # both runs wait for a resume

    def watched(path):
        at_cache_write.append(_kept_runs())
        return real_atomic_path(path)

    monkeypatch.setattr(baselines, "atomic_path", watched)
    resumed = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=11, progress=False,
                                                resume=True)
    assert trainings["networks"] == 2 and resumed.resumed == [0, 1]  # nothing trained again
    assert at_cache_write[-1] == ["run-0.json", "run-1.json"] and _kept_runs() == []  # kept until cached
    # the whole-dataset reference keeps its run the same way
    monkeypatch.setattr(baselines, "atomic_path", killed_at_cache_write)
    with pytest.raises(KeyboardInterrupt):
        evaluation.whole_dataset_reference(data, protocol=protocol, arch=ARCH, progress=False)
    assert _kept_runs() == ["run-0.json"]
    monkeypatch.setattr(baselines, "atomic_path", watched)
    evaluation.whole_dataset_reference(data, protocol=protocol, arch=ARCH, progress=False, resume=True)
    assert trainings["networks"] == 3 and _kept_runs() == []


def test_a_set_is_refused_by_a_dataset_it_does_not_fit(data, trainings):
    import torch

    from ddtool.errors import ConfigError

    def a_set(images, classes=None):
        labels = torch.arange(10).repeat_interleave(2)
        return SyntheticSet(images=images, labels=labels, classes=classes or list(data.spec.classes),
                            preprocessing=data.preprocessing, dataset=data.spec.name, ipc=2, method="imported:npz")

    protocol = small("classic")
    fitting = a_set(data.train_x[:20])
    sets.check_set_fits_data(fitting, data)  # the dataset's own shape and classes
    larger = a_set(torch.zeros(20, 1, 12, 12))  # e.g. 32x32 images imported as 28x28 Fashion-MNIST
    with pytest.raises(ConfigError, match=r"images are 1x12x12 .* dataset's are 1x8x8"):
        evaluation.evaluate_set(larger, data, protocol=protocol, arch=ARCH, progress=False, reference=False)
    renamed = a_set(data.train_x[:20], classes=[f"class {i}" for i in range(10)])
    with pytest.raises(ConfigError, match="class names differ.*'class 0' in the set, 'T-shirt/top'"):
        evaluation.evaluate_set(renamed, data, protocol=protocol, arch=ARCH, progress=False, reference=False)
    fewer = SyntheticSet(images=data.train_x[:6], labels=torch.arange(3).repeat_interleave(2),
                         classes=["a", "b", "c"], preprocessing=data.preprocessing, dataset=data.spec.name, ipc=2,
                         method="imported:npz")
    with pytest.raises(ConfigError, match="3 classes where the dataset has 10"):
        evaluation.evaluate_set(fewer, data, protocol=protocol, arch=ARCH, progress=False, reference=False)
    assert trainings["networks"] == 0  # refused before any training


def test_an_overridden_protocol_keeps_its_name_and_shows_its_changes():
    from ddtool.cli.actions import protocol_label

    mtt = get_protocol("mtt")
    changed = mtt.with_overrides(epochs=5, runs=1)
    assert changed.name == "mtt"  # the name labels; records and keys hold every field
    assert protocol_label(changed.to_dict()) == "mtt (epochs 5, runs 1)"
    assert protocol_label(mtt.to_dict()) == "mtt"
    assert protocol_label(get_protocol("kd").with_overrides(lr=0.5).to_dict()) == "kd (lr 0.5)"
    from ddtool.evaluation.protocols import KDSettings

    cooler = get_protocol("kd").with_overrides(kd=KDSettings(temperature=4.0))
    assert protocol_label(cooler.to_dict()) == "kd (kd.temperature 4)"
    old = {k: v for k, v in mtt.to_dict().items() if k != "reference_epochs"}  # recorded before the field
    assert protocol_label(old) == "mtt" and protocol_label({"name": "elsewhere", "epochs": 3}) == "elsewhere"


def test_data_with_other_images_under_the_same_name_is_other_data(data, trainings):
    import dataclasses

    protocol = small("classic")
    first = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=11, progress=False)
    trained = trainings["networks"]
    # same dataset name, preprocessing, sizes and split; one test image differs (files replaced on disk)
    changed_test = data.test_x.clone()
    changed_test[0] += 1.0
    other = dataclasses.replace(data, test_x=changed_test)
    assert runs_module.data_key(other) != runs_module.data_key(data)
    evaluation.random_subset_baseline(other, ipc=1, protocol=protocol, arch=ARCH, seed=11, progress=False)
    assert trainings["networks"] == trained + 2
    # the same tensors again (a fresh copy, as a new process prepares them): the cached result
    same = dataclasses.replace(data, train_x=data.train_x.clone())
    again = evaluation.random_subset_baseline(same, ipc=1, protocol=protocol, arch=ARCH, seed=11, progress=False)
    assert again.runs == first.runs and trainings["networks"] == trained + 2


def test_a_damaged_cache_file_is_computed_again_not_fatal(data, trainings):
    from ddtool.paths import cache_dir

    protocol = small("classic")
    first = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=13, progress=False)
    [path] = [p for p in cache_dir("baselines").glob("*.json") if '"seed": 13' in p.read_text()]
    path.write_text(path.read_text()[:40])  # truncated by a crash of the machine
    trained = trainings["networks"]
    again = evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=13, progress=False)
    assert trainings["networks"] == trained + 2 and again.runs == first.runs
    kept = runs_module.FinishedRuns({"any": "key"}, runs=1)
    kept.keep(0, 0.5, 1.0)
    kept._path(0).write_text("{")
    assert kept.read(0) is None


def test_a_new_training_revision_does_not_reuse_cached_results(data, trainings, monkeypatch):
    protocol = small("classic")
    evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=12, progress=False)
    trained = trainings["networks"]
    assert "revision" not in runs_module.data_key(data)  # entries cached before the revision existed are found
    monkeypatch.setattr(runs_module, "EVALUATION_REVISION", 2)  # a fix changed what training does
    evaluation.random_subset_baseline(data, ipc=1, protocol=protocol, arch=ARCH, seed=12, progress=False)
    assert trainings["networks"] == trained + 2


def test_one_run_shows_no_spread():
    assert str(evaluation.Accuracies([0.5, 0.7])) == "60.00 ± 10.00"
    assert str(evaluation.Accuracies([0.8123])) == "81.23 (1 run)"  # the whole-dataset reference's usual case
