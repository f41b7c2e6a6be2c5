"""ONNX models as torch modules: onnxruntime runs the graph, every exposed tensor is a site.

:func:`load_onnx` reads a ``.onnx`` file (checked, then run by onnxruntime on the CPU with
one thread, sequential execution and graph optimisations off, so every run computes the
same bits) and wraps it in :class:`OnnxModel`, an ``nn.Module``. Recording, replay,
interventions and ModelInspector then reach it the way they reach any module, through the
hooks API (:mod:`model_forensics.models.hooks`) and the generic adapter:

- **Sites.** Intermediate tensors are exposed by adding them to the graph's outputs. By
  default (``expose="auto"``) a site is a *module scope*: exporters such as
  ``torch.onnx.export`` name nodes by the module that made them
  (``/transformer/h.0/mlp/c_fc/Gemm``), and the scope's output, the last float tensor made
  inside ``transformer.h.0.mlp`` and read outside it, is site ``transformer.h.0.mlp``,
  the same name as the PyTorch module path. A graph without scopes (tf2onnx, hand-built)
  gets one site per float tensor, named by the tensor (``expose="tensors"``). Each site is a
  leaf child module (an identity), called on the tensor in graph order, so forward hooks
  read it; image tensors (B, C, H, W) read as (B, H·W, C) like every generic site.
- **Interventions** by splitting the graph: when a hook returns another tensor (or edits it
  in place), the graph is run again with that tensor cut from its producer and fed as an
  input (a cached variant of the graph per set of replaced tensors), so everything
  downstream sees the new value and nothing upstream changes. Any intervention kind that
  works on a module output works here (zero, scale, mean, patch, …, with neurons and
  positions). A graph with ops whose result changes between runs (random ops) cannot be
  re-run faithfully: :class:`OnnxRewriteError` lists them.
- **Weights.** The module has one parameter, ``onnx_sha256`` (the 32 bytes of the sha256
  of the model file and its external data, as float32 0–255), so the weights digest of a
  bundle changes when the graph or any weight does.

Gradients do not exist (onnxruntime runs inference only), and weights cannot be edited
from torch; what needs them says so (:data:`NO_GRADIENTS`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_forensics.core.errors import ForensicsError, ModelLoadError
from model_forensics.models.reference import LoadedModel, ModelRef, tag_model

ARCHITECTURE = "onnx"
NO_GRADIENTS = (
    "needs gradients or editable weights, which an ONNX model run by onnxruntime does not have "
    "(PyTorch models only); run it on the PyTorch model the ONNX file was exported from"
)
# Ops whose result differs from run to run: a replay or a split-graph re-run cannot reproduce them.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
FORWARD_OPTIONS = frozenset({"use_cache", "output_attentions", "output_hidden_states", "return_dict"})
_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE
_NUMPY_OF = {
    1: np.float32,
    10: np.float16,
    11: np.float64,
    7: np.int64,
    6: np.int32,
    9: np.bool_,
    2: np.uint8,
    3: np.int8,
}


class OnnxRewriteError(ForensicsError):
    """An intervention cannot be applied to this ONNX graph (the message lists the ops)."""


class OnnxGradientError(ForensicsError):
    """Gradients were asked of an ONNX model (onnxruntime computes none)."""


class _NoBackward(torch.autograd.Function):
    """Passes an output through; its backward refuses with :data:`NO_GRADIENTS`."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise OnnxGradientError("this analysis " + NO_GRADIENTS)


@dataclass(frozen=True)
class GraphInput:
    """One input the graph is fed: its name, numpy dtype and shape (None: a named or free axis)."""

    name: str
    dtype: Any
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name} ({np.dtype(self.dtype).name}, {dims})"

    @property
    def is_text(self) -> bool:
        """Token ids: an integer input (``input_ids``)."""
        return np.issubdtype(np.dtype(self.dtype), np.integer)


