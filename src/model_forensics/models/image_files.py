"""Image inputs from files, for image models (a CNN, an image ONNX graph) run from the CLI.

A file holds one image as the model reads it, already preprocessed: (H, W), (C, H, W) or
(1, C, H, W) numbers, checked by :func:`~model_forensics.models.inputs.pixel_values`::

    numpy.save("digit.npy", image)                 # (1, 8, 8) float32
    read_image("digit.npy")                        # tensor (1, 1, 8, 8)
    image_input(zoo.load("cnn-digits-badnets").model)   # "pixel_values"

Formats: ``.npy`` (read with ``allow_pickle=False``), ``.safetensors`` (one tensor, or the one named
``pixel_values``) and ``.json`` (a nested list). Sizes are checked before the values are
read. No ``.pt``: the package never unpickles a file it is given (convert with
``safetensors.torch.save_file({"pixel_values": t}, "image.safetensors")``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_forensics.core.errors import ForensicsError
from model_forensics.models.inputs import MAX_PIXELS, pixel_values
from model_forensics.models.reference import LoadedModel

IMAGE_SUFFIXES = (".npy", ".safetensors", ".json")
MAX_FILE_BYTES = 64 * MAX_PIXELS  # a .json file: room for MAX_PIXELS values written out


def read_image(path: str | Path) -> torch.Tensor:
    """The image in ``path``, checked.

    Returns:
        A float32 tensor (1, C, H, W).
    Raises:
        ForensicsError: a missing file, an unknown suffix, an unreadable file, or values
            that are not one finite image of at most ``MAX_PIXELS`` values; the message
            names the file.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ForensicsError(
            f"image file '{file}' has suffix '{file.suffix}'; give a {', '.join(IMAGE_SUFFIXES)} file holding one "
            "preprocessed (C, H, W) image (e.g. numpy.save('image.npy', array))"
        )
    if not file.is_file():
        raise ForensicsError(f"image file '{file}' does not exist or is not a file")
    if file.stat().st_size > MAX_FILE_BYTES:
        raise ForensicsError(f"image file '{file}' is {file.stat().st_size} bytes, over the limit of {MAX_FILE_BYTES}")
    try:
        value = _READERS[suffix](file)
        return pixel_values(value)
    except ForensicsError as exc:
        raise ForensicsError(f"image file '{file}': {exc}") from None


def _read_npy(file: Path) -> torch.Tensor:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ForensicsError(f"not a readable .npy array of numbers ({exc}); save it with numpy.save") from None
    _check_size(array.shape)
    if not (np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating)):
        raise ForensicsError(f"the array's dtype is {array.dtype}; save real numbers (float32)")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _read_safetensors(file: Path) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as tensors:
            names = list(tensors.keys())
            name = "pixel_values" if "pixel_values" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise ForensicsError(
                    f"holds {len(names)} tensors ({', '.join(names[:5]) or 'none'}); save one, or name it pixel_values"
                )
            _check_size(tuple(tensors.get_slice(name).get_shape()))
            return tensors.get_tensor(name)
    except SafetensorError as exc:
        raise ForensicsError(f"not a readable .safetensors file ({exc})") from None


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ForensicsError(f"not valid JSON ({exc}); write one (C, H, W) nested list of numbers") from None


_READERS = {".npy": _read_npy, ".safetensors": _read_safetensors, ".json": _read_json}


def _check_size(shape: tuple[int, ...]) -> None:
    if int(np.prod(shape, dtype=np.int64)) > MAX_PIXELS:
        raise ForensicsError(f"the image has shape {list(shape)}, over the limit of {MAX_PIXELS} values")


def image_input(model: nn.Module) -> str | None:
    """The name of the model's image input, or None when it takes none: ``pixel_values``
    for a PyTorch model whose ``forward`` takes it, the only input of an ONNX graph that
    reads floats (not token ids)."""
    from model_forensics.models.onnx_model import OnnxModel

    if isinstance(model, OnnxModel):
        floats = [spec for spec in model.inputs if not spec.is_text]
        return floats[0].name if len(floats) == 1 and len(model.inputs) == 1 else None
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return "pixel_values" if "pixel_values" in parameters else None


def check_input_kind(loaded: LoadedModel, *, image: bool) -> None:
    """Refuse an input the model cannot read: a text prompt (``image=False``) for an image
    model or an ONNX graph without a tokenizer beside it, an image (``image=True``) for a
    model without an image input.

    Raises:
        ForensicsError: the message names the model's inputs and the option to use.
    """
    from model_forensics.models.onnx_model import OnnxModel

    model, name = loaded.model, loaded.ref.name
    inputs = model.describe_inputs() if isinstance(model, OnnxModel) else None
    takes = image_input(model)
    if image and takes is None:
        its = f"its inputs are {inputs}" if inputs else "its forward() takes no pixel_values"
        raise ForensicsError(
            f"'{name}' takes no image: {its}; pass a text prompt with --prompt, or record other inputs from Python "
            "with record_inputs(loaded, {name: tensor}, out) (docs/onnx.md)"
        )
    if image:
        return
    if isinstance(model, OnnxModel) and not model.takes_text:
        raise ForensicsError(
            f"'{name}' is not a text model: its inputs are {inputs}, so a text prompt cannot be fed to it; "
            + ("pass the image with --image FILE (.npy, .safetensors or .json)" if takes else _FROM_PYTHON)
        )
    if isinstance(model, OnnxModel) and loaded.tokenizer is None:
        raise ForensicsError(
            f"'{name}' reads token ids but no tokenizer lies beside it; save one into its folder "
            "(tokenizer.save_pretrained(folder)) or record token ids from Python"
        )
    if loaded.tokenizer is None and takes is not None:
        raise ForensicsError(
            f"'{name}' is an image model (its forward() takes {takes}, no tokenizer), so a text prompt cannot be "
            "fed to it; pass the image with --image FILE (.npy, .safetensors or .json)"
        )


_FROM_PYTHON = "record it from Python with record_inputs(loaded, {name: tensor}, out) (docs/onnx.md)"
