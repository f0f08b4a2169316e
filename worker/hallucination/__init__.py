"""Hallucination analysis (docs/method.md sections 4-6): QA generation, correctness labels,
EAVSS layer scores, calibrated detectors and the per-layer probe table.

Modules: `generation` (prompts, batched generation), `detectors`, `probe` (logistic
probe), `stage` (the stage itself). Its options are `app.schemas.HallucinationOptions`.
"""
