"""Gradient-norm regularisation by a finite difference (Finlay & Oberman 2019; PAPER.md §6).

With ``d = sign(∇_x ℓ)`` held constant, ``‖∇_x ℓ_i‖₁ ≈ (ℓ_i(x + h·d_i) − ℓ_i(x)) / h``; averaged
over the batch that is ``(mean ℓ(x + h·d) − mean ℓ(x)) / h``. Only first derivatives, so fused
attention kernels and torch.compile work. Same weights and ramp as :mod:`gnr.objectives.gradnorm`.
``x + h·d`` is not clipped to [0, 1]: the model is defined around the box and clipping would bend
the difference direction.

Accuracy, measured against exact double backprop in fp32 (resnet18 with GELU and with ReLU at
64 px, vit_tiny at 224 px; relative error of ‖∇ₓℓ‖₁): ``d`` is a dense ±1 step on every pixel and
the loss bends along it within thousandths of a pixel. h = 0.01 (the old default) is 11-20% below
exact, 1e-3 0.3-1.6%, 3e-4 within 0.5%, 1e-4 within 0.1% (the default; ReLU on a mixup batch
0.5%: kinks), 1e-5 worse with GELU (rounding); a smaller h also loses more to cancellation as
‖∇ₓℓ‖₁ shrinks in training.
A central difference is no better at the same h (the bend is not quadratic) and costs two more
passes, so the forward difference stays. All passes run in fp32, also under autocast: after
normalisation ``h·d`` is far below bf16's resolution, and a bf16 difference measures rounding
(-38% to +43% at h <= 1e-3; at 0.01 as wrong as fp32). For the same reason cuDNN's TF32 (10-bit
mantissa, on by default for fp32 convolutions on CUDA) is off in these passes; matmuls follow
``torch.set_float32_matmul_precision`` (full fp32 by default). Not yet measured on a GPU: `gnr bench
step` reports the error there.
"""

from __future__ import annotations

import torch

from gnr.objectives.base import Objective, input_leaf, soft_ce
from gnr.objectives.gradnorm import penalised


def no_tf32_convolutions():
    """cuDNN convolutions in full fp32 inside; every other cuDNN flag as it was, restored after."""
    return torch.backends.cudnn.flags(enabled=None, benchmark=None, benchmark_limit=None, deterministic=None,
                                      allow_tf32=False, fp32_precision=None, depthwise_kernel=None)


def graph_kept_for_two_backwards():
    """The forward at ``x`` is back-propagated twice (for ``d``, then with the loss). A compiled model
    may otherwise free ("donate") saved buffers in its first backward; torch then refuses the
    ``retain_graph`` call. Compilation and that first backward both happen inside this context."""
    return torch._functorch.config.patch(donated_buffer=False)


class GradNormFD(Objective):
    passes = 5  # forward, input-only backward for d, forward at x + h·d, backward through both

    def __call__(self, model, x, y_soft, progress):
        with torch.autocast(x.device.type, enabled=False), no_tf32_convolutions(), graph_kept_for_two_backwards():
            x = input_leaf(x.float())
            # Replay the RNG for the second forward: both points see the same dropout / drop-path
            # masks, otherwise the difference measures the masks, not the gradient.
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                ce = soft_ce(model(x), y_soft.float())
            (grad,) = torch.autograd.grad(ce, x, retain_graph=True)
            h = self.cfg.fd_step
            ce_h = soft_ce(model(x.detach() + h * grad.sign()), y_soft.float())
        return penalised(self.cfg, ce, (ce_h - ce) / h, progress)
