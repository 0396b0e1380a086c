"""One fused pass per double-backward level: compiled on CUDA, eager (its CPU twin) elsewhere."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

COMPILE_ON = {"cuda"}  # device types whose kernels go through torch.compile (tests add "cpu")


def fused(kernel: Callable) -> Callable:
    """Run ``kernel`` (a pure-torch function of tensors and constants) as one fused pass.

    On CUDA it goes through ``torch.compile`` (inductor fuses the elementwise ops and reductions into
    a few kernels); on CPU, and while an outer ``torch.compile`` traces it, the same function runs
    eagerly: that eager function is what the CPU tests compare against, and ``.eager`` exposes it.
    Autocast is off inside: every kernel casts its inputs to fp32 once, explicitly, so the casts
    autocast would insert are never recorded and replayed in a double backward.
    """
    compiled: Callable | None = None

    @functools.wraps(kernel)
    def run(*args):
        nonlocal compiled
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            if device.type not in COMPILE_ON or torch.compiler.is_compiling():
                return kernel(*args)
            # Detached: dynamo keeps a Parameter's shape static, and a static weight would pin every
            # width (96, 192, ... in a Swin) into its own graph, past the recompile limit.
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            if compiled is None:
                compiled = torch.compile(kernel, dynamic=True)
            try:  # it compiles on a first call and on a call with a new shape class
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as e:  # must not stop training: same numbers, unfused
                warnings.warn(f"gnr.doublegrad: torch.compile failed for {kernel.__name__} "
                              f"({type(e).__name__}: {e}); running it unfused")
                compiled = kernel
                return kernel(*args)

    run.eager = kernel
    return run


def opmath(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype the arithmetic runs in: fp32 for half types, else its own (fp64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
