"""The root-cause analysis in the report (``analyze --report out.html``).

``analyze --report`` writes the one-file interactive report (:mod:`model_forensics.report.html`)
with the analysis included and opening on its RCA view (:func:`analysis_html`). :func:`analysis_body` renders the same
JSON (:func:`model_forensics.rca.pipeline.analyze_bundle`'s) as static HTML: the plain-words
explanation, CF anomalies, the attribution ranking, the fix set (members, gate or direction,
necessity, sufficiency), side effects, implicated units, forward passes by phase and notes,
with inline PNG figures (matplotlib, Agg). The report carries it in ``<noscript>``, so a reader
without JavaScript still gets the analysis.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from model_forensics.core import plots
from model_forensics.core.files import write_text_atomic
from model_forensics.rca.explain import Section, explain, held_out_rows, step_gate_rows

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; font-weight: 600; }
.note { background: #fffbe6; padding: .3em .6em; margin: .3em 0; border-left: 3px solid #e0b000; }
img { max-width: 100%; }
"""


def write_analysis_report(result: dict[str, Any], path: str | Path, influence: bool = True) -> Path:
    """Write the report of ``result`` (an ``Analysis.to_json()``) to ``path`` atomically: a
    temporary file in the same directory, renamed into place, so a failure leaves no
    half-written report."""
    target = Path(path)
    return write_text_atomic(target, analysis_html(result, report_to=str(target), influence=influence))


def analysis_html(result: dict[str, Any], report_to: str | None = None, influence: bool = True) -> str:
    """The report as one HTML string: the interactive one-file report of ``result['bundle']``
    with the analysis included (opening on its RCA view), and the static analysis
    (:func:`analysis_body`) for readers without JavaScript.

    Args:
        influence: replay the bundle once to embed token influence.
    """
    from model_forensics.report.html import report_data, report_html

    embedded = report_data(result["bundle"], analysis=result, influence=influence)
    static = analysis_body(result, report_to=report_to)
    return report_html(embedded, noscript=f"<style>{STYLE}</style>{static}")


def analysis_body(result: dict[str, Any], report_to: str | None = None) -> str:
    """The analysis as HTML: the plain-words explanation
    (:func:`~model_forensics.rca.explain.explain`: incident, conclusion, what was tried,
    what is uncertain, next commands) around the fix set, then the CF anomalies, the
    attribution ranking and the notes."""
    fix = result.get("fix_set")
    sections = {s.key: s for s in explain(result, report_to=report_to, anomalies_shown=True)}
    parts = [
        f"<h1>Root-cause analysis: {escape(Path(result['bundle']).name)}</h1>",
        f"<p>Bundle <code>{escape(result['bundle'])}</code> · {result['forward_passes']} forward passes · "
        f"{result['seconds']:.1f} s</p>",
        *_explained(sections, ("incident", "conclusion", "conversation")),
    ]
    if fix is not None:
        parts += _fix_section(fix)
        parts += _step_gate_section(result.get("step_gate"), sections)
        parts += _explained(sections, ("tried", "uncertain", "next"), notes=False)
    parts += _anomaly_section(result["anomalies"])
    parts += _ranking_section(result["ranking"])
    notes = [*result["anomalies"].get("notes", []), *(fix["notes"] if fix else [])]
    if notes:
        parts.append("<h2>Notes</h2>")
        parts += [f'<div class="note">{escape(n)}</div>' for n in notes]
    return "\n".join(parts)


def _explained(sections: dict[str, Section], keys: tuple[str, ...], notes: bool = True) -> list[str]:
    """Sections of the explanation as HTML; ``notes=False`` leaves out the search's notes
    (the Notes section lists them)."""
    out = []
    for key in keys:
        if key not in sections:
            continue
        section = sections[key]
        out.append(f"<h2>{escape(section.title)}</h2>")
        out += [f"<p>{escape(p)}</p>" for p in section.paragraphs]
        items = section.items if notes or key != "tried" else []
        if items:
            out.append("<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>")
        if section.commands:
            rows = "".join(f"<li><code>{escape(c)}</code>: {escape(d)}</li>" for c, d in section.commands)
            out.append(f"<ul>{rows}</ul>")
    return out


