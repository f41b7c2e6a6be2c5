"""Inspection tests run on one torch and one BLAS thread (far faster on a shared machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models run ~30× faster on one intra-op thread when the machine is shared.
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # numpy's BLAS too: oversubscribed BLAS threads spin (40× slower MMD)
        yield
    torch.set_num_threads(previous)
