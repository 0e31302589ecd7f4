"""The Python API (`ddtool.load/distill/evaluate/test_split`), on a tiny Fashion-MNIST in its real format."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ddtool
from ddtool.errors import ConfigError


def test_import_ddtool_stays_light():
    code = "import sys, ddtool; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_distill_save_load_evaluate_and_train_on_the_set(tmp_path, fashion_root):
    out = tmp_path / "r.h5"
    messages = []
    sset = ddtool.distill("random", ipc=2, data_root=fashion_root, output=out, progress=False, log=messages.append)
    assert out.exists() and sset.num_images == 20 and sset.timings["experts_s"] == 0.0
    loaded = ddtool.load(out)
    assert torch.equal(loaded.images, sset.images) and loaded.timings == sset.timings
    # a torch Dataset in network space, and the test images in the same space
    images, targets = loaded.to_dataset()[:]
    assert images.shape == (20, 1, 28, 28) and torch.equal(targets, loaded.labels)
    test = ddtool.test_split(loaded, data_root=fashion_root)
    assert len(test) == 30 and test[0][0].shape == (1, 28, 28)
    assert abs(float(test.tensors[0].mean())) < 1.0  # normalised like the set, not raw pixels
    # an existing file is replaced only when asked
    with pytest.raises(ConfigError, match="overwrite=True"):
        ddtool.distill("random", ipc=2, data_root=fashion_root, output=out, progress=False)
    [report] = ddtool.evaluate(out, protocol="classic", runs=1, epochs=1, baselines=False, data_root=fashion_root,
                               progress=False)
    assert len(report.synthetic.runs) == 1 and 0 <= report.synthetic.mean <= 1
    assert ddtool.load(out).evaluations[0]["mean"] == pytest.approx(report.synthetic.mean)


def test_soft_labels_become_probabilities_in_the_dataset(tmp_path, fashion_root):
    sset = ddtool.distill("random", ipc=1, data_root=fashion_root, progress=False)
    sset.labels, sset.label_kind, sset.label_temperature = torch.randn(10, 10), "logits", 2.0
    _, targets = sset.to_dataset()[:]
    assert torch.allclose(targets.sum(dim=1), torch.ones(10))
    assert torch.allclose(targets, torch.softmax(sset.labels / 2.0, dim=1))


def test_a_budget_is_checked_before_any_work(fashion_root):
    with pytest.raises(ConfigError, match="too small"):
        ddtool.distill("mtt", ipc=1, budget="3s", data_root=fashion_root, settings={"width": 8}, progress=False)
    with pytest.raises(ConfigError, match="has no settings to size"):
        ddtool.distill("random", ipc=1, budget="3m", data_root=fashion_root, progress=False)


def test_a_run_on_data_already_prepared_keeps_its_log_in_the_folder_given(tmp_path, fashion_root):
    """What scripts that run many cells use: the data prepared once, a work folder of their own."""
    from ddtool.data import prepare
    from ddtool.run import prepare_distill

    data = prepare("fashion-mnist", fashion_root)
    run = prepare_distill("random", ipc=1, data=data, work_dir=tmp_path / "cell", progress=False, log=lambda m: None)
    assert run.data is data and run.work_dir == tmp_path / "cell"
    sset = run.distill()
    assert sset.num_images == 10 and sset.config["seconds"] >= 0 and sset.timings["hardware"]
    # a whitening method is refused data prepared without whitening (and the other way round)
    with pytest.raises(ConfigError, match="zca=True"):
        prepare_distill("mtt", ipc=1, settings={"zca": True, "width": 8}, data=data, work_dir=tmp_path / "zca")