def load_onnx(path: str | Path, *, expose: str = "auto", threads: int = 1) -> LoadedModel:
    """Load ``path`` (a ``.onnx`` file) as an :class:`OnnxModel`, with the Hugging Face
    tokenizer saved beside it (``tokenizer.json`` in the same folder), if any.

    Args:
        expose: ``auto`` (module scopes when the node names have them, else tensors),
            ``scopes`` or ``tensors`` (see the module docstring).
        threads: onnxruntime intra-op threads (1: bit-identical from run to run).
    Raises:
        ModelLoadError: the file is missing, not ONNX, fails the ONNX checker, uses ops of
            a domain onnxruntime does not know, or onnxruntime cannot build a session.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"ONNX model '{file}' does not exist or is not a file; pass the path of a .onnx file")
    proto = _read_proto(file)
    model = OnnxModel(proto, file, expose=expose, threads=threads, digest=_model_digest(file, proto))
    ref = ModelRef(name=file.name, source="local", reference=str(file.resolve()))
    tag_model(model, ref)
    return LoadedModel(model.eval(), _tokenizer_beside(file), ref)


def is_onnx_reference(reference: str | None) -> bool:
    """Whether a model reference names an ONNX file (``….onnx``)."""
    return isinstance(reference, str) and reference.lower().endswith(".onnx")


def _read_proto(file: Path) -> Any:
    import onnx

    try:
        proto = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a ModelProto
        raise ModelLoadError(
            f"'{file}' is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]}); "
            "pass a file written by torch.onnx.export, tf2onnx or onnx.save"
        ) from None
    if not proto.graph.node:
        raise ModelLoadError(f"'{file}' holds no ONNX graph (no nodes); pass a model written by torch.onnx.export")
    try:
        onnx.load_external_data_for_model(proto, str(file.parent))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"'{file}' fails the ONNX checker: {str(exc).splitlines()[0][:200]}") from None
    unknown = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in KNOWN_DOMAINS})
    if unknown:
        raise ModelLoadError(
            f"'{file}' uses ops of domains onnxruntime does not know: {', '.join(unknown)}; "
            "export with standard ONNX ops only (or register the custom ops' library)"
        )
    return proto


def _model_digest(file: Path, proto: Any) -> bytes:
    """sha256 over the model file and its external data files (sorted by name)."""
    digest = hashlib.sha256(file.read_bytes())
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for location in sorted(locations):
        digest.update(location.encode())
        digest.update((file.parent / location).read_bytes())
    return digest.digest()


def _tokenizer_beside(file: Path) -> Any:
    folder = file.parent
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer beside '{file}': {str(exc)[:160]}") from None


# -- sites: module scopes or tensors ------------------------------------------------------------
def scope_chain(node_name: str) -> list[str]:
    """The module paths a node lies in, outermost first, from a ``torch.onnx.export`` node
    name: ``/transformer/h.0/mlp/c_fc/Gemm`` → ``transformer``, ``transformer.h.0``, …,
    ``transformer.h.0.mlp.c_fc``; ``/features/features.0/Conv`` → ``features``,
    ``features.0`` (a container's child repeats its parent's name). Empty for a node
    outside every scope (``Constant_12``)."""
    if not node_name.startswith("/"):
        return []
    parts: list[str] = []
    chain: list[str] = []
    for part in (p for p in node_name.split("/")[1:-1] if p):
        if chain and part.startswith(chain[-1] + "."):
            parts = part.split(".")
        elif parts and part.startswith(parts[-1] + "."):
            parts = [*parts[:-1], part]
        else:
            parts = [*parts, part]
        chain.append(".".join(parts))
    return chain


def scope_of(node_name: str) -> str | None:
    """The module path of the module that made a node (the innermost of :func:`scope_chain`)."""
    chain = scope_chain(node_name)
    return chain[-1] if chain else None


def float_tensors(proto: Any) -> dict[str, Any]:
    """Every float tensor the main graph's nodes produce (name → numpy dtype), by shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is best effort; the graph outputs still carry their types
        inferred = proto
    types: dict[str, Any] = {}
    batched = _batch_is_free(proto)
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.elem_type not in _FLOAT_TYPES:
            continue
        dims = list(tensor.shape.dim) if tensor.HasField("shape") else None
        # A site has one row per input row: skip what has no batch axis (scalars, vectors,
        # position tables broadcast over the batch) when the graph's batch axis is free.
        if dims is not None and (len(dims) < 2 or (batched and dims[0].HasField("dim_value"))):
            continue
        types[info.name] = _FLOAT_TYPES[tensor.elem_type]
    produced = {out for node in proto.graph.node for out in node.output if out}
    return {name: dtype for name, dtype in types.items() if name in produced}


