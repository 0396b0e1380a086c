"""What CUDA's kernels require of their operands, checked on CPU, whose kernels accept more.

:class:`CudaContracts` is a TorchDispatchMode: it sees every aten op after autocast has cast its
inputs, as the kernels get them, and records each call that a CUDA kernel would refuse or serve
with a slow kernel:

- **dtypes**: the native LayerNorm kernels and their backward take one dtype for input, weight,
  bias and output gradient (CUDA raises "expected scalar type BFloat16 but found Float"; CPU
  computes); BatchNorm takes weights and statistics in the input's dtype or all in fp32; mean and
  inverse std are in the accumulation dtype; convolutions, matmuls, activation backwards, softmax
  backward and SDPA take operands of one dtype;
- **layout** (``channels_last=True``): every 4-d operand of a convolution is channels-last
  contiguous. cuDNN serves other strides (the permuted operands of autograd's convolution double
  backward) with legacy kernels without tensor cores, and transposes NCHW ones with extra kernels;
- **alignment** (``aligned_bmm=True``): every half-precision batched matmul (attention's) has
  operands and output with a unit stride, rows, batch stride and offset in multiples of 16 bytes.
  cuBLAS serves others (attention over 197 or 49 keys) with pre-Hopper kernels.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HALF = (torch.bfloat16, torch.float16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _dtypes(*ts) -> set[torch.dtype]:
    return {t.dtype for t in ts if isinstance(t, torch.Tensor)}


def _one_dtype(*ts) -> str | None:
    found = _dtypes(*ts)
    return None if len(found) <= 1 else f"mixed dtypes {sorted(map(str, found))}"


def _batch_norm_params(x, *params) -> str | None:
    found = _dtypes(*params)
    if len(found) > 1 or not found <= {x.dtype, _acc(x.dtype)}:
        return f"input {x.dtype} with weights/statistics {sorted(map(str, found))}"
    return None


def _stats(x, *stats) -> str | None:
    found = _dtypes(*stats)
    return None if found <= {_acc(x.dtype)} else f"statistics {sorted(map(str, found))} for input {x.dtype}"


def _first(*checks: str | None) -> str | None:
    return next((c for c in checks if c), None)


# aten op name -> check(args) returning a violation or None
DTYPE_RULES = {
    "native_layer_norm": lambda a: _one_dtype(a[0], a[2], a[3]),
    "native_layer_norm_backward": lambda a: _first(_one_dtype(a[0], a[1], a[5], a[6]), _stats(a[1], a[3], a[4])),
    "native_batch_norm": lambda a: _batch_norm_params(a[0], *a[1:5]),
    "_native_batch_norm_legit": lambda a: _batch_norm_params(a[0], *a[1:5]),
    "_native_batch_norm_legit_no_training": lambda a: _batch_norm_params(a[0], *a[1:5]),
    "_batch_norm_with_update": lambda a: _batch_norm_params(a[0], *a[1:5]),
    "native_batch_norm_backward": lambda a: _first(_one_dtype(a[0], a[1]), _batch_norm_params(a[1], *a[2:5]),
                                                   _stats(a[1], a[5], a[6])),
    "batch_norm_backward": lambda a: _first(_one_dtype(a[0], a[1]), _batch_norm_params(a[1], *a[2:5]),
                                            _stats(a[1], a[5], a[6])),
    "convolution": lambda a: _one_dtype(*a[:3]),
    "convolution_backward": lambda a: _one_dtype(*a[:3]),
    "mm": lambda a: _one_dtype(*a[:2]),
    "bmm": lambda a: _one_dtype(*a[:2]),
    "addmm": lambda a: _one_dtype(*a[:3]),
    "baddbmm": lambda a: _one_dtype(*a[:3]),
    "gelu_backward": lambda a: _one_dtype(*a[:2]),
    "silu_backward": lambda a: _one_dtype(*a[:2]),
    "_softmax_backward_data": lambda a: _one_dtype(*a[:2]),
}
SDPA_PREFIX = "_scaled_dot_product"  # q, k, v (and, in backwards, grad_out, out) of one dtype
CONVOLUTIONS = ("convolution", "convolution_backward")


ALIGN = 16  # bytes: what Hopper's GEMM kernels (TMA) need of rows and batches
BATCHED = ("bmm", "baddbmm")


def _misaligned(t: torch.Tensor) -> str | None:
    rows, cols = t.stride()[-2:]
    if cols != 1 and rows != 1:
        return f"no unit stride {t.stride()}"
    step = {"row": rows if cols == 1 else cols, "offset": t.storage_offset()}
    if t.dim() == 3 and t.shape[0] > 1:
        step["batch"] = t.stride(0)
    bad = [f"{k} {v}" for k, v in step.items() if v * t.element_size() % ALIGN]
    return f"{tuple(t.shape)} strides {t.stride()}: {', '.join(bad)} not {ALIGN}-byte aligned" if bad else None


def _alignment(args, out) -> str | None:
    tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.dtype in HALF]
    return _first(*map(_misaligned, tensors))


def _layout(func_name: str, args) -> str | None:
    for i, t in enumerate(args[:3]):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            kind = "NCHW" if t.is_contiguous() else f"permuted, strides {t.stride()}"
            return f"operand {i} {tuple(t.shape)} is {kind}, not channels-last"
    return None


class CudaContracts(TorchDispatchMode):
    """Records ``(op, violation)`` for every call CUDA would refuse or serve slowly; ``calls`` counts
    the ops checked, so a test can tell that the step really ran them."""

    def __init__(self, channels_last: bool = False, aligned_bmm: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.aligned_bmm = aligned_bmm
        self.violations: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        rule = DTYPE_RULES.get(name)
        if name.startswith(SDPA_PREFIX):
            rule = lambda a: _one_dtype(*(t for t in a if isinstance(t, torch.Tensor) and t.is_floating_point()
                                          and t.dim() == 4))  # noqa: E731
        out = func(*args, **kwargs)
        if rule is not None:
            self.calls[name] += 1
            problem = rule(args)
            if problem is None and self.channels_last and name in CONVOLUTIONS:
                problem = _layout(name, args)
            if problem is None and self.aligned_bmm and name in BATCHED:
                problem = _alignment(args, out)
            if problem:
                self.violations[(name, problem)] += 1
        return out

    def report(self) -> str:
        return "\n".join(f"{n}× {op}: {problem}" for (op, problem), n in self.violations.most_common())
