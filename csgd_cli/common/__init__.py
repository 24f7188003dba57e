"""Floor 0: the vocabulary every floor shares (errors, files, config, seeding, device, model I/O)."""
