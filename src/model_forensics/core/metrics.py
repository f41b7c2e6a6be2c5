"""Metrics on output scores: pure tensor maths, no model knowledge.

``kl_divergence(p_logits, q_logits)`` is KL(softmax(p) ‖ softmax(q)) in nats along the last
axis: Σ_v p_v (log p_v − log q_v), computed from log-softmax in ``dtype`` (float32 for
replay-side comparisons; inspection passes float64).
"""

from __future__ import annotations

import torch


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KL(p ‖ q) per row, in nats. ``p_logits``, ``q_logits``: (..., V) → (...)."""
    p = torch.log_softmax(p_logits.to(dtype), -1)
    q = torch.log_softmax(q_logits.to(dtype), -1)
    return (p.exp() * (p - q)).sum(-1)
