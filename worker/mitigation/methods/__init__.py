"""Mitigation methods (docs/method.md section 7): each turns the chosen layers and the tuning
data into a `base.Patch` that the `mitigate` stage evaluates against the base model and
against the same method at random layers. One module per method, each a
`base.MitigationMethod` subclass; `METHODS` is the registry (a test checks
`app.schemas.MitigationMethodName` against it).

Adding a method: a module here with a `MitigationMethod` subclass (its `fit` returns a patch
that can be applied and removed, and `load` rebuilds it from its file), one line in
`_REGISTERED`, its name in `app.schemas.MitigationMethodName` (and its options, if any, in
`MitigateOptions`).
"""

from __future__ import annotations

from worker.mitigation.methods.base import MethodInput, MitigationMethod, Patch, TuningData, WeightPatch
from worker.mitigation.methods.contrastive import Contrastive
from worker.mitigation.methods.dola import Dola
from worker.mitigation.methods.steering import Steering, SteeringPatch

_REGISTERED: tuple[MitigationMethod, ...] = (Contrastive(), Dola(), Steering())
METHODS: dict[str, MitigationMethod] = {m.name: m for m in _REGISTERED}

__all__ = ["METHODS", "MethodInput", "MitigationMethod", "Patch", "SteeringPatch", "TuningData", "WeightPatch"]
