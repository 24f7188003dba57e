"""Floor 3: the method: clustering, the centripetal optimizer, chi, the merge."""
