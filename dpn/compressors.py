"""The one list of compressors, routing objectives and the path notation; every other module imports
these (no transformers or torch import here, so the Ray-side config code can use them cheaply)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# dpn: the routed pyramid; static: the pyramid on one fixed path (no router); random: the pyramid on a
# random path per sample (the control that shows whether routing matters); none: plain LLaVA-1.5;
# fastv / pdrop: the peer methods, in the same harness and FLOPs accounting.
COMPRESSORS = ("dpn", "static", "random", "none", "fastv", "pdrop")
# Compressors that pool the visual grid at the DPE layers (and take a routing path).
POOLING = ("dpn", "static", "random")
# Compressors that drop visual tokens ranked by attention.
PRUNING = ("fastv", "pdrop")

# How the routers learn (`DPNConfig.router_objective`, notes in `dpn.routing`):
#   reference       the paper's: the LM loss reaches the router through p[chosen] scaling the pooled tokens,
#                   plus 0.001 * max(0, 1.5 - mean s[j*] p[j*]).
#   counterfactual  stage 2 trains the LLM on uniformly sampled paths; the routers are then fitted to
#                   each calibration sample's loss under every path (`dpn.routing.fit_routers`).
ROUTER_OBJECTIVES = ("reference", "counterfactual")

NOT_POOLED = "n"  # path label of a DPE that did not pool the sample (text-only, too few tokens)
_PATH_SPLIT = re.compile(r"[-,\s]+")


def format_path(factors: Sequence[int | None]) -> str:
    """Compression factors per DPE -> the one path notation, e.g. [4, 2, 1] -> "4-2-1"; None -> "n"."""
    return "-".join(NOT_POOLED if f is None else str(int(f)) for f in factors)


def parse_path(text: str | Sequence[int]) -> list[int]:
    """"4-2-1" (the notation printed everywhere), or the older "4,2,1" / "[4, 2, 1]" / "4 2 1", or a
    sequence of ints -> [4, 2, 1]. Raises ValueError naming the text."""
    if not isinstance(text, str):
        try:
            return [int(f) for f in text]
        except (TypeError, ValueError):
            raise ValueError(f"path must be compression factors like 4-2-1, got {text!r}") from None
    body = text.strip().strip("[]()").strip()
    parts = [p for p in _PATH_SPLIT.split(body) if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"path must be compression factors like 4-2-1, got {text!r}")
    return [int(p) for p in parts]


__all__ = ["COMPRESSORS", "NOT_POOLED", "POOLING", "PRUNING", "ROUTER_OBJECTIVES", "format_path", "parse_path"]
