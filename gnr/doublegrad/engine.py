"""Which input gradients the running backward pass will use, for a custom autograd Function.

``ctx.needs_input_grad`` only says whether an input requires grad. Autograd's own nodes also skip
outputs the current pass does not use: gradnorm's input-gradient pass (``autograd.grad(ce, x)``)
needs no weight gradient, and a convolution's weight gradient costs as much as its forward. This
gives the explicit levels the same information, from the engine (``torch._C._will_engine_execute_node``,
what ``torch.autograd.graph.register_multi_grad_hook`` asks too).

The engine cannot say whether ``autograd.grad`` uses a leaf, so a weight reaches a Function through
:func:`tracked` (a view, or the autocast cast), never as the Parameter itself.
"""

from __future__ import annotations

import torch


def tracked(t: torch.Tensor | None, autocast_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``t`` as a non-leaf of the graph, so the engine can tell whether its gradient is used; cast to
    ``autocast_dtype`` where autocast would cast it (fp32 to the lower precision, fp64 stays)."""
    if t is None:
        return None
    if autocast_dtype is not None and t.dtype == torch.float32:
        return t.to(autocast_dtype)
    return t.view_as(t) if t.is_leaf and t.requires_grad else t


def remember_inputs(ctx, *args) -> None:
    """Record which forward arguments are tensors: ``ctx.next_functions`` has an edge for each of them."""
    ctx.tensor_args = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))


def used_gradients(ctx) -> tuple[bool, ...]:
    """For each forward argument: will the running backward pass use its gradient?"""
    used = list(ctx.needs_input_grad)
    if torch.compiler.is_compiling():  # the backward is traced ahead of any pass: keep every gradient
        return tuple(used)
    for i, (node, _) in zip(ctx.tensor_args, ctx.next_functions):
        if used[i]:
            try:
                used[i] = node is not None and torch._C._will_engine_execute_node(node)
            except RuntimeError:  # a leaf inside autograd.grad: the engine cannot tell
                pass
    return tuple(used)
