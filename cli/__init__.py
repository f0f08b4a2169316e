"""The `layerscope` command line."""