def _batch_is_free(proto: Any) -> bool:
    """Whether the graph's first input has a named (dynamic) first axis."""
    initializers = {t.name for t in proto.graph.initializer}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        return bool(dims) and not dims[0].HasField("dim_value")
    return False


def scope_sites(proto: Any, floats: dict[str, Any]) -> dict[str, str]:
    """Site (module path) → tensor: each scope's last float tensor that is read outside the
    scope or is a graph output, in graph order (inner scopes before the outer ones that
    return the same tensor)."""
    nodes = list(proto.graph.node)
    chains = [set(scope_chain(n.name)) for n in nodes]
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    outputs = {o.name for o in proto.graph.output}
    found: dict[str, tuple[int, int, str]] = {}
    for i, node in enumerate(nodes):
        chain = scope_chain(node.name)
        for tensor in (t for t in node.output if t in floats):
            for depth, scope in enumerate(chain):
                if tensor in outputs or any(scope not in chains[j] for j in readers.get(tensor, [])):
                    found[scope] = (i, -depth, tensor)
    ordered = sorted(found.items(), key=lambda kv: kv[1][:2])
    return {scope: tensor for scope, (_, _, tensor) in ordered}


def tensor_sites(proto: Any, floats: dict[str, Any]) -> dict[str, str]:
    """Site → tensor for every float tensor a main-graph node produces, named by the tensor."""
    return {t: t for node in proto.graph.node for t in node.output if t in floats}


