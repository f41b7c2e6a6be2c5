"""What the inspection console shows, computed from bundle files: pure functions from an
opened :class:`~model_forensics.core.bundle.Bundle` (or a served directory) to the pydantic
models of :mod:`model_forensics.server.responses`. The JSON API and the offline report both
call these, so both show the same numbers. No FastAPI here.

Layouts: the ActivityCube's metrics are read as (layers, tokens) from ``cube.json``, value for
value (nothing is averaged or recomputed); an attention pattern is the recorded
``blocks.L.attn.pattern`` (B, H, T_q, T_k), batch element 0, or, when only q and k were
recorded (B, T, H, d_head), recomputed as softmax(q kᵀ / √d_head) with the model's mask
(causal for decoders; rotary positions applied for Llama-family models).

Large data is cut, never sent whole: tokens are paged (a window of ``max_tokens`` from
``token_offset``), layers are thinned to ``max_layers`` evenly spaced rows (first and last
kept), and every slice says so in ``downsampled`` and ``note``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import weakref
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from model_forensics.core.bundle import DATA_FILES, MANIFEST, Bundle
from model_forensics.core.errors import ForensicsError
from model_forensics.core.sites import block_index, site_kind
from model_forensics.server.responses import (
    Attention,
    BundleDetail,
    BundleSummary,
    Compare,
    CubeSlice,
    Influence,
    InspectionDetail,
    InspectionSummary,
    Plot,
    SiteInfo,
)
from model_forensics.server.security import BadParameter, Forbidden, NotFound, relative_id, resolve_inside

if TYPE_CHECKING:
    from model_forensics.replay import Session

MAX_DEPTH = 4  # how deep under the served directory bundles and inspections are looked for
MAX_ENTRIES = 20_000  # directory entries visited per scan, at most
MAX_JSON_BYTES = 64 * 1024 * 1024  # analysis / inspection JSON files larger than this are ignored
MAX_TEXT_CHARS = 200  # prompt and output in the bundle list
ZIP_SUFFIX = ".mfb.zip"
ANALYSIS_KEYS = frozenset({"anomalies", "ranking", "fix_set"})
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "smollm", "olmo")
BIDIRECTIONAL_FAMILIES = ("bert", "roberta", "distilbert", "electra")

Cache = MutableMapping[Any, Any]


# -- finding things under the served directory ---------------------------------------------
def _walk(root: Path) -> Iterator[tuple[Path, int]]:
    """(directory, depth) under ``root``, breadth first, links never followed, hidden
    entries skipped, bundle directories not entered."""
    queue = [(root, 0)]
    seen = 0
    while queue:
        folder, depth = queue.pop(0)
        yield folder, depth
        if depth >= MAX_DEPTH or (folder / MANIFEST).is_file():
            continue
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                return
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                queue.append((Path(entry.path), depth + 1))


def find_bundles(root: Path) -> list[Path]:
    """Bundle directories (holding a ``manifest.json``, readable or not) and ``*.mfb.zip``
    files under ``root``, sorted by path."""
    found: list[Path] = []
    for folder, _ in _walk(root):
        if folder != root and _is_plain_file(folder / MANIFEST):
            found.append(folder)
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        found += [Path(e.path) for e in entries if e.name.endswith(ZIP_SUFFIX) and e.is_file(follow_symlinks=False)]
    if _is_plain_file(root / MANIFEST):
        found.append(root)
    return sorted(set(found))


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def bundle_path(root: Path, bundle_id: str) -> Path:
    """The bundle an id names (``.`` is the served directory itself, when it is one).

    Raises:
        Forbidden: the id escapes the served directory or passes through a link.
        NotFound: no bundle there.
    """
    if bundle_id == "." and _is_plain_file(root / MANIFEST):
        return root
    path = resolve_inside(root, bundle_id, "bundle id")
    if path.name.endswith(ZIP_SUFFIX) and _is_plain_file(path):
        return path
    if path.is_dir() and _is_plain_file(path / MANIFEST):
        return path
    raise NotFound(f"bundle id {bundle_id!r} is not a bundle; list the bundles with GET /api/bundles")


def bundle_id_of(root: Path, path: Path) -> str:
    return "." if path == root else relative_id(root, path)


def signature(path: Path) -> tuple[Any, ...]:
    """Changes whenever the bundle's files do (mtime and size of each)."""
    files = [path] if path.is_file() else [path / name for name in (MANIFEST, *DATA_FILES)]
    out: list[Any] = [str(path)]
    for file in files:
        try:
            info = os.lstat(file)
            out += [info.st_mtime_ns, info.st_size]
        except OSError:
            out += [None, None]
    return tuple(out)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())


