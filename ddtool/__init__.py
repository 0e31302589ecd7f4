"""ddtool: dataset distillation for image classification.

The Python API mirrors the commands (the same configurations, presets and settings):

    import ddtool
    sset = ddtool.distill("datm", ipc=10, budget="30m", output="fmnist_datm10.h5")
    reports = ddtool.evaluate("fmnist_datm10.h5")           # fresh networks, beside the baselines
    sset = ddtool.load("fmnist_datm10.h5")
    train = sset.to_dataset()                               # a torch Dataset in network space
    test = ddtool.test_split(sset)                          # the matching test images
    again = ddtool.distill(**ddtool.recorded_run("fmnist_datm10.h5"))  # the same run, from the set's record

Architecture, one concern per subpackage, in the order data flows:
data -> networks -> augment -> experts -> matching -> storage -> evaluation -> methods -> run
-> cli. `ddtool.run` is where a run is assembled; the CLI parses and prints over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

__version__ = "0.1.0"

if TYPE_CHECKING:  # imported on use: `import ddtool` stays light (no torch until it is needed)
    import torch

    from ddtool.evaluation import EvaluationReport
    from ddtool.storage import SyntheticSet


def load(path) -> "SyntheticSet":
    """The synthetic set saved at `path` (an HDF5 file written by ddtool)."""
    from ddtool.storage import load_synthetic_set

    return load_synthetic_set(path)


def distill(method: str | None = None, ipc: int = 10, *, dataset: str = "fashion-mnist", preset: str | None = None,
            settings: dict[str, Any] | None = None, budget: str | float | None = None, seed: int = 0,
            device: str = "auto", data_root: str | None = None, output=None, overwrite: bool = False,
            resume: bool = False, progress: bool = True,
            log: Callable[[str], None] | None = None) -> "SyntheticSet":
    """Distill `dataset` into `ipc` images per class with `method` (None: the dataset's default,
    ddtool.run.default_method), as `ddtool distill` does: the method's preset (its variant for
    `ipc`), `settings` changed, optionally sized to a wall-clock `budget` ("30m", or seconds; a
    CPU run on Fashion-MNIST that names no preset gets its default). Saved to `output` when
    given (an existing file only with `overwrite`). Progress bars unless `progress` is False;
    messages go to `log`."""
    from pathlib import Path

    from ddtool.errors import ConfigError
    from ddtool.run import prepare_distill
    from ddtool.storage import save_synthetic_set
    from ddtool.files import check_writable

    if output is not None:
        check_writable(output)
        if Path(output).exists() and not (overwrite or resume):
            raise ConfigError(f"{output} exists; pass overwrite=True to replace it.")
    run = prepare_distill(method, ipc, dataset=dataset, data_root=data_root, preset=preset, settings=settings,
                          budget=budget, seed=seed, device=device, resume=resume, progress=progress,
                          log=log or (lambda message: None))
    sset = run.distill()
    if output is not None:
        save_synthetic_set(output, sset)
    return sset


def evaluate(path, *, protocol: str | None = None, archs: list[str] | None = None, runs: int | None = None,
             epochs: int | None = None, seed: int = 0, baselines: bool = True, reference: bool | None = None,
             record: bool = True, compile: bool = False, resume: bool = False, device: str = "auto",
             data_root: str | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> list["EvaluationReport"]:
    """Train fresh networks on the set saved at `path`, as `ddtool evaluate` does: one report
    per network (`.synthetic`, `.random_subset`, `.whole_dataset`: accuracies with mean and
    std), recorded in the file unless `record` is False."""
    from ddtool.run import evaluate_file

    return evaluate_file(path, protocol=protocol, archs=archs, runs=runs, epochs=epochs, seed=seed,
                         data_root=data_root, device=device, baselines=baselines, reference=reference,
                         record=record, compile=compile, resume=resume, progress=progress,
                         log=log or (lambda message: None))


def test_split(sset: "SyntheticSet", *, data_root: str | None = None,
               device: str = "cpu") -> "torch.utils.data.TensorDataset":
    """The test images of the set's dataset in the set's own input space (its normalisation or
    ZCA), with their class ids: what its networks are judged on."""
    import torch

    from ddtool.data import prepare

    data = prepare(sset.dataset, data_root, preprocessing=sset.preprocessing, device=torch.device(device))
    return torch.utils.data.TensorDataset(data.test_x, data.test_y)


def recorded_run(path) -> dict[str, Any]:
    """The arguments of `distill` that make the set at `path` again from its own record (method,
    dataset, ipc, seed, every setting): `distill(**recorded_run(path), output=...)`; change a
    setting by updating the returned "settings" dict."""
    from ddtool.run import recorded_run as recorded

    return recorded(path)


test_split.__test__ = False  # a library function, not a test for pytest to collect
