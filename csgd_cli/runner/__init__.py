"""Floor 6: the CLI: stages, training loop, session, preflight, lock, distributed, logs, reports."""
