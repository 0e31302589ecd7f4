"""Evaluation: fresh networks trained on a set under a named protocol, beside baselines.

train (one network) -> evaluate (an evaluation's runs, kept for a resume) -> baselines
(random subset, whole dataset; cached) -> sets (a set's evaluation and its report); kd: the
knowledge-distillation student and its label sources; protocols: the named recipes.
"""

from ddtool.evaluation.baselines import (adopt_recorded_baselines, kept_runs_of_baselines, random_subset,
                                        random_subset_baseline, recorded_random_baselines, whole_dataset_reference)
from ddtool.evaluation.evaluate import Accuracies, FinishedRuns, evaluate_images
from ddtool.evaluation.protocols import PROTOCOLS, Protocol, get_protocol
from ddtool.evaluation.sets import EvaluationReport, SetLearning, evaluate_set, kept_runs_of_set
from ddtool.evaluation.train import fit_network, fresh_network, time_epoch, train_fresh_network

__all__ = [
    "Accuracies", "EvaluationReport", "FinishedRuns", "PROTOCOLS", "Protocol", "SetLearning",
    "adopt_recorded_baselines", "evaluate_images", "evaluate_set", "fit_network", "fresh_network", "get_protocol",
    "kept_runs_of_baselines", "kept_runs_of_set", "random_subset", "random_subset_baseline",
    "recorded_random_baselines", "time_epoch", "train_fresh_network", "whole_dataset_reference",
]