# -- the bundle list and detail --------------------------------------------------------------
def _clip(text: str | None, n: int = MAX_TEXT_CHARS) -> str | None:
    if text is None:
        return None
    return text if len(text) <= n else text[: n - 1] + "…"


def _output_text(manifest: dict[str, Any]) -> str | None:
    out = manifest.get("output") or {}
    if out.get("text") is not None:
        return str(out["text"])
    prediction = out.get("prediction")
    if prediction is None:
        return None
    labels = ((manifest.get("model") or {}).get("config") or {}).get("id2label") or {}
    label = labels.get(str(prediction))
    return f"class {prediction}" + (f" ({label})" if label else "")


def bundle_summary(
    root: Path, path: Path, *, bundle: Bundle | None = None, verify_max_bytes: int = 256 * 1024 * 1024
) -> BundleSummary:
    """One row of the bundle list. A bundle that cannot be opened is returned with ``error``
    (the reason) and nulls; one whose files fail their sha256 has ``verified`` False.

    Args:
        root: the served directory; ``path``: the bundle under it.
        bundle: the bundle already opened (without verification), if at hand.
        verify_max_bytes: check sha256 of every data file of bundles up to this size
            (larger ones: sizes only, ``verified`` null unless a size differs).
    """
    bundle_id = bundle_id_of(root, path)
    try:
        opened = bundle or Bundle.open(path, verify=False)
    except ForensicsError as exc:
        return BundleSummary(id=bundle_id, name=path.name, size_bytes=_safe_size(path), error=str(exc))
    manifest = opened.manifest
    predicate = opened.predicate
    size = opened.size_bytes()
    problems = _size_problems(opened)
    verified: bool | None = False if problems else None
    if not problems and size <= verify_max_bytes:
        verified = not opened.verify_files()
    return BundleSummary(
        id=bundle_id,
        name=opened.name,
        model=(manifest.get("model") or {}).get("name"),
        created=manifest.get("created"),
        mode=(manifest.get("input") or {}).get("mode"),
        prompt=_clip((manifest.get("input") or {}).get("text") or (manifest.get("extras") or {}).get("prompt")),
        predicate=None if predicate is None else predicate.describe(),
        predicate_result=(manifest.get("predicate") or {}).get("holds"),
        output=_clip(_output_text(manifest)),
        size_bytes=size,
        verified=verified,
        partial=bool(opened.partial),
    )


def _safe_size(path: Path) -> int:
    try:
        return _disk_bytes(path)
    except OSError:
        return 0


def _size_problems(bundle: Bundle) -> list[str]:
    """The cheap half of verification: every data file present with its declared size."""
    problems = []
    for name, info in bundle.manifest["files"].items():
        file = bundle.path / name
        if not file.is_file() or file.stat().st_size != info["bytes"]:
            problems.append(name)
    return problems


_CUBES: weakref.WeakKeyDictionary[Bundle, dict[str, Any]] = weakref.WeakKeyDictionary()


def cube_of(bundle: Bundle) -> dict[str, Any]:
    """The bundle's ``cube.json``, parsed once per opened bundle (treat it as read-only)."""
    cube = _CUBES.get(bundle)
    if cube is None:
        cube = _CUBES[bundle] = bundle.cube()
    return cube


