"""Layers whose backward and double backward are explicit, fused, first-order levels.

Exact double backprop (gradnorm, PAPER.md Eq. 2) through autograd's generic formulas spends most
of its GPU time in memory-bound LayerNorm / GELU / BatchNorm double backward, in replayed autocast
casts and in convolutions over permuted operands. Each layer here (LayerNorm, LayerNorm2d,
BatchNorm2d, GELU, SiLU, Conv2d, attention) is a custom autograd Function whose backward is another
custom Function whose backward is hand-derived: same numbers, fewer and fused passes, operands in
one dtype and the model's memory layout, as CUDA's kernels want them.
"""

from gnr.doublegrad.swap import fast_layer_counts, fast_version, use_fast_double_backward
from gnr.doublegrad.twice import differentiated_twice, is_differentiated_twice

__all__ = ["differentiated_twice", "fast_layer_counts", "fast_version", "is_differentiated_twice",
           "use_fast_double_backward"]
