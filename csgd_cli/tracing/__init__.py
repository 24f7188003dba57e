"""Floor 2: finding a network's channel groups by tracing."""
