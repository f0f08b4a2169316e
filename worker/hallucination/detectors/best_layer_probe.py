"""`best_layer_probe`: a logistic probe on the layer (or the window of `probe_window` consecutive
layers, concatenated) whose probe has the lowest cross-validated log-loss on the TRAINING answers
(`probe.cv_fit`: 3 stratified folds, at the L2 strength CV chose or at `probe_l2`), so the choice
never sees a test label; ties go to the narrower, then the earlier candidate. The single-layer
fits are the per-layer table's (`LayerFeatures.layer_probes`), so choosing a single layer costs
nothing beyond that table."""

from __future__ import annotations

import numpy as np

from worker.hallucination import probe as probes
from worker.hallucination.detectors.base import Detector, DetectorInput, LayerFeatures, Scored, probe_scored


def layer_candidates(n_layers: int, window: int) -> list[tuple[int, ...]]:
    """Every single layer, then (window > 1) every run of `window` consecutive layers (positions)."""
    singles: list[tuple[int, ...]] = [(li,) for li in range(n_layers)]
    if window <= 1 or window > n_layers:
        return singles
    return singles + [tuple(range(s, s + window)) for s in range(n_layers - window + 1)]


def choose_layers(
    f: LayerFeatures, y_train: np.ndarray, n_train: int, *, window: int, l2: float | None, seed: int
) -> tuple[tuple[int, ...], probes.LogisticProbe, list[tuple[tuple[int, ...], float | None]]]:
    """(the chosen positions, its probe fitted on the training rows, every candidate with its CV
    log-loss, best first). Reads the training rows of `f.pooled` only."""
    scored: list[tuple[tuple[int, ...], float | None, probes.LogisticProbe]] = []
    for cand in layer_candidates(f.pooled.shape[1], window):
        x = f.pooled[:n_train, list(cand), :].reshape(n_train, -1)
        loss, probe = probes.cv_fit(x, y_train, l2=l2, seed=seed)
        if len(cand) == 1:
            f.layer_probes[cand[0]] = probe
        scored.append((cand, loss, probe))
    order = sorted(range(len(scored)), key=lambda i: (scored[i][1] is None, scored[i][1] or 0.0,
                                                      len(scored[i][0]), i))
    best = scored[order[0]]
    return best[0], best[2], [(scored[i][0], scored[i][1]) for i in order]


class BestLayerProbe(Detector):
    name = "best_layer_probe"
    phase = "probe"
    compute = "one CV probe fit per layer (the per-layer table's) and per window of probe_window layers"
    options = ("probe_window", "probe_l2", "seed")

    def score(self, inp: DetectorInput) -> Scored:
        f = inp.layer_features(self.name)
        n_train, o = inp.answers.qa.n_train, inp.options
        chosen, probe, ranking = choose_layers(f, inp.answers.y_train, n_train, window=o.probe_window,
                                               l2=o.probe_l2, seed=o.seed)
        x = f.concat(chosen)
        ids = [f.layer_ids[i] for i in chosen]
        singles = [(c[0], loss) for c, loss in ranking if len(c) == 1]
        s = probe_scored(
            self.name, x, inp, probe, layers=ids, features=int(x.shape[1]),
            chosen_by="3-fold cross-validated log-loss on the training answers",
            chosen_cv_log_loss=next(loss for c, loss in ranking if c == chosen),
            layer_cv_ranking=[f.layer_ids[li] for li, _ in singles],
            layer_cv_log_loss={str(f.layer_ids[li]): loss for li, loss in singles},
            windows_considered=sum(1 for c, _ in ranking if len(c) > 1),
        )
        if all(loss is None for _, loss in ranking):
            s.warnings.append("best_layer_probe: a class has fewer than 2 training answers, so no layer could be "
                              "cross-validated; the first candidate was taken")
        return s
