"""Token-count arithmetic shared by the model's compressors and the analytic FLOPs accounting
(`dpn.flops.analytic_token_counts`), so the two can never disagree on a rounding rule."""

from __future__ import annotations

import math


def pooled_grid(h: int, w: int, kernel: tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) of a grid after 2-D pooling with kernel = stride (floor, as `max_pool2d`'s default)."""
    kh, kw = int(kernel[0]), int(kernel[1])
    if kh < 1 or kw < 1:
        raise ValueError(f"pooling kernel must be positive, got {tuple(kernel)}")
    return h // kh, w // kw


def kept_count(n: int, keep_ratio: float) -> int:
    """Tokens a drop-by-ratio compressor (FastV, PDrop) keeps out of `n`: floor(n * keep_ratio).

    The tiny epsilon guards against binary round-off turning an exact product into one less token
    (100 * (1 - 0.9) = 9.999999999999998 would otherwise keep 9, not 10).
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    return min(n, int(math.floor(n * keep_ratio + 1e-9)))
