"""Layers whose backward and double backward are explicit, fused, first-order levels.

Exact double backprop (gradnorm, PAPER.md Eq. 2) through autograd's generic formulas spends most
of its GPU time in memory-bound LayerNorm / GELU / BatchNorm double backward and in replayed
autocast casts. Each layer here (LayerNorm, LayerNorm2d, BatchNorm2d, GELU, SiLU) is a custom
autograd Function whose backward is another custom Function whose backward is hand-derived: same
numbers, fewer and fused passes.
"""

from gnr.doublegrad.swap import fast_layer_counts, fast_version, use_fast_double_backward

__all__ = ["fast_layer_counts", "fast_version", "use_fast_double_backward"]
