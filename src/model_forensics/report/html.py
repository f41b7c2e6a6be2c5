"""The one-file offline report (``model-forensics report BUNDLE -o report.html``).

The built dashboard (``server/static``: index.html, one JS and one CSS file) with its JS and
CSS inlined and the data of the main views embedded as ``window.__MF_DATA__``: the same
pydantic models the JSON API returns, computed by the same functions
(:mod:`model_forensics.server.data`). The page opens from file:// and makes no request.

What is embedded, for one bundle: its summary and detail, every cube metric (up to
``MAX_CUBE_TOKENS`` tokens), attention of every head for as many layers as fit in
``ATTENTION_BUDGET_BYTES`` (layers named by the analysis first, then evenly spaced; each
pattern quantized to 8 bits, 1/255 steps), one token influence (gradient × input on the top
prediction, from a replay), the analyses (``--analysis`` and those found beside the bundle)
and an ``inspect --out`` directory's plots as data: URLs. What was cut is listed in the
page's notes.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.core.files import write_text_atomic
from model_forensics.server import data

STATIC = Path(__file__).resolve().parent.parent / "server" / "static"
MAX_CUBE_TOKENS = 256
MAX_ATTENTION_TOKENS = 128
ATTENTION_BUDGET_BYTES = 1_600_000
MAX_PLOT_BYTES = 2_000_000
FORMAT_VERSION = 1


def write_report(
    bundle: str | Path,
    out: str | Path,
    *,
    analysis: str | Path | dict[str, Any] | None = None,
    inspect: str | Path | None = None,
    influence: bool = True,
) -> Path:
    """Write the report of ``bundle`` to ``out`` atomically and return its path.

    Args:
        bundle: a bundle directory or ``.mfb.zip``.
        analysis: an analysis (``analyze --out`` JSON file, or its dict) to include; analyses
            found beside the bundle are included too.
        inspect: an ``inspect --out`` directory whose plots to include.
        influence: replay the bundle once to embed token influence (needs the model).
    Raises:
        BundleError: the bundle, analysis or inspection cannot be read; or the UI is not built.
    """
    embedded = report_data(bundle, analysis=analysis, inspect=inspect, influence=influence)
    return write_text_atomic(Path(out), report_html(embedded))


def report_html(embedded: dict[str, Any], noscript: str | None = None) -> str:
    """The built dashboard as one HTML string with ``embedded`` as its data; ``noscript`` is
    HTML shown to readers without JavaScript."""
    index = STATIC / "index.html"
    if not index.is_file():
        raise BundleError(f"the dashboard is not built ({index} is missing); run `make ui`")
    page = index.read_text()
    page = re.sub(r"\s*<base href=\"/\"\s*/?>", "", page)  # the report's routes are #/…, nothing is fetched
    page = re.sub(r"<!--.*?-->\s*", "", page, flags=re.S)
    styles = "".join(_asset(m) for m in re.findall(r'<link rel="stylesheet"[^>]*href="\./([^"]+)"[^>]*>', page))
    scripts = [_asset(m) for m in re.findall(r'<script type="module"[^>]*src="\./([^"]+)"[^>]*></script>', page)]
    page = re.sub(r'\s*<link rel="stylesheet"[^>]*>', "", page)
    page = re.sub(r'\s*<script type="module"[^>]*></script>', "", page)
    blob = _json_for_script(embedded)
    head = f"<style>\n{styles}\n</style>\n<script>window.__MF_DATA__ = {blob};</script>\n" + "".join(
        f'<script type="module">\n{_script_safe(s)}\n</script>\n' for s in scripts
    )
    page = page.replace("</head>", head + "</head>", 1)
    if noscript:
        page = page.replace("<body>", f"<body>\n<noscript>{noscript}</noscript>", 1)
    return page


def _asset(relative: str) -> str:
    path = (STATIC / relative).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        raise BundleError(f"the built dashboard names a missing asset {relative!r}; run `make ui`")
    return path.read_text()


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside <script>: ``<`` and ``/`` escaped (same value once parsed, and no
    ``</script>`` or literal URL can appear in the page)."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace("/", "\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _script_safe(js: str) -> str:
    """The bundled JS inlined: ``</script`` cannot end the element early, and URL-like strings
    (XML namespaces, React's error-decoder link; none is fetched) are written with ``\\/``,
    which reads the same inside a string."""
    js = js.replace("</script", "<\\/script")
    return re.sub(r"(https?:)//", r"\1\\/\\/", js)


# -- the embedded data ---------------------------------------------------------------------------
def report_data(
    bundle: str | Path,
    *,
    analysis: str | Path | dict[str, Any] | None = None,
    inspect: str | Path | None = None,
    influence: bool = True,
) -> dict[str, Any]:
    """What the report embeds (``window.__MF_DATA__``), as plain JSON data; see the module
    docstring for what is cut."""
    path = Path(bundle).resolve()
    root = path.parent
    opened = Bundle.open(path)
    bundle_id = data.bundle_id_of(root, path)
    notes: list[str] = ["Offline report: the views that need a model (jobs, replay) need `model-forensics serve`."]
    analyses = {name: data.read_analysis(p) for name, p in data.find_analyses(path).items()}
    if analysis is not None:
        given = _read_analysis(analysis)
        analyses = {"analysis": given, **{k: v for k, v in analyses.items() if v != given}}
    detail = data.bundle_detail(root, path, opened, list(analyses))
    cubes = {}
    for metric in detail.metrics:
        cube = data.cube_slice(opened, metric, max_tokens=MAX_CUBE_TOKENS)
        cubes[metric] = cube.model_dump()
    if cubes and next(iter(cubes.values()))["downsampled"]:
        notes.append(f"Activity: {next(iter(cubes.values()))['note']}.")
    attention, attention_note = _attention(opened, detail.attention_layers, detail.heads or 0, analyses)
    if attention_note:
        notes.append(attention_note)
    # The layer menu offers what the report holds.
    detail.attention_layers = sorted({int(key.split(":")[0]) for key in attention})
    detail.has_attention = bool(attention)
    influences: dict[str, Any] = {}
    if influence and detail.tokens:
        scores, note = _influence(path)
        if scores is not None:
            influences[f"{scores['method']}:default"] = scores
        if note:
            notes.append(note)
    inspections, inspection = _inspection(inspect)
    start = f"/bundle/{'~' if bundle_id == '.' else bundle_id}" + ("/rca" if analysis is not None else "")
    return {
        "version": FORMAT_VERSION,
        "generated": detail.summary.created,
        "start": start,
        "notes": notes,
        "bundles": [detail.summary.model_dump()],
        "details": {bundle_id: detail.model_dump()},
        "cubes": {bundle_id: cubes},
        "attention": {bundle_id: attention},
        "influence": {bundle_id: influences},
        "analyses": {bundle_id: analyses},
        "inspections": inspections,
        "inspection": inspection,
    }


def _read_analysis(analysis: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(analysis, dict):
        return analysis
    path = Path(analysis)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read analysis '{path}': {exc}; pass the JSON `analyze --out` wrote") from None
    if not data.is_analysis(value):
        raise BundleError(f"'{path}' is not an analysis (no anomalies/ranking/fix_set); pass `analyze --out` JSON")
    return dict(value)


def _implicated_layers(analyses: dict[str, dict[str, Any]]) -> list[int]:
    """Blocks the analyses point at: fix-set members first, then the top CF anomalies."""
    sites: list[str] = []
    for result in analyses.values():
        for member in (result.get("fix_set") or {}).get("members", []):
            sites.append(str((member.get("intervention") or {}).get("site", "")))
        sites += [str(a.get("site", "")) for a in (result.get("anomalies") or {}).get("anomalies", [])[:3]]
    layers: list[int] = []
    for site in sites:
        match = re.match(r"blocks\.(\d+)\.", site)
        if match and int(match.group(1)) not in layers:
            layers.append(int(match.group(1)))
    return layers


def _attention(
    bundle: Bundle, layers: list[int], heads: int, analyses: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    """Every head of the layers that fit the byte budget, each pattern quantized to uint8 and
    base64-encoded (``matrix_u8``; the page divides by 255)."""
    if not layers or heads < 1:
        return {}, ""
    wanted = [la for la in _implicated_layers(analyses) if la in layers]
    order = wanted + [la for la in _interleaved(layers) if la not in wanted]
    out: dict[str, Any] = {}
    used = 0
    kept: list[int] = []
    cut = False
    for layer in order:
        encoded = {}
        for head in range(heads):
            pattern = data.attention(bundle, layer, head, max_tokens=MAX_ATTENTION_TOKENS)
            cut = cut or pattern.downsampled
            encoded[f"{layer}:{head}"] = _quantized(pattern.model_dump())
        size = sum(len(e["matrix_u8"]) for e in encoded.values())
        if kept and used + size > ATTENTION_BUDGET_BYTES:
            break
        out.update(encoded)
        used += size
        kept.append(layer)
    notes = ["Attention patterns are quantized to 8 bits (steps of 1/255)."]
    if len(kept) < len(layers):
        notes.append(
            f"Attention of {len(kept)} of {len(layers)} layers is embedded (layers {', '.join(map(str, sorted(kept)))}; "
            "those the analysis names first); `model-forensics serve` shows all."
        )
    if cut:
        notes.append(f"Attention shows the first {MAX_ATTENTION_TOKENS} tokens.")
    return out, " ".join(notes)


def _interleaved(layers: list[int]) -> list[int]:
    """Layers in coarse-to-fine order (first, last, middle, quarters, …), so any prefix is spread out."""
    if not layers:
        return []
    order: list[int] = []
    for k in range(1, len(layers) + 1):
        for i in data.evenly_spaced(len(layers), k):
            if layers[i] not in order:
                order.append(layers[i])
        if len(order) == len(layers):
            break
    return order


def _quantized(pattern: dict[str, Any]) -> dict[str, Any]:
    matrix = pattern.pop("matrix")
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    raw = bytes(max(0, min(255, round(v * 255))) for row in matrix for v in row)
    return {**pattern, "shape": [rows, cols], "matrix_u8": base64.b64encode(raw).decode()}


def dequantized(entry: dict[str, Any]) -> list[list[float]]:
    """The (queries × keys) matrix of a quantized attention entry, as the page decodes it."""
    rows, cols = entry["shape"]
    raw = base64.b64decode(entry["matrix_u8"])
    return [[raw[r * cols + c] / 255 for c in range(cols)] for r in range(rows)]


def _influence(path: Path) -> tuple[dict[str, Any] | None, str]:
    """Gradient × input influence on the top prediction, from one replay of the bundle."""
    from model_forensics.replay import SandboxReplayer

    try:
        session = SandboxReplayer().load_bundle(path)
    except ForensicsError as exc:
        return None, f"Token influence is not included: the bundle could not be replayed ({exc})."
    try:
        return data.influence(session, None, "grad_x_input", -1).model_dump(), (
            "Token influence: gradient × input on the top prediction; `model-forensics serve` computes the other methods."
        )
    except ForensicsError as exc:
        return None, f"Token influence is not included: {exc}."
    finally:
        session.close()


def _inspection(inspect: str | Path | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An ``inspect --out`` directory: its summary and plots (PNG as data: URLs)."""
    if inspect is None:
        return [], {}
    folder = Path(inspect).resolve()
    if not folder.is_dir():
        raise BundleError(f"--inspect '{inspect}' is not a directory; pass what `inspect --out` wrote")
    found = [i for i in data.find_inspections(folder) if i.id == "."]
    if not found:
        raise BundleError(f"'{inspect}' holds no results.json; pass the directory `inspect --out` wrote")
    summary = found[0].model_copy(update={"id": folder.name, "path": folder.name})
    detail = data.inspection_detail(folder, ".")
    plots = []
    for plot in detail.plots:
        png = folder / f"{plot.name}.png"
        if png.stat().st_size <= MAX_PLOT_BYTES:
            plots.append(
                {"name": plot.name, "url": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()}
            )
    shown = detail.model_copy(update={"id": folder.name}).model_dump()
    shown["plots"] = plots
    return [summary.model_dump()], {folder.name: shown}
