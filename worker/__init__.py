"""layerscope job side: Celery tasks and the analysis library (torch, transformers)."""
