"""What a hallucination detector is (the registry in `worker.hallucination.detectors`).

A detector gives every test answer a confidence in [0, 1] that it is correct. It
declares when it can run (`phase`), what it costs (`compute`, progress `units`),
which `HallucinationOptions` fields it reads (`options`) and whether the greedy
pass must keep the last prompt token's final hidden state (`needs_last_hidden`);
`score` gets the labelled answers (and, in the `probe` phase, the pooled layer
features) and returns a `Scored`.

Phases, in the order the stage runs them:
- `answers`: reads the greedy answers only (no model call, no progress units; `logprob_confidence`
  for a confidence from their token log-probabilities);
- `generation`: one more greedy generation per test answer;
- `sampling`: K sampled answers per test question;
- `probe`: trains a logistic probe on the training answers, scores the test answers
  (after the layer scores, so a probe can read the top EAVSS layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from app.schemas import HallucinationOptions
from worker.hallucination import probe as probes
from worker.hallucination.answers import Answers
from worker.hallucination.generation import Generation
from worker.modelzoo import LoadedModel
from worker.stage import JobContext

Phase = Literal["answers", "generation", "sampling", "probe"]
PHASES: tuple[Phase, ...] = ("answers", "generation", "sampling", "probe")


@dataclass
class LayerFeatures:
    """Mean-pooled activations of every answered example (probe phase)."""

    pooled: np.ndarray  # [answers, layers, width]
    top_layers: list[int]  # positions in `pooled`, by EAVSS, most hallucination-prone first
    layer_ids: list[int]  # block index of each position
    # position -> the probe trained on that layer alone (training split), shared with the per-layer table
    layer_probes: dict[int, probes.LogisticProbe] = field(default_factory=dict)

    def concat(self, positions: Sequence[int]) -> np.ndarray:
        """[answers, len(positions) * width]: the pooled vectors of the layers at `positions`, concatenated."""
        return self.pooled[:, list(positions), :].reshape(self.pooled.shape[0], -1)


@dataclass
class DetectorInput:
    loaded: LoadedModel
    options: HallucinationOptions
    ctx: JobContext
    answers: Answers
    on_batch: Callable[[int, int], None]  # fills the detector's progress units
    features: LayerFeatures | None = None  # set in the probe phase
    earlier: Mapping[str, Scored] = field(default_factory=dict)  # detectors of this run that ran before

    def layer_features(self, detector: str) -> LayerFeatures:
        """The layer features, which only the probe phase has."""
        if self.features is None:
            raise RuntimeError(f"{detector} runs in the probe phase, after the profile and the layer scores")
        return self.features


@dataclass
class Scored:
    """A detector's output."""

    confidence: np.ndarray  # per answer, training rows first; NaN where not scored
    probe: dict[str, Any] | None = None  # the fitted probe, for summary["probes"]
    replies: list[str] | None = None  # per test answer: the verbalized reply
    samples: list[list[str]] | None = None  # per test answer: the sampled answers
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # merged into summary["counts"]


class Detector:
    """One detector (module doc); a subclass per module, registered in `DETECTORS`."""

    name: ClassVar[str]
    phase: ClassVar[Phase]
    compute: ClassVar[str]  # what it costs, in words
    options: ClassVar[tuple[str, ...]] = ()  # the HallucinationOptions fields it reads
    needs_last_hidden: ClassVar[bool] = False
    timing: ClassVar[str | None] = None  # its key in summary["timings_s"] (probes share "probes")
    toolkit: ClassVar[bool] = False  # a standard white-box estimator (lm-polygraph's), a leaderboard reference

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        """Progress units of this detector for `n_test` test answers."""
        return 0 if self.phase == "answers" else 1

    def score(self, inp: DetectorInput) -> Scored:
        raise NotImplementedError


def logprob_confidence(
    generations: Sequence[Generation], reduce: Callable[[list[float]], Any], *, with_end: bool
) -> np.ndarray:
    """exp(reduce(the answer tokens' log-probabilities, `with_end` also the end-of-answer
    token's)) per answer, clipped to [0, 1]; 0.0 for an empty answer or a non-finite value."""
    out = np.zeros(len(generations), dtype=np.float64)
    for i, g in enumerate(generations):
        lps = g.logprobs_with_end if with_end else g.logprobs
        total = float(reduce(lps)) if g.token_ids and lps else -math.inf
        out[i] = min(max(math.exp(total), 0.0), 1.0) if math.isfinite(total) else 0.0
    return out


def probe_scored(
    name: str, x: np.ndarray, inp: DetectorInput, probe: probes.LogisticProbe | None = None, **extra: Any
) -> Scored:
    """Train a probe on the training rows of `x` ([answers, ...]) (or take `probe`, fitted on
    them), score the test rows, and describe the probe (with `extra`, which may be computed
    from it: a callable gets it)."""
    n_train = inp.answers.qa.n_train
    if probe is None:
        conf, probe = probes.probe_confidence(
            x[:n_train], inp.answers.y_train, x[n_train:], l2=inp.options.probe_l2, seed=inp.options.seed
        )
    else:
        conf = np.clip(probe.predict_proba(x[n_train:]), 0.0, 1.0)
    info = {
        "l2": probe.l2, "degenerate": probe.degenerate, "converged": probe.converged,
        "at_grid_edge": probe.at_grid_edge,
        "cv_log_loss": None if probe.cv_losses is None else {str(k): v for k, v in probe.cv_losses.items()},
        **{k: v(probe) if callable(v) else v for k, v in extra.items()},
    }
    warnings = []
    if not probe.converged:
        warnings.append(f"probe {name}: L-BFGS stopped at its iteration limit")
    if probe.at_grid_edge:
        warnings.append(
            f"probe {name}: cross-validation chose L2 = {probe.l2:g}, an end of the grid; a value beyond it "
            "might fit better (set probe_l2 to fix the strength)"
        )
    return Scored(confidence=inp.answers.full(conf), probe=info, warnings=warnings)
