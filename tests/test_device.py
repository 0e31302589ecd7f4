"""ddtool.device: --device names that cannot work are refused before any work."""

from __future__ import annotations

import pytest
import torch

from ddtool.device import resolve_device
from ddtool.errors import ConfigError


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["mps", "meta", "xla", "cpu:1", "gpu"])
def test_devices_ddtool_cannot_run_on_are_refused(name):
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="has 1 CUDA GPU\\(s\\), numbered from 0"):
        resolve_device("cuda:1")
