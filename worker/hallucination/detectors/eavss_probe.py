"""`eavss_probe` (the paper's method): a logistic probe on the concatenated pooled
activations of the top-k layers by EAVSS (`top_k_layers`), trained on the training split.
The layer choice comes from the training answers only, so it never sees a test label."""

from __future__ import annotations

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, probe_scored


class EavssProbe(Detector):
    name = "eavss_probe"
    phase = "probe"
    compute = "one probe fit on top_k_layers x d_model features"
    options = ("top_k_layers", "probe_l2", "seed")

    def score(self, inp: DetectorInput) -> Scored:
        f = inp.layer_features(self.name)
        feats = f.concat(f.top_layers)
        return probe_scored(self.name, feats, inp, layers=[f.layer_ids[i] for i in f.top_layers],
                            features=int(feats.shape[1]))
