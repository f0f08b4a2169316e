"""Torch utilities shared by the analysis stages (batching, memory, ...).

Keep this file free of imports: `worker.service.runner` (imported by the API process, which never
imports torch) reads `worker.lm.batching.is_out_of_memory`, so importing the package must
stay cheap. Import the submodules themselves.
"""
