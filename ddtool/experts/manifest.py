"""What an expert store records about how its trajectories were made, and the comparisons
made on it: may these experts be used with this dataset/architecture/preprocessing, and may
two stores (shards) be merged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ddtool import __version__
from ddtool.augment import DSAConfig
from ddtool.data import PreparedData, Preprocessing, canonical_name
from ddtool.errors import ConfigError, FormatError
from ddtool.experts.config import ExpertConfig
from ddtool.experts.train import dsa_flip
from ddtool.networks import ParamLayout, network_options

FORMAT = "ddtool.expert_store"
SCHEMA_VERSION = 1

# The ZCA matrix is compared through a small sketch (probe^T M probe for fixed random
# probes) besides its exact hash: an eigen-decomposition on another machine or BLAS gives a
# matrix that differs in the last bits, which is the same preprocessing.
_SKETCH_PROBES = 8
_SKETCH_RTOL = 1e-3
_STATS_ATOL = 1e-6


@dataclass(frozen=True)
class ExpertRecord:
    index: int
    seed: int
    train_accuracy: float
    test_accuracy: float
    file: str  # relative to the store's index file
    # Wall-clock of its training and how many experts trained side by side meanwhile; None for
    # experts trained before stores recorded it.
    seconds: float | None = None
    side_by_side: int = 1

    def share_of_wall_clock(self) -> float | None:
        """The part of a machine's wall-clock this expert took: its seconds over the experts that
        shared the machine with it (what a set made from it reports as its experts' time)."""
        return None if self.seconds is None else self.seconds / self.side_by_side


@dataclass(frozen=True)
class StoreManifest:
    fingerprint: str  # ExpertConfig.fingerprint()
    settings: dict[str, Any]  # ExpertConfig.trajectory_settings(): what the fingerprint hashes
    config: dict[str, Any]  # the full ExpertConfig of the last run that wrote to the store
    architecture: dict[str, Any]  # name, options (defaults filled in), channels, num_classes, image_size
    layout: dict[str, list]  # ParamLayout.to_dict(): parameter names and shapes, in flat order
    dataset: dict[str, Any]  # name, classes, geometry, number of training images, hash of the split
    preprocessing: dict[str, Any]  # mean/std, ZCA on/off, eps, matrix hash and sketch
    augmentation: dict[str, Any]  # DSA on/off and its settings (flip included)
    optimizer: dict[str, Any]  # name, lr, schedule, momentum, weight decay, batch, SAM/GSAM settings
    ast: dict[str, Any]  # AST expert-side smoothing options
    epochs: int
    ddtool_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT
    experts: tuple[ExpertRecord, ...] = field(default_factory=tuple)  # in index order

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> "StoreManifest":
        try:
            raw = json.loads(text)
            raw["experts"] = tuple(ExpertRecord(**e) for e in raw.get("experts", ()))
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError(f"{source}: the expert-store manifest is damaged ({exc}).") from None

    def with_experts(self, records: list[ExpertRecord]) -> "StoreManifest":
        return replace(self, experts=tuple(sorted(records, key=lambda r: r.index)))

    @property
    def param_layout(self) -> ParamLayout:
        return ParamLayout.from_dict(self.layout)

    @property
    def uses_zca(self) -> bool:
        return bool(self.preprocessing["zca"])

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.architecture["options"].items() if v is not None)
        zca = "with ZCA" if self.uses_zca else "without ZCA"
        return (f"{len(self.experts)} experts x {self.epochs} epochs of {self.architecture['name']}({opts}) "
                f"on {self.dataset['name']} {zca}, {self.optimizer['name']}")


def build_manifest(config: ExpertConfig, data: PreparedData, layout: ParamLayout,
                   train_images: int) -> StoreManifest:
    """The manifest of a store of `config`'s experts trained on `data` (no experts yet)."""
    spec = data.spec
    optimizer: dict[str, Any] = {
        "name": config.optimizer, "lr": config.lr, "lr_decay": config.lr_decay,
        "momentum": config.momentum, "weight_decay": config.weight_decay, "batch_size": config.batch_size,
    }
    if config.optimizer != "sgd":
        optimizer |= {"rho": config.rho, "adaptive": config.adaptive}
    if config.optimizer == "gsam":
        optimizer["gsam_alpha"] = config.gsam_alpha
    augmentation: dict[str, Any] = {"dsa": config.augment}
    if config.augment:
        augmentation |= DSAConfig(flip=dsa_flip(config, data)).to_dict()
    return StoreManifest(
        fingerprint=config.fingerprint(),
        settings=_plain(config.trajectory_settings()),
        config=_plain(config.to_dict()),
        architecture={
            "name": config.arch, "options": _plain(config.resolved_arch_options()),
            "channels": spec.channels, "num_classes": spec.num_classes, "image_size": spec.image_size,
        },
        layout=layout.to_dict(),
        dataset={
            "name": spec.name, "classes": list(spec.classes), "channels": spec.channels,
            "image_size": spec.image_size, "num_classes": spec.num_classes,
            "train_images": int(train_images), "test_images": int(data.test_x.shape[0]),
            "train_split_sha256": _tensor_hash(data.train_indices.to(torch.int64)),
        },
        preprocessing=describe_preprocessing(data.preprocessing),
        augmentation=augmentation,
        optimizer=optimizer,
        ast={"loss_scaling": config.ast_loss_scaling, "input_grad_penalty": config.ast_input_grad_penalty},
        epochs=config.epochs,
    )


