"""Count what a piece of PyTorch work costs, op by op: FLOPs, memory-bound traffic, peak tensor memory.

A :class:`TorchDispatchMode` sees every aten op that runs, the ones autograd runs in a backward (and
in the backward of a backward) included. FLOPs come from torch's own formulas
(``torch.utils.flop_counter.flop_registry``: matmuls, convolutions, attention); torch's
``FlopCounterMode`` itself is not used, as its module tracker breaks under ``autograd.grad``. Every
other op that is not a view is memory-bound work; the bytes it writes (its outputs, or the tensor it
updates in place) are the proxy for its memory traffic, the reason a step can be slower than its
FLOPs say.

    with CostCounter() as cost:
        step()
    cost.flops, cost.nonmatmul_bytes, cost.nonmatmul_ops, cost.peak_bytes
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

# Returns no alias, yet only re-labels its input's storage.
_FREE = {torch.ops.aten._unsafe_view}


def _shape(value):
    return value.shape if isinstance(value, torch.Tensor) else value


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class CostCounter(TorchDispatchMode):
    """Totals over every aten op run inside the ``with`` block (this thread and autograd's).

    ``peak_bytes`` is the high-water mark of the tensors the ops created and that were still alive
    (freed when their last reference goes), the count that a device's allocator keeps and a CPU does
    not; tensors that existed before the block (weights, optimizer state) are not in it.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.nonmatmul_bytes = 0
        self.nonmatmul_ops = 0
        self.live_bytes = 0
        self.peak_bytes = 0

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        aliases = any(r.alias_info is not None for r in schema.returns)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*tree_map(_shape, args), **tree_map(_shape, kwargs), out_val=tree_map(_shape, out))
        elif func._overloadpacket not in _FREE and (schema.is_mutable or not aliases):
            self.nonmatmul_ops += 1
            self.nonmatmul_bytes += sum(t.numel() * t.element_size() for t in _tensors(out))
        if not aliases and func._overloadpacket not in _FREE:
            for t in _tensors(out):
                nbytes = t.untyped_storage().nbytes()
                self.live_bytes += nbytes
                weakref.finalize(t, self._free, nbytes)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out
