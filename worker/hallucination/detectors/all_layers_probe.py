"""`all_layers_probe`: one L2-regularized logistic probe on the pooled activations of every layer,
concatenated (layers x d_model features), trained on the training split; the strength is chosen by
CV on the training split (or `probe_l2`), so no layer is picked by hand or by a test label."""

from __future__ import annotations

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, probe_scored


class AllLayersProbe(Detector):
    name = "all_layers_probe"
    phase = "probe"
    compute = "one probe fit on n_layers x d_model features"
    options = ("probe_l2", "seed")

    def score(self, inp: DetectorInput) -> Scored:
        f = inp.layer_features(self.name)
        x = f.pooled.reshape(f.pooled.shape[0], -1)
        return probe_scored(self.name, x, inp, layers=list(f.layer_ids), features=int(x.shape[1]))