def tokens_of(bundle: Bundle) -> list[str]:
    """The token strings of the recorded sequence (prompt and generated positions)."""
    tokens = (bundle.manifest.get("input") or {}).get("tokens")
    if tokens:
        return [str(t) for t in tokens]
    return [str(t) for t in cube_of(bundle).get("tokens", [])]


def _config(bundle: Bundle) -> dict[str, Any]:
    return dict((bundle.manifest.get("model") or {}).get("config") or {})


def _pattern_sites(bundle: Bundle) -> dict[int, str]:
    return {
        block: site
        for site in bundle.sites
        if site_kind(site) == "attn.pattern" and (block := block_index(site)) is not None
    }


def _qk_layers(bundle: Bundle) -> list[int]:
    """Layers whose pattern can be recomputed: q and k recorded, a known architecture."""
    if _attention_family(bundle) is None:
        return []
    sites = set(bundle.sites)
    layers = {block_index(s) for s in sites if site_kind(s) == "attn.q"}
    return sorted(b for b in layers if b is not None and f"blocks.{b}.attn.k" in sites)


def _attention_family(bundle: Bundle) -> str | None:
    kind = str(_config(bundle).get("model_type") or "").lower()
    if kind == "gpt2":
        return "gpt2"
    if kind in ROPE_FAMILIES:
        rope = _config(bundle).get("rope_scaling") or _config(bundle).get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        return "rope" if rope_type in (None, "default") else None
    if kind in BIDIRECTIONAL_FAMILIES:
        return "bidirectional"
    return None


def head_counts(bundle: Bundle) -> tuple[int | None, int | None]:
    """(query heads, key/value heads), from the recorded shapes or the model config."""
    sites = bundle.manifest["sites"]
    config = _config(bundle)
    heads: int | None = None
    kv: int | None = None
    for site, info in sites.items():
        kind = site_kind(site)
        if kind == "attn.pattern":
            heads = int(info["shape"][1])
        elif kind in ("attn.q", "attn.z") and heads is None:
            heads = int(info["shape"][2])
        elif kind == "attn.k" and len(info["shape"]) == 4:
            kv = int(info["shape"][2])
    heads = heads or _int(config.get("num_attention_heads", config.get("n_head")))
    kv = kv or _int(config.get("num_key_value_heads")) or heads
    return heads, kv


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def n_layers(bundle: Bundle) -> int:
    blocks = [b for s in bundle.sites if (b := block_index(s)) is not None]
    if blocks:
        return max(blocks) + 1
    return len(cube_of(bundle).get("layers") or [])


def cube_metrics(cube: dict[str, Any]) -> list[str]:
    """Metric names every layer of the cube carries (``attention_scores`` too, when every
    layer has the last query's head-mean attention)."""
    layers = cube.get("layers") or []
    if not layers:
        return []
    names = set(layers[0].get("core_metrics") or {})
    for layer in layers[1:]:
        names &= set(layer.get("core_metrics") or {})
    ordered = [n for n in (layers[0].get("core_metrics") or {}) if n in names]
    if all(layer.get("attention_scores") is not None for layer in layers):
        ordered.append("attention_scores")
    return ordered


def bundle_detail(
    root: Path, path: Path, bundle: Bundle, analyses: list[str], summary: BundleSummary | None = None
) -> BundleDetail:
    """Everything the bundle page needs before it asks for slices (``summary``: the list
    row, when already computed)."""
    heads, kv = head_counts(bundle)
    patterns = _pattern_sites(bundle)
    recomputable = [] if patterns else _qk_layers(bundle)
    layers = sorted(patterns) or recomputable
    return BundleDetail(
        summary=summary or bundle_summary(root, path, bundle=bundle),
        manifest=bundle.manifest,
        tokens=tokens_of(bundle),
        sites=[
            SiteInfo(name=s, shape=list(i["shape"]), dtype=str(i["dtype"]), sketch=i.get("sketch"))
            for s, i in bundle.manifest["sites"].items()
        ],
        layers=n_layers(bundle),
        heads=heads,
        kv_heads=kv,
        metrics=cube_metrics(cube_of(bundle)),
        has_attention=bool(layers),
        attention_layers=layers,
        attention_source="recorded" if patterns else ("recomputed" if recomputable else None),
        analyses=analyses,
    )


