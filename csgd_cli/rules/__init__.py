"""Floor 1: channel groups and the one rule per layer kind."""
