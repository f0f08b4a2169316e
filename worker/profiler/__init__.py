"""Hook-based activation profiler with streaming statistics (never a full activation cache)."""

from worker.profiler.hooks import capture
from worker.profiler.profiler import Profile, profile
from worker.profiler.stats import BatchPlan, HistogramSpec, RunningStats, reduce_activations

__all__ = [
    "BatchPlan",
    "HistogramSpec",
    "Profile",
    "RunningStats",
    "capture",
    "profile",
    "reduce_activations",
]
