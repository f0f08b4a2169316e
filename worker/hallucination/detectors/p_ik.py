"""`p_ik` (P(IK), Kadavath et al.): a logistic probe on the final hidden state at the last
prompt token (kept by the greedy pass), trained on the training split."""

from __future__ import annotations

from worker.hallucination.detectors.base import Detector, DetectorInput, Scored, probe_scored


class PIK(Detector):
    name = "p_ik"
    phase = "probe"
    compute = "one probe fit on d_model features"
    options = ("probe_l2", "seed")
    needs_last_hidden = True

    def score(self, inp: DetectorInput) -> Scored:
        h = inp.answers.run.last_hidden
        if h is None:
            raise RuntimeError("p_ik needs the greedy pass to keep the last hidden state (needs_last_hidden)")
        return probe_scored(self.name, h, inp, features=int(h.shape[1]))
