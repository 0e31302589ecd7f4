"""Expert trajectories: training (SGD, SAM/GSAM, AST smoothing) and the HDF5 store.

    ExpertConfig(...).fingerprint()                      what a buffer is, and its cache key
    train_expert(config, index, data, device) -> Trajectory
    run_buffer(config, store_path, data, device, shard=(i, n)) -> BufferResult
    merge_shards(paths, out) -> Path
    for_data(config, data) -> config             with its data's digest (or a store's from before)
    find_or_plan_store(config, cache_dir) -> (path, missing expert indices)
    estimate_training_time(config, data, device, experts) -> TrainingEstimate
    ExpertStore.open(path, num_experts=None): params / segment / sample_segment / check_compatible
    SAM, GSAM: torch.optim.Optimizer wrappers stepping through a closure
"""

from ddtool.experts.config import ExpertConfig
from ddtool.experts.manifest import ExpertRecord, StoreManifest
from ddtool.experts.optim import GSAM, SAM, build_optimizer
from ddtool.experts.plan import (
    TrainingEstimate, default_cache_dir, estimate_training_time, find_or_plan_store, for_data,
    store_path_for,
)
from ddtool.experts.merge import merge_shards
from ddtool.experts.runner import BufferResult, Shard, run_buffer
from ddtool.experts.store import ExpertStore, read_manifest
from ddtool.experts.train import Trajectory, train_expert

__all__ = [
    "BufferResult", "ExpertConfig", "ExpertRecord", "ExpertStore", "GSAM", "SAM", "Shard", "StoreManifest",
    "TrainingEstimate", "Trajectory", "build_optimizer", "default_cache_dir", "estimate_training_time",
    "find_or_plan_store", "for_data", "merge_shards", "read_manifest", "run_buffer",
    "store_path_for", "train_expert",
]
