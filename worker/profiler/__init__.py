"""Hook-based activation profiler with streaming statistics (never a full activation cache)."""

from worker.profiler.hooks import SITES, capture
from worker.profiler.profiler import Profile, profile
from worker.profiler.stats import BatchPlan, HistogramSpec, RunningStats, reduce_activations

__all__ = [
    "SITES",
    "BatchPlan",
    "HistogramSpec",
    "Profile",
    "RunningStats",
    "capture",
    "profile",
    "reduce_activations",
]
