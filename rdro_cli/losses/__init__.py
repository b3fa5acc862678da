"""The losses and their registry (losses.registry): one module per family."""
