"""A width target (``flops:0.45``): one type, parsed once."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CsgdError

TARGET_KINDS = ("flops", "params", "latency")  # prune.target=<kind>:<fraction> (widths.TARGETS)


@dataclass(frozen=True)
class Target:
    """A width target: keep ``value`` (a fraction in (0, 1)) of the base's ``kind`` of
    cost (``flops``, ``params`` or ``latency``). Parsed once, from ``flops:0.45``."""

    kind: str
    value: float

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.value:g}"

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """``flops:0.45`` -> Target; one-line errors (naming the API's ``target``; the
        CLI says ``prune.target``) for an unknown kind or a value outside (0, 1)."""
        if isinstance(text, Target):
            return text
        kind, _, value = str(text).partition(":")
        fix = f"pass target=<{'|'.join(TARGET_KINDS)}>:<fraction>, e.g. flops:0.45"
        if kind not in TARGET_KINDS:
            raise CsgdError(f"target={text}: unknown target kind '{kind}'", fix)
        try:
            v = float(value)
        except ValueError:
            raise CsgdError(f"target={text}: '{value}' is not a number", fix) from None
        if not 0 < v < 1:
            raise CsgdError(
                f"target={text}: {v:g} is outside (0, 1)",
                "pass the fraction of the base's cost to keep, e.g. flops:0.45",
            )
        return cls(kind, v)

    def round(self, r: int = 1, n: int = 1) -> Target:
        """Iterative rounds: round ``r`` of ``n`` aims at ``value ** (r / n)`` of the
        base's cost, each round keeping the same fraction of what the one before left."""
        return Target(self.kind, float(f"{self.value ** (r / n):.6g}"))