# -- slices ------------------------------------------------------------------------------------
def _window(total: int, offset: int, size: int, what: str) -> range:
    if size < 1:
        raise BadParameter(f"max {what} must be at least 1, got {size}")
    if not 0 <= offset < max(total, 1):
        raise BadParameter(f"{what} offset {offset} is outside 0–{max(total - 1, 0)}")
    return range(offset, min(total, offset + size))


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices out of ``range(n)``, evenly spaced, first and last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _metric_rows(cube: dict[str, Any], metric: str) -> list[list[float]]:
    known = cube_metrics(cube)
    if metric not in known:
        raise BadParameter(f"metric {metric!r} is not in this bundle's cube; use one of {', '.join(known) or '(none)'}")
    if metric == "attention_scores":
        return [list(layer["attention_scores"]) for layer in cube["layers"]]
    return [list(layer["core_metrics"][metric]) for layer in cube["layers"]]


def cube_slice(
    bundle: Bundle,
    metric: str = "energy",
    *,
    max_tokens: int = 128,
    max_layers: int | None = None,
    token_offset: int = 0,
) -> CubeSlice:
    """A (layers × tokens) heatmap of one cube metric, values exactly as in ``cube.json``.

    Args:
        metric: a name from :func:`cube_metrics` (``energy``, ``mean_activation``, …).
        max_tokens: columns at most; longer sequences are paged from ``token_offset``.
        max_layers: rows at most (None: all); more layers are thinned evenly.
    Raises:
        BadParameter: unknown metric, offset outside the sequence, non-positive sizes.
    """
    cube = cube_of(bundle)
    rows = _metric_rows(cube, metric)
    layers = cube.get("layers") or []
    tokens = [str(t) for t in cube.get("tokens") or []]
    total_tokens = len(rows[0]) if rows else len(tokens)
    cols = _window(total_tokens, token_offset, max_tokens, "tokens")
    if max_layers is not None and max_layers < 1:
        raise BadParameter(f"max_layers must be at least 1, got {max_layers}")
    picked = evenly_spaced(len(layers), max_layers or len(layers))
    notes = []
    if len(cols) < total_tokens:
        notes.append(f"tokens {cols.start}–{cols.stop - 1} of {total_tokens} (page with token_offset)")
    if len(picked) < len(layers):
        notes.append(f"{len(picked)} of {len(layers)} layers, evenly spaced")
    kinds = {
        "resid" if str((la.get("raw_ref") or {}).get("site", "")).endswith("resid_post") else "module" for la in layers
    }
    return CubeSlice(
        metric=metric,
        tokens=[tokens[i] if i < len(tokens) else str(i) for i in cols],
        positions=list(cols),
        layers=[int(layers[i]["layer_index"]) for i in picked],
        layer_names=[str(layers[i]["layer_name"]) for i in picked],
        site_kind=kinds.pop() if len(kinds) == 1 else "mixed",
        values=[[float(rows[i][t]) for t in cols] for i in picked],
        total_tokens=total_tokens,
        total_layers=len(layers),
        downsampled=bool(notes),
        note="; ".join(notes),
    )


