"""The losses: `registry.py` says everything about each one; one module per family; `state.py` the running
state some keep across steps."""
