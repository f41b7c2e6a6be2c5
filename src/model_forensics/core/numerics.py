"""Process-wide numeric set-up that bit-identical replay depends on.

PyTorch's CPU builds compute ``tanh``, ``exp``, ``erf`` and other elementwise functions of
contiguous float tensors with MKL's vector math library (VML), split across the intra-op
threads in chunks of 2048 elements. The first VML call of a process initialises the
library; when that first call is made by two threads at once, one of them can compute its
chunk with different last-bit rounding (measured on torch 2.13's CPU wheel: the first
``torch.tanh`` of a 22 x 256 tensor at 2 threads differed from every later call in 5 of 24
fresh processes; a single-threaded call of any VML function beforehand removed it in 24 of
24). A recording and its replay are separate processes, so a GPT-2 MLP (``gelu_new`` is
``tanh``) recorded in one state and replayed in the other is not bit-identical, at random.

:func:`warm_math_kernels` makes that first call from one thread, on a tensor below the
parallel grain size; importing this module (``import model_forensics`` does) runs it.
"""

from __future__ import annotations

import torch

_WARM = False


def warm_math_kernels() -> None:
    """Initialise the CPU vector-math kernels from this thread (once per process)."""
    global _WARM
    if _WARM:
        return
    probe = torch.linspace(-1.0, 1.0, 64)  # below ATen's VML grain (2048): one thread
    for fn in (torch.exp, torch.tanh, torch.erf, torch.log1p, torch.sqrt, torch.sin, torch.cos):
        fn(probe.abs() if fn is torch.sqrt else probe)
    _WARM = True


warm_math_kernels()
