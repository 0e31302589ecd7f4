"""Evaluation: fresh networks trained on a set under a named protocol, beside baselines."""

from ddtool.evaluation.evaluate import (
    Accuracies,
    EvaluationReport,
    evaluate_images,
    evaluate_set,
    kept_runs_of_set,
    random_subset_baseline,
    train_fresh_network,
    whole_dataset_reference,
)
from ddtool.evaluation.protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "Accuracies", "EvaluationReport", "PROTOCOLS", "Protocol", "evaluate_images", "evaluate_set", "get_protocol",
    "kept_runs_of_set", "random_subset_baseline", "train_fresh_network", "whole_dataset_reference",
]
