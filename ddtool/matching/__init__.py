"""Trajectory matching: the unroll and its gradient backends."""

from ddtool.matching.engine import (
    BACKENDS,
    InnerStep,
    MatchResult,
    MatchTarget,
    SyntheticBatch,
    Unroll,
    get_backend,
)

__all__ = ["BACKENDS", "InnerStep", "MatchResult", "MatchTarget", "SyntheticBatch", "Unroll", "get_backend"]