def _fix_section(fix: dict[str, Any]) -> list[str]:
    reached = "ok" if fix["reached_threshold"] else "bad"
    out = [
        "<h2>Minimal fix set</h2>",
        f"<p>{len(fix['members'])} interventions of {fix['candidates']} candidate units flip "
        f"<span class='{reached}'>{fix['total_flip_rate']:.0%}</span> of {len(fix['flips'])} failing variants "
        f"(search: {escape(fix['strategy'])}, guidance: {escape(fix['guidance'])}).</p>",
    ]
    rows = []
    for m in fix["members"]:
        iv = m["intervention"]
        how = escape(f"{iv['site']}:{iv['kind']}")
        if iv.get("direction"):
            how += " along its failure direction"
        if iv.get("gate"):
            gate = iv["gate"]
            how += escape(f", gated at {gate['site']} (score > {gate['above']:.4g}, reads {gate.get('reads', 'last')})")
        kl = "–" if m["benign_kl"] is None else f"{m['benign_kl']:.3g}"
        rows.append(
            [how, escape(m["level"]), f"{m['necessity']:.0%}", f"{m['sufficiency']:.0%}", f"{m['attribution']:.3g}", kl]
        )
    out.append(
        _table(
            ["intervention", "level", "necessity", "sufficiency", "attribution", "solo benign KL"], rows, first_text=2
        )
    )
    if fix["members"]:
        out.append(_members_figure(fix["members"]))
    se = fix.get("side_effects")
    if se:
        within = "ok" if se["within_bound"] else "bad"
        first = "" if se.get("first_step_kl") is None else f" (first step alone {se['first_step_kl']:.3g})"
        out.append(
            f"<p>Side effects on {se['n_benign']} benign prompts: mean KL "
            f"<span class='{within}'>{se['mean_kl']:.3g}</span> nats{first}, max {se['max_kl']:.3g}, bound "
            f"{se['bound']:g}; accuracy {se['accuracy_clean']:.0%} → {se['accuracy_fixed']:.0%}; predicate "
            f"changed on {se['predicate_changed']:.0%}.</p>"
        )
    held = held_out_rows(fix)
    if held:
        out.append("<h2>Search and held-out prompts</h2>")
        out.append(_table(["figure", "search", "held out"], [[escape(c) for c in row] for row in held]))
    if fix.get("implicated"):
        out.append("<h2>Implicated units (exact patching above the noise floor)</h2>")
        rows = [[escape(e["unit"]), escape(e["level"]), f"{e['effect']:.3g}"] for e in fix["implicated"]]
        out.append(_table(["unit", "level", "effect"], rows, first_text=2))
    if fix.get("phase_passes"):
        out.append("<h2>Forward passes by phase</h2>")
        out.append(_table(["phase", "forward passes"], [[escape(k), str(v)] for k, v in fix["phase_passes"].items()]))
    return out


def _step_gate_section(step: dict[str, Any] | None, sections: dict[str, Section]) -> list[str]:
    """The step-gated fix (rca/stepgate.py): what it does, then search | held-out figures."""
    if not step or "step_gate" not in sections:
        return []
    section = sections["step_gate"]
    out = [f"<h2>{escape(section.title)}</h2>", *(f"<p>{escape(p)}</p>" for p in section.paragraphs)]
    out.append(_table(["figure", "search", "held out"], [[escape(c) for c in row] for row in step_gate_rows(step)]))
    out += [f'<div class="note">{escape(n)}</div>' for n in step.get("notes", [])]
    return out


def _anomaly_section(anomalies: dict[str, Any], n: int = 20) -> list[str]:
    fpr = anomalies.get("false_positive_rate")
    out = [
        "<h2>Compression Forensics anomalies</h2>",
        f"<p>Threshold {anomalies['threshold']} robust z over {anomalies['baseline_size']} benign runs; "
        f"held-out false-positive rate {'not measured' if fpr is None else f'{fpr:.1%}'} "
        f"(nominal {anomalies['nominal_rate_max']:.1%}).</p>",
    ]
    ranked = anomalies["anomalies"][:n]
    if ranked:
        out.append(_anomaly_figure(ranked, float(anomalies["threshold"])))
        rows = [
            [escape(a["site"]), f"{a['score']:.2f}", "yes" if a["flagged"] else ""]
            for a in ranked  # already sorted by score
        ]
        out.append(_table(["site", "score (max |z|)", "flagged"], rows))
    return out


def _ranking_section(ranking: dict[str, Any], n: int = 20) -> list[str]:
    units = [u for u in ranking.get("units", []) if u["level"] in ("head", "neuron")][:n]
    if not units:
        return []
    rows = [[escape(u["unit"]), escape(u["level"]), f"{u['score']:.3g}"] for u in units]
    return ["<h2>Attribution ranking (top heads and neurons)</h2>", _table(["unit", "level", "score"], rows, 2)]


def _table(header: list[str], rows: list[list[str]], first_text: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c}</td>" if i < first_text else f"<td class='num'>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f"<img alt='figure' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _axes(height: float) -> Any:
    """A figure and its axes, without pyplot (no global backend switch, nothing to close)."""
    fig = plots.figure(9, height)
    return fig, fig.add_subplot()


def _anomaly_figure(ranked: list[dict[str, Any]], threshold: float) -> str:
    fig, ax = _axes(0.28 * len(ranked) + 1)
    labels = [a["site"] for a in ranked][::-1]
    scores = [a["score"] for a in ranked][::-1]
    colors = ["#c0392b" if a["flagged"] else "#7f8c8d" for a in ranked][::-1]
    ax.barh(labels, scores, color=colors)
    ax.axvline(
        threshold, color="#333", linestyle="--", linewidth=1, label=f"z threshold {threshold:g} (flagged: also p ≤ α)"
    )
    ax.set_xlabel("CF anomaly score (max |robust z| over features)")
    ax.legend(loc="lower right")
    return _png(fig)


def _members_figure(members: list[dict[str, Any]]) -> str:
    fig, ax = _axes(0.35 * len(members) + 1)
    names = [m["unit"] for m in members][::-1]
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [m["necessity"] for m in members][::-1], height=0.4, label="necessity")
    ax.barh([y - 0.2 for y in ys], [m["sufficiency"] for m in members][::-1], height=0.4, label="sufficiency")
    ax.set_yticks(list(ys), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("flip rate (necessity: lost when removed; sufficiency: alone)")
    ax.legend(loc="lower right")
    return _png(fig)
