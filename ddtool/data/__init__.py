"""Datasets: the registry, loaders of the real file formats, splits, normalisation, ZCA.

    prepare("fashion-mnist")        -> PreparedData: train/val/test tensors in network space
    load_raw("cifar10", data_root)  -> RawDataset: uint8 pixels as stored
    search_paths(name) / locate(name): where a dataset is looked for / found

See docs/architecture.md ("data") for the contract.
"""

from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.data.registry import DEFAULT_DATASET, DatasetSpec, canonical_name, get_spec, list_specs
from ddtool.data.sources import RawDataset, load_raw, locate, search_paths
from ddtool.data.prepare import (
    PreparedData,
    class_indices,
    prepare,
    prepare_raw,
    sample_per_class,
    stratified_split,
)

__all__ = [
    "DEFAULT_DATASET",
    "DatasetSpec",
    "PreparedData",
    "Preprocessing",
    "RawDataset",
    "ZCA",
    "canonical_name",
    "class_indices",
    "get_spec",
    "list_specs",
    "load_raw",
    "locate",
    "prepare",
    "prepare_raw",
    "sample_per_class",
    "search_paths",
    "stratified_split",
]
