"""`avss`: the ranking of the avss stage (worker.scoring.avss), lowest AVSS first, with
the nAVSS per layer as its scores; the prune stage reads it from that stage's typed
value instead of computing it."""

from __future__ import annotations

from worker.scoring.scorers.base import Scorer


class Avss(Scorer):
    name = "avss"
    description = "AVSS (variance over sparsity of each block's activations), from the avss stage"
    from_stage = "avss"
