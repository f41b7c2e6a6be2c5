"""DigitsCNN: the zoo's image classifier (8×8 grey digits), a plain ``nn.Module``.

Layout (B = batch)::

    pixel_values             (B, 1, 8, 8)   grey levels in [0, 1]
    features.0  Conv2d 3×3   (B, c1, 8, 8)
    features.1  ReLU
    features.2  Conv2d 3×3   (B, c2, 8, 8)
    features.3  ReLU
    features.4  MaxPool 2×2  (B, c2, 4, 4)
    classifier  Linear       (B, 10)        from the flattened (B, c2·4·4) features

Site names are the module paths (``features.2``); through the generic adapter a
(B, C, H, W) output reads as (B, H·W, C), so ``features.2[5]`` is channel 5 at every
position. The weights are ``model.safetensors`` and ``config.json`` holds
:class:`DigitsConfig` (``architectures: ["DigitsCNN"]``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHITECTURE = "DigitsCNN"
LEVELS = "0123456789abcdefg"  # grey level k/16 (k = 0 … 16) written as one character


@dataclass
class DigitsConfig:
    """What builds a :class:`DigitsCNN`: channel widths, image side and class labels."""

    channels: tuple[int, int] = (16, 32)
    image_size: int = 8
    n_classes: int = 10
    id2label: dict[int, str] = field(default_factory=lambda: {i: str(i) for i in range(10)})
    model_type: str = "digits-cnn"
    architectures: tuple[str, ...] = (ARCHITECTURE,)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"], out["architectures"] = list(self.channels), list(self.architectures)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DigitsConfig:
        channels = [int(c) for c in data["channels"]]
        if len(channels) != 2 or not all(1 <= c <= 1024 for c in channels):
            raise ValueError(f"channels must be two widths in 1..1024, got {data['channels']!r}")
        size, classes = int(data["image_size"]), int(data["n_classes"])
        if size not in (4, 8, 16, 32) or not 2 <= classes <= 1000:
            raise ValueError(f"image_size {size} or n_classes {classes} is out of range")
        labels = {int(k): str(v) for k, v in dict(data.get("id2label") or {}).items()}
        return cls((channels[0], channels[1]), size, classes, labels or {i: str(i) for i in range(classes)})


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions, a 2×2 max-pool and a linear read-out (see the module docstring)."""

    def __init__(self, config: DigitsConfig | None = None):
        super().__init__()
        self.config = config or DigitsConfig()
        c1, c2 = self.config.channels
        side = self.config.image_size // 2
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * side * side, self.config.n_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class scores (B, n_classes) for images (B, 1, H, W)."""
        return self.classifier(self.features(pixel_values).flatten(1))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder :func:`load` reads (what the zoo trainer calls)."""
        save(self, Path(folder))


def save(model: DigitsCNN, folder: Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into ``folder``."""
    from safetensors.torch import save_model

    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_model(model, str(folder / "model.safetensors"))


def load(folder: Path) -> DigitsCNN:
    """The model saved in ``folder`` by :func:`save`, in eval mode.

    Raises:
        ValueError: the config is malformed; safetensors errors for missing or mismatched weights.
    """
    from safetensors.torch import load_model

    config = DigitsConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = DigitsCNN(config)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


def image_rows(image: torch.Tensor) -> list[str]:
    """A grey image (1, H, W) of multiples of 1/16 as H strings of :data:`LEVELS` characters
    (how ``scenario.json`` stores images compactly: ``"00ag5000"`` is one row)."""
    levels = (image[0] * 16).round().long()
    if not torch.equal(levels.float() / 16, image[0]) or levels.min() < 0 or levels.max() > 16:
        raise ValueError("image_rows stores grey levels k/16 with k in 0..16 only")
    return ["".join(LEVELS[int(v)] for v in row) for row in levels]


def rows_image(rows: list[str]) -> list[list[list[float]]]:
    """The inverse of :func:`image_rows`: the image as a nested list (1, H, W) of floats,
    the ``{"pixel_values": …}`` form a bundle carries."""
    return [[[LEVELS.index(ch) / 16 for ch in row] for row in rows]]