def attention(bundle: Bundle, layer: int, head: int, *, max_tokens: int = 128, offset: int = 0) -> Attention:
    """One head's attention pattern (queries × keys) at one layer.

    The recorded ``blocks.{layer}.attn.pattern`` when there is one, else recomputed from the
    recorded q and k (see the module docstring). Sequences longer than ``max_tokens`` are
    shown as the window ``offset … offset + max_tokens − 1`` on both axes.

    Raises:
        NotFound: no pattern for this layer, and no q/k to recompute it from.
        BadParameter: head or layer outside the model, bad window.
    """
    _, kv = head_counts(bundle)
    site = f"blocks.{layer}.attn.pattern"
    source: Literal["recorded", "recomputed"]
    if site in bundle.manifest["sites"]:
        full = bundle.activation(site)[0]  # (H, T_q, T_k)
        source = "recorded"
    elif layer in _qk_layers(bundle):
        full = recompute_pattern(bundle, layer)
        source = "recomputed"
    else:
        have = sorted(_pattern_sites(bundle)) or _qk_layers(bundle)
        hint = f"layers with attention: {have}" if have else "record with head granularity (--granularity head)"
        raise NotFound(f"layer {layer} has no attention pattern in this bundle; {hint}")
    n_heads = int(full.shape[0])
    if not 0 <= head < n_heads:
        raise BadParameter(f"head {head} is outside 0–{n_heads - 1} (layer {layer} has {n_heads} heads)")
    total = int(full.shape[-1])
    window = _window(total, offset, max_tokens, "tokens")
    matrix = full[head, window.start : window.stop, window.start : window.stop]
    tokens = tokens_of(bundle)
    per_group = n_heads // kv if kv else None
    cut = len(window) < total
    notes = [f"queries and keys {window.start}–{window.stop - 1} of {total} (move with offset)"] if cut else []
    if source == "recomputed":
        sketches = {bundle.manifest["sites"][f"blocks.{layer}.attn.{x}"]["sketch"] for x in ("q", "k")} - {"full"}
        notes.append(
            "recomputed from the recorded q and k"
            + (f" ({'/'.join(sorted(sketches))}: approximate)" if sketches else "")
        )
    return Attention(
        layer=layer,
        head=head,
        heads=n_heads,
        kv_heads=kv,
        kv_group=head // per_group if per_group else None,
        tokens=[tokens[i] if i < len(tokens) else str(i) for i in window],
        positions=list(window),
        matrix=matrix.float().tolist(),
        source=source,
        total_tokens=total,
        downsampled=cut,
        note="; ".join(notes),
    )


def recompute_pattern(bundle: Bundle, layer: int) -> torch.Tensor:
    """Attention probabilities (H, T, T) of batch element 0 from the recorded q and k
    (B, T, H, d_head): softmax(q kᵀ / √d_head) under the model's mask (causal for decoders,
    the attention mask's padding for encoders); Llama-family q and k are recorded before
    rotary embedding, which is applied here (default rotary only)."""
    family = _attention_family(bundle)
    if family is None:
        raise NotFound("this architecture's patterns cannot be recomputed from q and k; record with head granularity")
    q = bundle.activation(f"blocks.{layer}.attn.q")[0].double()  # (T, H, d)
    k = bundle.activation(f"blocks.{layer}.attn.k")[0].double()  # (T, H_kv, d)
    n_heads, n_kv, d_head = q.shape[1], k.shape[1], q.shape[2]
    length = q.shape[0]
    if family == "rope":
        q, k = _rotary(q, k, float(_config(bundle).get("rope_theta", 10000.0)))
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (T, H, d): each query head reads its kv group
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d_head)  # (H, T_q, T_k)
    if family == "bidirectional":
        mask = bundle.inputs.get("attention_mask")
        if mask is not None:
            keep = mask[0, :length].bool()
            scores = scores.masked_fill(~keep[None, None, :], float("-inf"))
    else:
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1).float()


