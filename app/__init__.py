"""layerscope API process: FastAPI front end. Never imports torch or worker."""