# -- the module ---------------------------------------------------------------------------------
class _Site(nn.Module):
    """The tensor at one site, as a leaf module: hooks read (or replace) what it returns."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class OnnxModel(nn.Module):
    """An ONNX graph run by onnxruntime, with its intermediate tensors as sites.

    Args:
        proto: the ``onnx.ModelProto`` (checked).
        path: where it was read from (for messages).
        expose: ``auto`` | ``scopes`` | ``tensors`` (see the module docstring).
        threads: onnxruntime intra-op threads.
        digest: sha256 of the model's bytes (what ``onnx_sha256`` holds).

    Call it like the exported model: ``model(input_ids=…, attention_mask=…)`` or
    ``model(pixel_values)`` (positional arguments in the graph's input order). It returns
    the first graph output (B, …) as a float tensor, or a tuple when there are several.
    """

    def __init__(self, proto: Any, path: Path, *, expose: str = "auto", threads: int = 1, digest: bytes = b""):
        super().__init__()
        if expose not in ("auto", "scopes", "tensors"):
            raise ForensicsError(f"expose={expose!r} is unknown; use auto, scopes or tensors")
        self.path = path
        self.proto = proto
        self.threads = int(threads)
        self.onnx_sha256 = nn.Parameter(torch.tensor(list(digest), dtype=torch.float32), requires_grad=False)
        floats = float_tensors(proto)
        scoped = scope_sites(proto, floats) if expose != "tensors" else {}
        self.site_tensors: dict[str, str] = scoped if scoped or expose == "scopes" else tensor_sites(proto, floats)
        self.tensor_dtypes = floats
        self.output_names = [o.name for o in proto.graph.output]
        initializers = {t.name for t in proto.graph.initializer}
        self.inputs = [_graph_input(i) for i in proto.graph.input if i.name not in initializers]
        self.random_ops = [(n.op_type, n.name) for n in proto.graph.node if n.op_type in RANDOM_OPS]
        for site in self.site_tensors:
            # Set directly: add_module refuses dots, and the site's name is the module path.
            self._modules[site] = _Site()
        self.runs = 0  # onnxruntime runs, split-graph re-runs included
        # Built now, so a graph onnxruntime cannot run is refused at load, not at the first call.
        self._sessions: dict[frozenset[str], Any] = {frozenset(): self._session(frozenset())}

    # -- calling ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feeds = self.feeds(args, kwargs)
        replaced: dict[str, np.ndarray] = {}
        values = self._run(feeds, replaced)
        grad = torch.is_grad_enabled()
        leaves: list[torch.Tensor] = []  # with autograd on: what a backward pass would reach
        for site, tensor in self.site_tensors.items():
            value = torch.from_numpy(values[tensor].copy() if grad else values[tensor])
            if grad:
                leaves.append(value.requires_grad_())
            version = value._version
            out = self._modules[site](value)  # type: ignore[misc]
            if grad and isinstance(out, torch.Tensor) and out.requires_grad and out is not value:
                leaves.append(out)
            if out is not value or value._version != version:
                replaced[tensor] = _as_array(out, values[tensor], site)
                values = self._run(feeds, replaced)
        results = tuple(torch.from_numpy(np.ascontiguousarray(values[name])) for name in self.output_names)
        if leaves:  # a backward pass through these raises OnnxGradientError, not a torch message
            results = tuple(_NoBackward.apply(r, *leaves) for r in results)
        return results[0] if len(results) == 1 else results

    def feeds(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The graph's inputs from a call's arguments, checked (names, dtypes, ranks).

        Raises:
            ForensicsError: an input the graph does not have, one it needs and did not get,
                or one of the wrong kind (text for an image model, say).
        """
        names = [i.name for i in self.inputs]
        given = {k: v for k, v in kwargs.items() if k not in FORWARD_OPTIONS and v is not None}
        if len(args) > len(names):
            raise ForensicsError(
                f"'{self.path.name}' takes {len(names)} inputs ({self.describe_inputs()}), got {len(args)}"
            )
        given.update(zip(names, args, strict=False))
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ForensicsError(
                f"'{self.path.name}' has no input {', '.join(map(repr, unknown))}; its inputs: {self.describe_inputs()}"
            )
        if "attention_mask" in names and "attention_mask" not in given and "input_ids" in given:
            given["attention_mask"] = torch.ones_like(torch.as_tensor(given["input_ids"]))
        missing = [n for n in names if n not in given]
        if missing:
            raise ForensicsError(
                f"'{self.path.name}' needs the inputs {', '.join(missing)} too; its inputs: {self.describe_inputs()}"
            )
        return {spec.name: _checked_input(spec, given[spec.name], self.path.name) for spec in self.inputs}

    def describe_inputs(self) -> str:
        """The graph's inputs in one line: ``pixel_values (float32, [?, 1, 8, 8])``."""
        return ", ".join(i.describe() for i in self.inputs)

    @property
    def takes_text(self) -> bool:
        """Whether the graph reads token ids (an integer input)."""
        return any(i.is_text for i in self.inputs)

    # -- onnxruntime ----------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray], replaced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cut = frozenset(replaced)
        if cut and self.random_ops:
            shown = ", ".join(f"{op} '{name}'" for op, name in self.random_ops[:8])
            raise OnnxRewriteError(
                f"'{self.path.name}' cannot be rewritten for an intervention: it has ops whose result changes "
                f"from run to run ({shown}), and an intervention re-runs the graph with the tensor replaced; "
                "export the model in eval mode without random ops"
            )
        session = self._sessions.get(cut)
        if session is None:
            session = self._sessions[cut] = self._session(cut)
        fetch = [t for t in dict.fromkeys([*self.site_tensors.values(), *self.output_names]) if t not in cut]
        self.runs += 1
        arrays = session.run(fetch, {**feeds, **replaced})
        return {**dict(zip(fetch, arrays, strict=True)), **replaced}

    def _session(self, cut: frozenset[str]) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.use_deterministic_compute = True
        graph = exposed(self.proto, [t for t in self.site_tensors.values()], self.tensor_dtypes, cut)
        try:
            return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's Fail / NotImplemented / InvalidGraph
            raise ModelLoadError(
                f"onnxruntime cannot run '{self.path.name}': {str(exc).splitlines()[0][:240]}"
            ) from None

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise ForensicsError(f"'{self.path.name}' is an ONNX model: it runs inference only, it cannot be trained")
        return super().train(False)


def exposed(proto: Any, tensors: Iterable[str], dtypes: dict[str, Any], cut: frozenset[str] = frozenset()) -> Any:
    """A copy of ``proto`` whose outputs also hold ``tensors``, and in which each tensor of
    ``cut`` is an input: its producer's result is renamed away (left unread) and the graph
    reads the value fed under its name instead (the graph split at that tensor)."""
    import onnx
    from onnx import helper

    graph_copy = onnx.ModelProto()
    graph_copy.CopyFrom(proto)
    graph = graph_copy.graph
    present = {o.name for o in graph.output}
    elem = {
        np.float32: onnx.TensorProto.FLOAT,
        np.float16: onnx.TensorProto.FLOAT16,
        np.float64: onnx.TensorProto.DOUBLE,
    }
    for name in tensors:
        if name not in present and name not in cut:
            graph.output.append(helper.make_tensor_value_info(name, elem[dtypes[name]], None))
            present.add(name)
    if cut:
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name in cut:
                    node.output[i] = f"{name}::replaced"
        kept = [o for o in graph.output if o.name not in cut]
        del graph.output[:]
        graph.output.extend(kept)
        for name in sorted(cut):
            graph.input.append(helper.make_tensor_value_info(name, elem[dtypes[name]], None))
    return graph_copy


def _graph_input(info: Any) -> GraphInput:
    tensor = info.type.tensor_type
    dtype = _NUMPY_OF.get(tensor.elem_type, np.float32)
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return GraphInput(info.name, dtype, shape)


def _checked_input(spec: GraphInput, value: Any, model: str) -> np.ndarray:
    if isinstance(value, str) or (isinstance(value, list | tuple) and value and isinstance(value[0], str)):
        kind = "token ids" if spec.is_text else "an image/tensor"
        raise ForensicsError(f"'{model}' input {spec.describe()} takes {kind}, not text; encode it first")
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    want = np.dtype(spec.dtype)
    if np.issubdtype(want, np.integer) != np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise ForensicsError(
            f"'{model}' input {spec.describe()} got {array.dtype.name} values; "
            + (
                "it reads token ids: give it text through its tokenizer"
                if spec.is_text
                else "it reads float tensors, not token ids"
            )
        )
    if spec.shape is not None and array.ndim != len(spec.shape):
        raise ForensicsError(f"'{model}' input {spec.describe()} got shape {list(array.shape)}: wrong rank")
    if spec.shape is not None:
        for axis, (want_dim, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if want_dim not in (None, 0) and want_dim != got:
                raise ForensicsError(
                    f"'{model}' input {spec.describe()} got shape {list(array.shape)} (axis {axis} must be {want_dim}); "
                    "export with dynamic_axes for that axis to feed other sizes"
                )
    return np.ascontiguousarray(array.astype(want, copy=False))


def _as_array(new: Any, old: np.ndarray, site: str) -> np.ndarray:
    if not isinstance(new, torch.Tensor) or tuple(new.shape) != old.shape:
        shape = None if not isinstance(new, torch.Tensor) else list(new.shape)
        raise OnnxRewriteError(
            f"site '{site}': an intervention returned shape {shape}, the tensor has {list(old.shape)}"
        )
    return np.ascontiguousarray(new.detach().cpu().numpy().astype(old.dtype, copy=False))
