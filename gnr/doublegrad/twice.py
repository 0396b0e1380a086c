"""Whether the forward running now will be differentiated twice.

Objectives that differentiate through an input gradient (gradnorm, edge) run their forward inside
:func:`differentiated_twice`. Layers whose explicit levels only pay off in a double backward
(convolution, attention) take them there and run torch's own first-order path elsewhere (natural
training, attacks, evaluation), where autocast's weight-cast cache and the fused attention kernels
serve better. The math SDPA kernel is forced inside: the fused ones have no double backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch.nn.attention import SDPBackend, sdpa_kernel

_twice: ContextVar[bool] = ContextVar("gnr_differentiated_twice", default=False)


@contextmanager
def differentiated_twice() -> Iterator[None]:
    """Forwards inside will be differentiated twice."""
    token = _twice.set(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _twice.reset(token)


def is_differentiated_twice() -> bool:
    return _twice.get()
