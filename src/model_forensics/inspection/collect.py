"""Inputs in, recorded activations out: samples, input adapters and the forward pass.

Every experiment reads activations through :func:`forward` (one micro-batch, recorded by
:class:`~model_forensics.recorder.RecorderHooks`) and ablates or perturbs through
:func:`patched` (one site's tensor swapped through :func:`~model_forensics.models.hooks.hooks`,
the one hook mechanism); neither wires torch hooks of its own.

Layout of a recorded site after :func:`as_rows`: (B, R, U) — batch, rows, units. A row is a
token position for sequence models (only rows where ``mask`` is true are real), or the
sample itself for models whose sites are (B, U).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from model_forensics.core.errors import ForensicsError
from model_forensics.models.adapters import Adapter
from model_forensics.models.hooks import SiteCall, hooks, logits_of
from model_forensics.recorder import RecorderHooks


@dataclass
class Sample:
    """One input with its optional annotations (the JSONL record of ``inspect --data``).

    ``text`` for tokenizer models, ``tensor`` for plain ``nn.Module`` inputs; ``label`` is
    the expected output (a class index, a token id or the expected continuation text),
    ``passed`` whether the model's behaviour on it was acceptable, ``group``/``time`` its
    place in an ordered series (drift).
    """

    text: str | None = None
    tensor: torch.Tensor | None = None
    label: Any = None
    passed: bool | None = None
    group: str | None = None
    time: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
        for key in ("label", "passed", "group", "time"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def as_samples(inputs: Any) -> list[Sample]:
    """Normalise user inputs to samples: a list of strings, dicts (JSONL records) or
    :class:`Sample`, or a tensor whose first axis indexes inputs.

    Raises:
        ForensicsError: the inputs are empty or of an unknown kind.
    """
    if inputs is None:
        return []
    if isinstance(inputs, torch.Tensor):
        samples = [Sample(tensor=row) for row in inputs]
    else:
        samples = []
        for i, item in enumerate(inputs):
            if isinstance(item, Sample):
                samples.append(item)
            elif isinstance(item, str):
                samples.append(Sample(text=item))
            elif isinstance(item, torch.Tensor):
                samples.append(Sample(tensor=item))
            elif isinstance(item, dict):
                samples.append(_from_record(item, f"input {i}"))
            else:
                raise ForensicsError(
                    f"input {i} is a {type(item).__name__}; pass strings, dicts with a 'text' key, Sample objects or tensors"
                )
    if not samples:
        raise ForensicsError("no inputs given; pass at least one prompt (or one JSONL record with a 'text' field)")
    return samples


def _from_record(record: dict[str, Any], where: str) -> Sample:
    text = record.get("text")
    if not isinstance(text, str):
        raise ForensicsError(
            f'{where} has no \'text\' string; every record needs one, e.g. {{"text": "The capital of France is"}}'
        )
    passed = record.get("passed")
    if passed is not None and not isinstance(passed, bool):
        raise ForensicsError(f"{where}: 'passed' must be true or false, got {passed!r}")
    group = record.get("group")
    return Sample(
        text=text,
        label=record.get("label"),
        passed=passed,
        group=None if group is None else str(group),
        time=record.get("time"),
    )


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read a JSONL data file: one JSON object per line with ``text`` and optional
    ``label``, ``passed`` (bool), ``group``/``time``.

    Raises:
        ForensicsError: the file is missing, empty, or a line is not such an object.
    """
    p = Path(path)
    if not p.is_file():
        raise ForensicsError(
            f"data file '{p}' does not exist; pass a JSONL file with one {{\"text\": ...}} object per line"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ForensicsError(f"data file '{p}' is not UTF-8 (byte {exc.start}); save it as UTF-8 JSONL") from None
    samples = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ForensicsError(f"{p}:{n} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise ForensicsError(f"{p}:{n} is a JSON {type(record).__name__}, not an object with a 'text' field")
        samples.append(_from_record(record, f"{p}:{n}"))
    if not samples:
        raise ForensicsError(f"data file '{p}' has no records; each line must be a JSON object with a 'text' field")
    return samples


@dataclass
class Batch:
    """One encoded micro-batch: what to call the model with, and where the rows are."""

    args: tuple[Any, ...]
    kwargs: dict[str, torch.Tensor]
    mask: torch.Tensor  # (B, T) bool: real token positions (all true for non-sequence inputs)
    last: torch.Tensor  # (B,) long: the position whose output is the model's prediction
    ids: torch.Tensor | None = None  # (B, T) token ids, when the input is text


class InputAdapter(Protocol):
    """Turns samples into model arguments. Implement it for models that take neither
    token ids from a Hugging Face tokenizer nor one plain tensor."""

    def encode(self, samples: Sequence[Sample]) -> Batch: ...


@dataclass
class TextAdapter:
    """Tokenize texts one by one (no special template), keep the last ``max_length``
    tokens, right-pad. The user's tokenizer is only called, never changed."""

    tokenizer: Any
    max_length: int = 128
    vocab_size: int = field(init=False)
    pad_id: int = field(init=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.vocab_size = len(tok) if hasattr(tok, "__len__") else int(getattr(tok, "vocab_size", 0))

    def token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        return [int(i) for i in ids][-self.max_length :]

    def encode(self, samples: Sequence[Sample]) -> Batch:
        rows = []
        for s in samples:
            if s.text is None:
                raise ForensicsError(
                    "a sample has no text, but this model is driven by a tokenizer; give every input a 'text'"
                )
            ids = self.token_ids(s.text)
            rows.append(ids or [self.pad_id])
        return self.encode_ids(rows)

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> Batch:
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = True
        last = mask.sum(1) - 1
        return Batch((), {"input_ids": ids, "attention_mask": mask.long()}, mask, last, ids)


@dataclass
class TensorAdapter:
    """Stack per-sample tensors and pass them positionally: ``model(x)``. Samples of
    shape (T, …) with different T are right-padded with zeros and masked."""

    def encode(self, samples: Sequence[Sample]) -> Batch:
        tensors = []
        for s in samples:
            if s.tensor is None:
                raise ForensicsError(
                    "a sample has no tensor and the model has no tokenizer; pass ModelInspector(model, tokenizer)"
                )
            tensors.append(s.tensor)
        sequence = tensors[0].dim() >= 2 or not tensors[0].is_floating_point()  # (T, …) or token ids (T,)
        if not sequence:  # one feature vector per sample: one row each
            x = torch.stack(tensors)
            mask = torch.ones((x.shape[0], 1), dtype=torch.bool)
        else:
            t_len = max(t.shape[0] for t in tensors)
            x = torch.zeros((len(tensors), t_len, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
            mask = torch.zeros((len(tensors), t_len), dtype=torch.bool)
            for i, t in enumerate(tensors):
                x[i, : t.shape[0]] = t
                mask[i, : t.shape[0]] = True
        ids = x if not x.is_floating_point() and x.dim() == 2 else None
        return Batch((x,), {}, mask, mask.sum(1) - 1, ids)


@dataclass
class Recorded:
    """What one forward pass of a micro-batch produced."""

    sites: dict[str, torch.Tensor]  # site → (B, R, U) float32
    masks: dict[str, torch.Tensor]  # site → (B, R) bool: real rows
    prediction: torch.Tensor  # (B, V) float32 logits at each sample's prediction position
    index: np.ndarray  # (B,) global input indices of the batch's samples

    def rows_of(self, idx: np.ndarray) -> np.ndarray | None:
        """Batch positions of global indices ``idx`` (None when ``idx`` is the whole batch)."""
        if len(idx) == len(self.index) and np.array_equal(idx, self.index):
            return None
        where = {int(g): i for i, g in enumerate(self.index)}
        return np.array([where[int(g)] for g in idx], dtype=np.int64)


def model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def call_model(model: nn.Module, batch: Batch) -> Any:
    device = model_device(model)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in batch.args)
    kwargs = {k: v.to(device) for k, v in batch.kwargs.items()}
    with torch.no_grad():
        return model(*args, **kwargs)


def output_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output (:func:`~model_forensics.models.hooks.logits_of`).

    Raises:
        ForensicsError: the output holds no tensor of scores.
    """
    logits = logits_of(output)
    if logits is None:
        raise ForensicsError(
            f"cannot find logits in the model's output ({type(output).__name__}); return a tensor or an object with .logits"
        )
    return logits


def prediction_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, V) logits at each sample's prediction position (its last real token)."""
    logits = logits.detach().float().cpu()
    if logits.dim() == 3 and logits.shape[:2] == batch.mask.shape:
        return logits[torch.arange(logits.shape[0]), batch.last]
    return logits.reshape(logits.shape[0], -1)


def as_rows(tensor: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A site tensor in (B, R, U) layout with its row mask, or None for non-float sites.

    (B, T, …) with T matching the mask → token rows, trailing axes flattened into units
    (per-head sites become heads·d_head units); (B, U) → one row per sample; (B, H·W, C)
    (image sites as the generic adapter reads them) → spatial rows, channels as units;
    (B, C, *S) with two or more spatial axes → spatial rows, channels as units.
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
        return None
    t = tensor.detach().float().cpu()
    b = t.shape[0]
    if t.dim() >= 3 and t.shape[:2] == mask.shape:
        return t.reshape(b, t.shape[1], -1), mask
    if t.dim() == 2:
        return t.unsqueeze(1), torch.ones((b, 1), dtype=torch.bool)
    if t.dim() == 3:
        return t, torch.ones((b, t.shape[1]), dtype=torch.bool)
    rows = t.reshape(b, t.shape[1], -1).transpose(1, 2)  # (B, spatial, C)
    return rows, torch.ones((b, rows.shape[1]), dtype=torch.bool)


def forward(
    model: nn.Module, recorder: RecorderHooks, batch: Batch, sites: Sequence[str], index: Sequence[int]
) -> Recorded:
    """Run one micro-batch (global input indices ``index``) under installed recorder hooks;
    return ``sites`` as rows."""
    recorder.reset()
    output = call_model(model, batch)
    recorded = recorder.recorded()
    out: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for site in sites:
        rows = as_rows(recorded[site], batch.mask) if site in recorded else None
        if rows is not None:
            out[site], masks[site] = rows
    recorder.reset()
    return Recorded(out, masks, prediction_logits(output_logits(output), batch), np.asarray(index, dtype=np.int64))


def recorder_for(adapter: Adapter, sites: Sequence[str]) -> RecorderHooks:
    """A full-precision recorder for exactly ``sites`` (plus what its granularity adds)."""
    granularity = "neuron" if any(s.endswith("mlp.post") for s in sites) else "layer"
    canonical = adapter.n_layers > 0
    return RecorderHooks(
        granularity=granularity,
        sites=list(sites) if canonical else [],
        sketch="full",
        max_bundle_size_mb=1e9,
    )


def patched(
    adapter: Adapter, site: str, edit: Callable[[torch.Tensor, Batch | None], torch.Tensor], batch: Batch | None = None
) -> AbstractContextManager[None]:
    """Within the block, ``site``'s tensor is replaced by ``edit(tensor, batch)`` (same
    layout as the adapter reads it; input-side sites also when passed as ``hidden_states=``).
    The hook is removed on exit, even on errors.

    Raises:
        SiteError: the model has no site ``site``.
    """

    def swap(tensor: torch.Tensor, call: SiteCall) -> torch.Tensor:
        return edit(tensor, batch)

    return hooks(adapter, sites={site: swap})


def batches(n: int, size: int, start: int = 0) -> Iterator[list[int]]:
    """Index lists of consecutive micro-batches over items ``start..n−1``."""
    for first in range(start, n, size):
        yield list(range(first, min(first + size, n)))


def set_units(x: torch.Tensor, units: Sequence[int], values: torch.Tensor | float, token_layout: bool) -> torch.Tensor:
    """``x`` with the given units set to ``values`` (one per unit, or a scalar) at every row.

    Units index the flattened trailing axes of a token-layout site (B, T, …), the last
    axis of a (B, U) or (B, H·W, C) site, or the channel axis of a (B, C, *spatial) site —
    the same numbering :func:`as_rows` uses.
    """
    out = x.clone()
    idx = torch.as_tensor(list(units), dtype=torch.long, device=x.device)
    vals = values if isinstance(values, float | int) else torch.as_tensor(values, dtype=x.dtype, device=x.device)
    if x.dim() == 2:
        out[:, idx] = vals
    elif token_layout or x.dim() == 3:
        flat = out.reshape(*out.shape[:2], -1)
        flat[..., idx] = vals
        out = flat.reshape(x.shape)
    else:
        view = out.movedim(1, -1)  # (B, *spatial, C)
        view[..., idx] = vals
    return out