def describe_preprocessing(pre: Preprocessing) -> dict[str, Any]:
    record: dict[str, Any] = {"mean": list(pre.mean), "std": list(pre.std), "zca": pre.zca is not None}
    if pre.zca is not None:
        matrix = pre.zca.matrix.detach().cpu().to(torch.float32)
        record |= {"zca_eps": pre.zca.eps, "zca_sha256": _tensor_hash(matrix),
                   "zca_sketch": _sketch(matrix).tolist()}
    return record


# -- comparisons ---------------------------------------------------------------------------


def preprocessing_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How two `describe_preprocessing` records differ, in words ("" entries never)."""
    def zca_words(r: dict) -> str:
        return f"ZCA whitening (eps {r['zca_eps']:g})" if r["zca"] else "no ZCA whitening"

    other_eps = stored["zca"] and not math.isclose(stored["zca_eps"], current["zca_eps"])
    if stored["zca"] != current["zca"] or other_eps:
        return [f"preprocessing: the experts were trained with {zca_words(stored)}, "
                f"this run uses {zca_words(current)}"]
    out = []
    if not (np.allclose(stored["mean"], current["mean"], atol=_STATS_ATOL, rtol=0)
            and np.allclose(stored["std"], current["std"], atol=_STATS_ATOL, rtol=0)):
        out.append(f"preprocessing: normalisation mean/std {stored['mean']}/{stored['std']} "
                   f"vs {current['mean']}/{current['std']}")
    if stored["zca"] and stored["zca_sha256"] != current["zca_sha256"] and not np.allclose(
        stored["zca_sketch"], current["zca_sketch"], rtol=_SKETCH_RTOL, atol=1e-6
    ):
        out.append("preprocessing: the ZCA transforms differ (fitted on different training images)")
    return out


def compatibility_differences(manifest: StoreManifest, *, dataset: str, arch: str,
                              arch_options: dict[str, Any], preprocessing: Preprocessing) -> list[str]:
    """Why experts of this store may not be used with this dataset/network/preprocessing."""
    out = []
    if canonical_name(dataset) != manifest.dataset["name"]:
        out.append(f"dataset: the experts were trained on {manifest.dataset['name']}, "
                   f"this run uses {canonical_name(dataset)}")
    arch = arch.strip().lower()
    if arch != manifest.architecture["name"]:
        out.append(f"architecture: the experts are {manifest.architecture['name']}, this run uses {arch}")
    else:
        wanted = _plain({**network_options(arch), **arch_options})
        stored = manifest.architecture["options"]
        differing = sorted(k for k in set(wanted) | set(stored) if wanted.get(k) != stored.get(k))
        if differing:
            out.append("architecture options: " + ", ".join(
                f"{k}={stored.get(k)!r} in the store vs {wanted.get(k)!r} here" for k in differing))
    out += preprocessing_differences(manifest.preprocessing, describe_preprocessing(preprocessing))
    return out


def data_differences(manifest: StoreManifest, data: PreparedData) -> list[str]:
    """How `data` differs from what the store's experts learnt from, as far as the manifest
    records it: image geometry, classes, the training split and the test images' count, the
    normalisation ([] if alike in all of them)."""
    spec, recorded = data.spec, manifest.dataset
    here = {"image_size": spec.image_size, "channels": spec.channels, "num_classes": spec.num_classes,
            "test_images": int(data.test_x.shape[0]),
            "train_split_sha256": _tensor_hash(data.train_indices.to(torch.int64))}
    out = [f"{key}: {recorded.get(key)!r} in the store vs {value!r} here" for key, value in here.items()
           if recorded.get(key) != value]
    return out + preprocessing_differences(manifest.preprocessing, describe_preprocessing(data.preprocessing))


def merge_differences(a: StoreManifest, b: StoreManifest) -> list[str]:
    """Why experts of store `b` may not join store `a` ([] if they may)."""
    out = []
    if a.fingerprint != b.fingerprint:
        out += (settings_differences(a.settings, b.settings)
                or [f"configuration fingerprint {a.fingerprint} vs {b.fingerprint}"])
    if a.layout != b.layout:
        out.append("parameter layout (the network code changed between the two runs)")
    if a.dataset.get("train_split_sha256") != b.dataset.get("train_split_sha256"):
        out.append("training split (prepared with a different validation split)")
    out += preprocessing_differences(a.preprocessing, b.preprocessing)
    return out


def settings_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The trajectory settings (ExpertConfig.trajectory_settings) in which a and b differ."""
    a, b = _plain(a), _plain(b)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def raise_if_differences(differences: list[str], intro: str, advice: str) -> None:
    if differences:
        raise ConfigError(f"{intro}: " + "; ".join(differences) + f". {advice}")


# -- helpers -------------------------------------------------------------------------------


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _sketch(matrix: torch.Tensor) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    probes = torch.randn(matrix.shape[0], _SKETCH_PROBES, generator=g, dtype=torch.float64)
    probes /= probes.norm(dim=0, keepdim=True)
    return (probes.T @ matrix.to(torch.float64) @ probes).numpy()


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so stored and fresh records compare equal."""
    return json.loads(json.dumps(value))
