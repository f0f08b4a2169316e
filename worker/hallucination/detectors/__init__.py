"""Hallucination detectors (docs/method.md section 5): each gives every test answer a confidence
in [0, 1] that it is correct. One module per detector, each a `base.Detector` subclass
carrying its metadata (phase, compute, options it reads, progress units); `DETECTORS` is
the registry, in the order the stage runs them within a phase and the default order of
`HallucinationOptions.detectors` (a test checks `app.schemas.Detector` against it).

Adding a detector: a module here with a `Detector` subclass, one line in `_REGISTERED`,
its name in `app.schemas.Detector` / `ALL_DETECTORS` (and its options, if any, in
`HallucinationOptions`).
"""

from __future__ import annotations

from worker.hallucination.detectors.all_layers_probe import AllLayersProbe
from worker.hallucination.detectors.base import PHASES, Detector, DetectorInput, LayerFeatures, Phase, Scored
from worker.hallucination.detectors.best_layer_probe import BestLayerProbe, choose_layers, layer_candidates
from worker.hallucination.detectors.eavss_probe import EavssProbe
from worker.hallucination.detectors.length import Length, length_features
from worker.hallucination.detectors.max_sequence_probability import (
    MaxSequenceProbability,
    max_sequence_probability,
)
from worker.hallucination.detectors.max_sequence_probability_no_end import MaxSequenceProbabilityNoEnd
from worker.hallucination.detectors.mean_token_entropy import (
    MeanTokenEntropy,
    entropy_confidence,
    mean_token_entropy,
)
from worker.hallucination.detectors.p_ik import PIK
from worker.hallucination.detectors.perplexity import Perplexity, inverse_perplexity
from worker.hallucination.detectors.self_consistency import SelfConsistency, answers_match, self_consistency
from worker.hallucination.detectors.semantic_consistency import (
    SemanticConsistency,
    semantic_clusters,
    semantic_consistency,
)
from worker.hallucination.detectors.sequence_likelihood import SequenceLikelihood, sequence_likelihood
from worker.hallucination.detectors.verbalized import Verbalized, verbalized_confidence
from worker.hallucination.probe import probe_confidence

_REGISTERED: tuple[Detector, ...] = (
    SequenceLikelihood(), MaxSequenceProbability(), MaxSequenceProbabilityNoEnd(), Perplexity(), MeanTokenEntropy(),
    PIK(), Verbalized(), SelfConsistency(), SemanticConsistency(), Length(), EavssProbe(),
    BestLayerProbe(), AllLayersProbe(),
)
DETECTORS: dict[str, Detector] = {d.name: d for d in _REGISTERED}

__all__ = [
    "DETECTORS",
    "PHASES",
    "Detector",
    "DetectorInput",
    "LayerFeatures",
    "Phase",
    "Scored",
    "answers_match",
    "choose_layers",
    "entropy_confidence",
    "inverse_perplexity",
    "layer_candidates",
    "length_features",
    "max_sequence_probability",
    "mean_token_entropy",
    "probe_confidence",
    "self_consistency",
    "semantic_clusters",
    "semantic_consistency",
    "sequence_likelihood",
    "verbalized_confidence",
]
