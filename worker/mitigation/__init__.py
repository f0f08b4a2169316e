"""Contrastive mitigation of hallucination-prone layers (the `mitigate` stage) and the
patch file that carries the tuned layers to a registry."""
