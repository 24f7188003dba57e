"""One short module per stage; each exposes ``main(cfg, out) -> dict``."""