def _rotary(q: torch.Tensor, k: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (HF ``rotate_half`` convention) at positions 0 … T−1."""
    length, d = q.shape[0], q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))  # (d/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, d/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]  # (T, 1, d)
    cos, sin = emb.cos(), emb.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def compare(
    a: Bundle,
    b: Bundle,
    metric: str = "energy",
    *,
    max_tokens: int = 128,
    max_layers: int | None = None,
    token_offset: int = 0,
) -> Compare:
    """Two bundles' cube metric side by side and their difference (b − a), over the layers
    both have and the token positions both have (from the start).

    Raises:
        BadParameter: the metric is missing from either cube, or they share no layer.
    """
    cube_a, cube_b = cube_of(a), cube_of(b)
    rows_a, rows_b = _metric_rows(cube_a, metric), _metric_rows(cube_b, metric)
    index_a = {int(la["layer_index"]): i for i, la in enumerate(cube_a["layers"])}
    index_b = {int(la["layer_index"]): i for i, la in enumerate(cube_b["layers"])}
    shared = sorted(set(index_a) & set(index_b))
    if not shared:
        raise BadParameter("the two bundles share no cube layer; compare bundles of the same architecture")
    len_a, len_b = len(rows_a[0]), len(rows_b[0])
    common = min(len_a, len_b)
    cols = _window(common, token_offset, max_tokens, "tokens")
    if max_layers is not None and max_layers < 1:
        raise BadParameter(f"max_layers must be at least 1, got {max_layers}")
    layers = [shared[i] for i in evenly_spaced(len(shared), max_layers or len(shared))]
    notes = ["diff = b − a"]
    if len_a != len_b:
        notes.append(f"a has {len_a} tokens and b {len_b}: the first {common} positions are compared")
    if len(cols) < common:
        notes.append(f"tokens {cols.start}–{cols.stop - 1} of {common} (page with token_offset)")
    if len(layers) < len(shared):
        notes.append(f"{len(layers)} of {len(shared)} shared layers, evenly spaced")
    if len(shared) < max(len(index_a), len(index_b)):
        notes.append(f"{len(shared)} layers in both bundles")
    va = [[float(rows_a[index_a[la]][t]) for t in cols] for la in layers]
    vb = [[float(rows_b[index_b[la]][t]) for t in cols] for la in layers]
    tokens_a, tokens_b = [str(t) for t in cube_a["tokens"]], [str(t) for t in cube_b["tokens"]]
    return Compare(
        a=va,
        b=vb,
        diff=[[y - x for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(va, vb, strict=True)],
        metric=metric,
        tokens_a=[tokens_a[t] if t < len(tokens_a) else str(t) for t in cols],
        tokens_b=[tokens_b[t] if t < len(tokens_b) else str(t) for t in cols],
        layers=layers,
        note="; ".join(notes),
    )


def influence(
    session: Session, target: str | int | None = None, method: str = "occlusion", position: int = -1
) -> Influence:
    """Token influence of every prompt token on one output of a replay Session
    (:func:`model_forensics.circuits.token_influence`), as the console shows it.

    Raises:
        ForensicsError: an unknown method, a target that is not one token, a bad position.
    """
    from model_forensics.circuits import token_influence

    result = token_influence(session, target=target, method=method, position=position)
    return Influence(
        tokens=list(result.tokens),
        scores=[float(s) for s in result.scores],
        method=result.method,
        target=result.objective.token_id,
        target_label=result.objective.label,
        position=result.objective.position,
        evidence=result.evidence,
        causal=result.evidence == "causal",
        value=float(result.value),
        forward_passes=int(result.forward_passes),
        notes=list(result.notes),
    )


# -- analyses ------------------------------------------------------------------------------------
def _read_json(path: Path, cache: Cache | None = None) -> Any:
    """A JSON file's content (None: unreadable, too large or not JSON), cached by mtime/size."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
        return None
    key = (str(path), info.st_mtime_ns, info.st_size)
    if cache is not None and key in cache:
        return cache[key]
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        value = None
    if cache is not None:
        cache[key] = value
    return value


def is_analysis(value: Any) -> bool:
    """An ``Analysis.to_json()`` as ``analyze --out`` or ``batch --results`` writes it."""
    return isinstance(value, dict) and set(value) >= ANALYSIS_KEYS and isinstance(value.get("bundle"), str)


def analysis_file_name(bundle: Path) -> str:
    """Where a console job writes a bundle's analysis, beside it: ``NAME.analysis.json``."""
    return bundle.name.removesuffix(ZIP_SUFFIX) + ".analysis.json"


def find_analyses(bundle: Path, extra: dict[str, Path] | None = None, cache: Cache | None = None) -> dict[str, Path]:
    """The analyses of ``bundle``: JSON files beside it, or one folder down (``batch
    --results``), whose ``bundle`` field names a bundle of the same name.

    Names are the file's path relative to the bundle's folder without ``.json``
    (``incident-0.analysis``, ``results/incident-0``); ``extra`` adds named files (jobs'
    results kept outside the served directory).
    """
    folder = bundle.parent
    found: dict[str, Path] = {}
    candidates: list[Path] = []
    try:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                candidates.append(path)
            elif entry.is_dir(follow_symlinks=False) and not (path / MANIFEST).exists():
                candidates += sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
    except OSError:
        candidates = []
    for path in candidates:
        value = _read_json(path, cache)
        if is_analysis(value) and Path(value["bundle"]).name == bundle.name:
            found[path.relative_to(folder).as_posix().removesuffix(".json")] = path
    for name, path in (extra or {}).items():
        if path.is_file():
            found[name] = path
    return found


def read_analysis(path: Path) -> dict[str, Any]:
    """An analysis JSON file (checked again: it may have changed since it was listed).

    Raises:
        NotFound: it is gone or no longer an analysis.
    """
    value = _read_json(path)
    if not is_analysis(value):
        raise NotFound(f"analysis {path.name!r} is gone or is not an analysis any more")
    return dict(value)


# -- inspections -------------------------------------------------------------------------------
def _inspection_results(folder: Path, cache: Cache | None = None) -> dict[str, Any] | None:
    value = _read_json(folder / "results.json", cache)
    if isinstance(value, dict) and isinstance(value.get("experiments"), list):
        return value
    return None


def find_inspections(root: Path, cache: Cache | None = None) -> list[InspectionSummary]:
    """``inspect --out`` folders under ``root``: those holding a ``results.json`` with an
    ``experiments`` list."""
    found = []
    for folder, _ in _walk(root):
        results = _inspection_results(folder, cache)
        if results is None:
            continue
        ident = "." if folder == root else relative_id(root, folder)
        found.append(
            InspectionSummary(
                id=ident,
                path=ident,
                model=results.get("model") if isinstance(results.get("model"), str) else None,
                experiments=[str(e) for e in results["experiments"]],
            )
        )
    return found


def inspection_detail(root: Path, inspection_id: str, cache: Cache | None = None) -> InspectionDetail:
    """One inspection: its results, its summary.md and its PNG figures (as ``/api/files``
    URLs).

    Raises:
        NotFound / Forbidden: as :func:`~model_forensics.server.security.resolve_inside`,
            or the folder holds no inspection results.
    """
    folder = root if inspection_id == "." else resolve_inside(root, inspection_id, "inspection id")
    results = _inspection_results(folder, cache) if folder.is_dir() else None
    if results is None:
        raise NotFound(f"inspection {inspection_id!r} holds no results.json; list them with GET /api/inspections")
    prefix = "" if folder == root else relative_id(root, folder) + "/"
    plots = [
        Plot(name=p.stem, url=f"/api/files/{prefix}{p.name}") for p in sorted(folder.glob("*.png")) if _is_plain_file(p)
    ]
    summary_md = folder / "summary.md"
    text = None
    if _is_plain_file(summary_md) and summary_md.stat().st_size <= MAX_JSON_BYTES:
        text = summary_md.read_text(errors="replace")
    return InspectionDetail(id=inspection_id, summary=results, summary_markdown=text, plots=plots)


FILE_TYPES = {".png": "image/png", ".json": "application/json"}


def served_file(root: Path, rel: str) -> tuple[Path, str]:
    """A PNG or JSON file under ``root`` and its media type.

    Raises:
        Forbidden: another file type, or a path that escapes (see ``resolve_inside``).
        NotFound: no such file.
    """
    suffix = Path(rel).suffix.lower()
    if suffix not in FILE_TYPES:
        shown = rel if len(rel) < 80 else rel[:77] + "…"
        raise Forbidden(f"only PNG and JSON files are served, not {shown!r}")
    path = resolve_inside(root, rel, "file")
    if not _is_plain_file(path):
        raise NotFound(f"file {rel!r} is not a plain file")
    return path, FILE_TYPES[suffix]
