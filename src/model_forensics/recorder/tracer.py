"""The mr-recon-tracer entry point: ``add_hooks_all(model)`` records every layer and builds
an ActivityCube (tokens × layers × energy/mean/std)::

    with add_hooks_all(model, tokenizer) as tracer, torch.no_grad():
        model(**inputs)
        tracer.cube().save("cube.json")
"""

from __future__ import annotations

from typing import Any

from torch import nn

from model_forensics.recorder.cube import ActivityCube
from model_forensics.recorder.hooks import RecorderHooks


class Tracer:
    """What :func:`add_hooks_all` returns: records every layer; ``.cube()`` builds the cube."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, granularity: str = "layer"):
        self.recorder = RecorderHooks(granularity=granularity, sketch="full", max_bundle_size_mb=1e6)
        self.recorder.install_hooks(model, tokenizer)

    def cube(self, model_name: str | None = None) -> ActivityCube:
        return self.recorder.cube(model_name)

    def remove(self) -> None:
        self.recorder.remove_hooks()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_hooks_all(model: nn.Module, tokenizer: Any = None) -> Tracer:
    """Instrument every transformer layer of ``model`` (mr-recon-tracer's entry point).

    Example::

        tracer = add_hooks_all(model, tokenizer)
        model(**inputs)
        tracer.cube().save("cube.json")
        tracer.remove()
    """
    return Tracer(model, tokenizer)
