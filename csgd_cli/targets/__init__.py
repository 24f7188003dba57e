"""Floor 4: what a width plan costs and choosing one for a target."""
