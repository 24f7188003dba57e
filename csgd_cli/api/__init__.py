"""Floor 5: the public API: CSGD, save, load_model and the checkpoint format."""
