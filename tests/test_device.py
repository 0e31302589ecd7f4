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


def test_a_cuda_index_beyond_the_machine_is_refused():
    with pytest.raises(ConfigError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
