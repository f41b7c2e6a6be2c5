"""The ``model-forensics`` command line: parses, calls the library, renders with rich.

Exit codes: 0 ok, 1 analysis found nothing, 2 bad input (one readable line; ``--debug``
shows the traceback).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from model_forensics.core.errors import ForensicsError


class _ForensicsGroup(TyperGroup):
    """Turns every ForensicsError raised by any command into one line + exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ForensicsError as exc:
            if os.environ.get("MODEL_FORENSICS_DEBUG") == "1":
                raise
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            ctx.exit(2)


app = typer.Typer(
    cls=_ForensicsGroup,
    help="Flight recorder, replay and root-cause analysis for PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bundle_app = typer.Typer(help="Inspect and verify incident bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
scenarios_app = typer.Typer(
    help="Incident scenarios: zoo models with ground truth, and real weights.", no_args_is_help=True
)
app.add_typer(scenarios_app, name="scenarios")
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="smollm2, minilm, zoo:NAME, a model directory or a .gguf file")
]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The input text")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors")] = False) -> None:
    if debug:
        os.environ["MODEL_FORENSICS_DEBUG"] = "1"


def main() -> None:
    """Console entry point."""
    app()


def _load(reference: str) -> Any:
    from model_forensics.models import load

    with err.status(f"loading {reference}…"):
        return load(reference)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _summary_table(bundle_path: Path) -> Table:
    from model_forensics.core.bundle import Bundle

    b = Bundle.open(bundle_path)
    m = b.manifest
    table = Table(show_header=False, title=f"incident bundle [bold]{m['name']}[/]", title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    model = m["model"]
    table.add_row("model", f"{model['name']} ({model['class']}, {model['architecture']}, {model['n_layers']} blocks)")
    table.add_row("weights sha256", model["weights_sha256"][:16] + "…")
    tokens = m["input"].get("tokens", [])
    table.add_row("tokens", f"{len(tokens)} ({m['input']['mode']})")
    if m["input"].get("text"):
        table.add_row("input", _clip(m["input"]["text"]))
    if m["output"].get("text") is not None:
        table.add_row("output", _clip(m["output"]["text"]))
    pred = m.get("predicate")
    if pred:
        verdict = (
            "[bold red]FAILS[/] (predicate holds)" if pred["holds"] else "[green]passes[/] (predicate does not hold)"
        )
        table.add_row("failure predicate", f"{pred['kind']}({', '.join(map(repr, pred['args'].values()))}) → {verdict}")
    sketches = sorted({s["sketch"] for s in m["sites"].values()})
    table.add_row(
        "sites recorded",
        f"{len(m['sites'])} ({m['recorder']['granularity']} granularity, sketch {', '.join(sketches)})",
    )
    if m["dropped_sites"]:
        table.add_row("dropped (size cap)", f"{len(m['dropped_sites'])}: {', '.join(m['dropped_sites'][:6])}…")
    table.add_row("calls recorded", str(len(b.calls())))
    table.add_row("bundle size", _human(b.size_bytes()))
    table.add_row("path", str(bundle_path))
    return table


def _clip(text: str, n: int = 160) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= n else text[: n - 1] + "…"


@app.command()
def record(
    model: ModelOpt,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create")],
    max_new_tokens: Annotated[int, typer.Option(help="Greedy-generate this many tokens (0: one forward pass)")] = 0,
    predicate: Annotated[str | None, typer.Option(help="Failure predicate, e.g. contains:HACKED or class_is:1")] = None,
    granularity: Annotated[str | None, typer.Option(help="layer | head | neuron | all")] = None,
    sketch: Annotated[str | None, typer.Option(help="full | fp16 | int8 | topk")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (default: built-in defaults)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
) -> None:
    """Record one prompt into an incident bundle."""
    from model_forensics.core.predicates import parse_predicate
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt

    pred = parse_predicate(predicate) if predicate else None
    recorder = RecorderHooks(config, granularity=granularity, sketch=sketch)
    if out.exists() and not overwrite:
        raise ForensicsError(f"bundle '{out}' already exists; choose another --out or pass --overwrite")
    loaded = _load(model)
    with err.status("recording…"):
        path = record_prompt(
            loaded, prompt, out, recorder=recorder, max_new_tokens=max_new_tokens, predicate=pred, overwrite=overwrite
        )
    if as_json:
        console.print_json((path / "manifest.json").read_text())
    else:
        console.print(_summary_table(path))


@app.command()
def trace(
    model: ModelOpt,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the ActivityCube JSON")],
) -> None:
    """Trace a prompt into an ActivityCube (tokens × layers × metrics) JSON file."""
    import torch

    from model_forensics.recorder import add_hooks_all
    from model_forensics.recorder.session import encode_prompt

    loaded = _load(model)
    batch = encode_prompt(loaded, prompt)
    with add_hooks_all(loaded.model, loaded.tokenizer) as tracer, torch.no_grad():
        loaded.model(**batch)
        cube = tracer.cube(loaded.ref.name)
    try:
        cube.save(out)
    except OSError as exc:
        raise ForensicsError(f"cannot write '{out}': {exc.strerror}; choose a writable path") from None
    console.print(f"ActivityCube: {len(cube.tokens)} tokens × {len(cube.layers)} layers × 3 metrics → [bold]{out}[/]")


@bundle_app.command("info")
def bundle_info(
    path: Annotated[Path, typer.Argument(help="Bundle directory or .mfb.zip")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
) -> None:
    """Show what a bundle holds."""
    from model_forensics.core.bundle import Bundle

    if as_json:
        console.print_json(json.dumps(Bundle.open(path).manifest))
        return
    console.print(_summary_table(path))


@bundle_app.command("verify")
def bundle_verify(
    path: Annotated[Path, typer.Argument(help="Bundle directory or .mfb.zip")],
    replay: Annotated[
        bool, typer.Option("--replay", help="Also re-run the model and compare every site's sha256")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Override the bundle's model (with --replay)")
    ] = None,
    allow_weight_mismatch: Annotated[bool, typer.Option(help="Replay even if the weights differ (warns)")] = False,
) -> None:
    """Check a bundle's schema, version and every checksum (file and per-site tensors);
    with --replay, re-execute it and check the replay is bit-identical."""
    from model_forensics.core.bundle import Bundle
    from model_forensics.core.sketches import tensor_sha256

    bundle = Bundle.open(path, verify=False)
    problems = bundle.verify_files()
    exact = [s for s, info in bundle.manifest["sites"].items() if info["sketch"] == "full"]
    if not problems:
        for site in exact:
            if tensor_sha256(bundle.activation(site)) != bundle.manifest["sites"][site]["sha256"]:
                problems.append(f"site {site}: tensor sha256 differs from the manifest")
    if problems:
        for p in problems:
            err.print(f"[red]✗[/] {p}")
        raise ForensicsError(
            f"bundle '{path}' failed verification ({len(problems)} problems); it was modified or is corrupt"
        )
    console.print(
        f"[green]✓[/] {path}: schema ok, format {bundle.manifest['format_version']}, "
        f"{len(bundle.manifest['files'])} files match their sha256, {len(exact)} exact site tensors re-hashed"
    )
    if replay:
        _replay_verify(path, model, allow_weight_mismatch)


def _open_session(path: Path, model: str | None, allow_weight_mismatch: bool) -> Any:
    import warnings

    from model_forensics.replay import SandboxReplayer

    with err.status(f"loading {path} and its model…"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = SandboxReplayer().load_bundle(path, model=model, allow_weight_mismatch=allow_weight_mismatch)
    for w in caught:
        if "WEIGHT MISMATCH" in str(w.message):
            err.print(f"[bold red]WARNING:[/] {w.message}")
    return session


def _replay_verify(path: Path, model: str | None, allow_weight_mismatch: bool) -> Any:
    from model_forensics.core.errors import ReplayDivergence

    session = _open_session(path, model, allow_weight_mismatch)
    with err.status("replaying…"):
        report = session.verify()
    if not report.bit_identical:
        for check in report.differing[:20]:
            diff = f"max |Δ| {check.max_abs_diff:.3g}" if check.max_abs_diff is not None else check.note
            err.print(f"[red]✗[/] {check.site}: {diff}")
        raise ReplayDivergence(f"replay of '{path}' is {report.summary()}")
    console.print(f"[green]✓[/] replay {report.summary()} ({report.seconds:.1f} s)")
    return report


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="Bundle directory or .mfb.zip")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the bundle's model")] = None,
    intervene: Annotated[
        list[str] | None,
        typer.Option("--intervene", "-i", help="SITE:KIND[=VALUE], e.g. blocks.1.attn.head.3:zero (repeatable)"),
    ] = None,
    verify: Annotated[bool, typer.Option(help="Check the unchanged replay is bit-identical first")] = True,
    allow_weight_mismatch: Annotated[bool, typer.Option(help="Replay even if the weights differ (warns)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Replay an incident bundle in the sandbox, optionally with interventions."""
    from model_forensics.replay import Intervention

    interventions = [Intervention.parse(spec) for spec in intervene or []]
    session = _open_session(path, model, allow_weight_mismatch)
    report = None
    if verify:
        with err.status("verifying the replay…"):
            report = session.verify()
    with err.status("replaying…"):
        result = session.run(interventions)
    if as_json:
        payload = {"verify": report.to_json() if report else None, "recorded_failed": session.recorded_failed}
        console.print_json(json.dumps({**payload, "run": result.to_json()}))
        return
    table = Table(show_header=False, title=f"replay of [bold]{path}[/]", title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    if report is not None:
        colour = "green" if report.bit_identical else "red"
        table.add_row("verification", f"[{colour}]{report.summary()}[/]")
    table.add_row("interventions", ", ".join(str(iv) for iv in interventions) or "(none)")
    if session.manifest["output"].get("text") is not None:
        table.add_row("recorded output", _clip(session.manifest["output"]["text"]))
    if result.text is not None:
        table.add_row("replayed output", _clip(result.text))
    table.add_row("prediction", str(result.prediction))
    if result.failed is not None:
        verdict = "[bold red]FAILS[/]" if result.failed else "[green]passes[/]"
        flip = " (flipped: the intervention fixes it)" if result.flipped else ""
        table.add_row("failure predicate", verdict + flip)
    table.add_row("forward passes", str(session.forward_passes))
    console.print(table)


@app.command("inspect")
def inspect_command(
    model: ModelOpt,
    data: Annotated[
        Path, typer.Option("--data", "-d", help='JSONL inputs: {"text": …, optional "label", "passed", "group"/"time"}')
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, figures and summary.md")] = Path(
        "results"
    ),
    reference: Annotated[Path | None, typer.Option(help="JSONL reference inputs (shift; drift baseline)")] = None,
    compare_model: Annotated[
        str | None, typer.Option("--compare-model", help="Candidate model for cross-model regression")
    ] = None,
    experiments: Annotated[
        str,
        typer.Option(
            help="Comma-separated: sparsity,stats,shift,drift,regression,sensitivity,attribution,robustness,pruning"
        ),
    ] = "all",
    batch_size: Annotated[int, typer.Option(help="Inputs per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens kept per input (the last ones)")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of every random choice (reservoirs, perturbations, bootstrap)")] = 0,
    figure_format: Annotated[str, typer.Option("--figures", help="Figure formats, comma-separated: png, svg")] = "png",
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout instead of tables")] = False,
) -> None:
    """Run the inspection experiments on a model over a JSONL prompt set."""
    import warnings

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model_forensics.inspection import InspectorSettings, ModelInspector, read_jsonl

    names = None if experiments.strip() == "all" else experiments.split(",")
    samples = read_jsonl(data)
    ref = read_jsonl(reference) if reference is not None else None
    loaded = _load(model)
    candidate = _load(compare_model) if compare_model else None
    settings = InspectorSettings(batch_size=batch_size, max_length=max_length, seed=seed)
    inspector = ModelInspector(loaded.model, loaded.tokenizer, settings=settings, name=loaded.ref.name)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = inspector.run(
                samples,
                reference=ref,
                experiments=names,
                compare_model=candidate.model if candidate else None,
                compare_tokenizer=candidate.tokenizer if candidate else None,
                compare_name=candidate.ref.name if candidate else None,
                progress=progress,
            )
    for w in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        err.print(f"[yellow]warning:[/] {w}")
    written = result.save(out, formats=[f.strip() for f in figure_format.split(",") if f.strip()])
    if as_json:
        console.print_json((out / "results.json").read_text())
        return
    console.print(result.tables())
    console.print(
        f"\nwrote {len(written)} files to [bold]{out}[/]: results.json, summary.md and {len(written) - 2} figures"
    )


def _progress_callback(progress: Any, task: Any) -> Any:
    def say(message: str) -> None:
        progress.update(task, description=message, advance=1)

    return say


def _fix_table(result: dict[str, Any]) -> Table:
    fix = result["fix_set"]
    table = Table(title=f"minimal fix set: {len(fix['members'])} interventions, flip rate {fix['total_flip_rate']:.0%}")
    for col in ("intervention", "level", "necessity", "sufficiency", "attribution", "CF score", "benign KL"):
        table.add_column(col)
    for m in fix["members"]:
        iv = m["intervention"]
        kl = "—" if m["benign_kl"] is None else f"{m['benign_kl']:.4f}"
        table.add_row(
            f"{iv['site']}:{iv['kind']}"
            + (" along its failure direction" if iv.get("direction") else "")
            + (f", gated at {iv['gate']['site']}" if iv.get("gate") else ""),
            m["level"],
            f"{m['necessity']:.0%}",
            f"{m['sufficiency']:.0%}",
            f"{m['attribution']:.3f}",
            f"{m['cf_score']:.1f}",
            kl,
        )
    return table


def _anomaly_table(result: dict[str, Any], n: int = 10) -> Table:
    an = result["anomalies"]
    fpr = "not measured" if an["false_positive_rate"] is None else f"{an['false_positive_rate']:.1%}"
    table = Table(
        title=f"CF anomalies (threshold {an['threshold']} z, {an['baseline_size']} benign runs, "
        f"measured FPR {fpr}, nominal {an['nominal_rate_max']:.1%})"
    )
    for col in ("site", "score (max |z|)", "flagged", "compressed ratio z", "spectral entropy z", "top-k energy z"):
        table.add_column(col)
    for a in an["anomalies"][:n]:
        f = a["features"]
        table.add_row(
            a["site"],
            f"{a['score']:.2f}",
            "yes" if a["flagged"] else "",
            *(f"{f[k]['z']:+.2f}" for k in ("compressed_ratio", "spectral_entropy", "topk_energy")),
        )
    return table


@app.command()
def analyze(
    bundle: Annotated[Path, typer.Argument(help="Incident bundle directory or .mfb.zip")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model override (default: the manifest's)")] = None,
    baseline: Annotated[
        list[Path] | None, typer.Option("--baseline", "-b", help="Baseline bundle(s), same model")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config")] = None,
    strategy: Annotated[str | None, typer.Option(help="greedy | exhaustive")] = None,
    directions: Annotated[
        str,
        typer.Option(
            help="auto | always | never: narrow heads to their failure direction when whole heads break benign prompts"
        ),
    ] = "auto",
    gating: Annotated[
        str,
        typer.Option(
            help="auto | always | never: put the fix behind a detector that fires on failing prompts only, "
            "when the fix breaks benign prompts"
        ),
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the analysis JSON here")] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write a self-contained HTML report here (tables + figures)")
    ] = None,
) -> None:
    """Root-cause analysis: CF anomalies, attribution ranking, a verified minimal fix set."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from model_forensics.rca.pipeline import NothingToFix, analyze_bundle

    for path, what in ((out, "--out"), (report, "--report")):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            raise ForensicsError(f"cannot write {what} '{path}': name a file in an existing directory")
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("loading", total=4)
        try:
            result = analyze_bundle(
                bundle,
                model=model,
                baseline=baseline or [],
                config=config,
                strategy=strategy,
                directions=directions,
                gating=gating,
                progress=_progress_callback(progress, task),
            ).to_json()
        except NothingToFix as exc:
            err.print(f"nothing to fix: {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    if report is not None:
        from model_forensics.report import write_analysis_report

        write_analysis_report(result, report)
        err.print(f"report written to {report}")
    if as_json:
        console.print_json(json.dumps(result))
        return
    console.print(_anomaly_table(result))
    console.print(_fix_table(result))
    fix = result["fix_set"]
    se = fix["side_effects"]
    if se:
        console.print(
            f"side effects on {se['n_benign']} benign prompts: mean KL {se['mean_kl']:.4f} nats "
            f"(bound {se['bound']}, {'within' if se['within_bound'] else '[red]EXCEEDED[/]'}), "
            f"accuracy {se['accuracy_clean']:.0%} → {se['accuracy_fixed']:.0%}, predicate changed on {se['predicate_changed']:.0%}"
        )
    console.print(
        f"flip rate {fix['total_flip_rate']:.0%} over {len(fix['flips'])} failing variants · "
        f"{fix['candidates']} candidate units · {result['forward_passes']} forward passes · {result['seconds']:.1f} s"
    )
    for note in [*result["anomalies"].get("notes", []), *fix["notes"]]:
        console.print(f"note: {note}")


def _many(directory: Path, model: str | None, config: Path | None, search: bool, workers: int, ray: str | None) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from model_forensics.rca.pipeline import find_bundles, run_many

    paths = find_bundles(directory)
    with Progress(
        *Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("analysing" if search else "triaging", total=len(paths))
        return run_many(
            paths,
            model=model,
            config=None if config is None else str(config),
            search=search,
            workers=workers,
            ray=ray,
            on_done=lambda _r: progress.advance(task),
        )


def _print_batch(report: Any, search: bool) -> None:
    table = Table(title=f"{len(report.results)} incidents analysed ({report.backend}, {report.seconds:.1f} s)")
    for col in ("bundle", "top sites (attribution)", "max CF score", *(("fix set", "flip rate") if search else ())):
        table.add_column(col)
    for r in report.results:
        sites = [u["unit"] for u in r["ranking"]["units"] if u["level"] == "site"][:3]
        score = max((a["score"] for a in r["anomalies"]["anomalies"]), default=0.0)
        row = [Path(r["bundle"]).name, ", ".join(sites), f"{score:.1f}"]
        if search and r["fix_set"]:
            row += [", ".join(m["unit"] for m in r["fix_set"]["members"][:4]), f"{r['fix_set']['total_flip_rate']:.0%}"]
        table.add_row(*row)
    console.print(table)
    groups = Table(title="incident groups (shared root-cause sites), by severity")
    for col in ("severity", "incidents", "shared sites"):
        groups.add_column(col)
    for g in report.groups:
        groups.add_row(
            f"{g['severity']:.1f}", ", ".join(Path(i).name for i in g["incidents"]), ", ".join(g["shared_sites"]) or "—"
        )
    console.print(groups)
    for s in report.skipped:
        console.print(f"[yellow]skipped[/] {s['bundle']}: {s['error']}")


@app.command()
def batch(
    directory: Annotated[Path, typer.Argument(help="Directory of bundles")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model override")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config")] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes")] = 2,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: 'auto', 'local' or a cluster ADDRESS")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the summary JSON here")] = None,
) -> None:
    """Analyse every bundle in a directory (corrupt ones are skipped and listed)."""
    report = _many(directory, model, config, True, workers, ray)
    if out is not None:
        out.write_text(json.dumps(report.to_json(), indent=1))
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        _print_batch(report, search=True)


@app.command()
def triage(
    directory: Annotated[Path, typer.Argument(help="Directory of bundles")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model override")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config")] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes")] = 2,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: 'auto', 'local' or a cluster ADDRESS")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Cheap triage: CF + attribution only; groups incidents sharing root-cause sites."""
    report = _many(directory, model, config, False, workers, ray)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        _print_batch(report, search=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the incident bundle")] = Path("demo-bundle"),
) -> None:
    """Record a real prompt-injection incident on SmolLM2-135M-Instruct (offline)."""
    from model_forensics.core.predicates import contains
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt
    from model_forensics.scenarios.demo import demo_incident

    incident = demo_incident()
    console.rule("[bold]model-forensics demo: a prompt injection on a real model")
    console.print(f"prompt: [italic]{incident['prompt']}[/]")
    loaded = _load("smollm2")
    recorder = RecorderHooks(granularity="layer", sketch="fp16")
    with err.status("generating and recording…"):
        path = record_prompt(
            loaded,
            incident["prompt"],
            out,
            recorder=recorder,
            max_new_tokens=incident["max_new_tokens"],
            predicate=contains(incident["target"]),
            overwrite=True,
            extras={"scenario": "smollm2-injection-demo", "target": incident["target"]},
        )
    console.print(_summary_table(path))
    console.print(
        "\nnext:\n"
        f"  model-forensics bundle verify {path}\n"
        f"  model-forensics bundle info {path} --json\n"
        f'  model-forensics trace --model smollm2 --prompt "..." --out cube.json'
    )


@scenarios_app.command("list")
def scenarios_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print every scenario as JSON")] = False,
) -> None:
    """List the incident scenarios."""
    from model_forensics.scenarios import get, names

    found: dict[str, Any] = {}
    for name in names():
        try:
            found[name] = get(name)
        except ForensicsError as exc:  # one scenario's missing data must not hide the others
            found[name] = exc
    if as_json:
        rows = [s.to_json() if not isinstance(s, Exception) else {"name": n, "error": str(s)} for n, s in found.items()]
        console.print_json(json.dumps(rows))
        return
    table = Table(title="incident scenarios", title_justify="left")
    for column in ("name", "model", "kind", "variants", "benign", "ground truth", "description"):
        table.add_column(
            column,
            justify="right" if column in ("variants", "benign") else "left",
            no_wrap=column in ("name", "model"),
            min_width=30 if column == "description" else None,
        )
    for name, s in found.items():
        if isinstance(s, Exception):
            table.add_row(f"[bold]{name}[/]", "", "", "", "", "", f"[red]unavailable:[/] {s}")
            continue
        table.add_row(
            f"[bold]{s.name}[/]",
            s.model,
            s.kind,
            str(len(s.variants)),
            str(len(s.benign)),
            s.ground_truth_level,
            s.description,
        )
    console.print(table)


@scenarios_app.command("run")
def scenarios_run(
    name: Annotated[str, typer.Argument(help="Scenario name (see `scenarios list`)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for incident-*/ and baseline-*/ bundles")],
    overwrite: Annotated[bool, typer.Option(help="Replace bundles that already exist")] = False,
    incidents: Annotated[int | None, typer.Option(help="Record only the first N incidents")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON")] = False,
) -> None:
    """Record a scenario's incident and baseline bundles, ready for `analyze`."""
    from model_forensics.scenarios import get

    scenario = get(name)
    with err.status(f"loading {scenario.model} and recording {name}…"):
        run = scenario.record(out, overwrite=overwrite, limit=incidents)
    if as_json:
        console.print_json(json.dumps(run.to_json()))
        return
    table = Table(title=f"scenario [bold]{name}[/] → {out}", title_justify="left")
    for column in ("bundle", "output", "predicate"):
        table.add_column(column)
    for i, path in enumerate(run.incidents):
        table.add_row(str(path), _clip(run.outputs[i], 60), _verdict(run.incident_failed[i], expected=True))
        table.add_row(
            str(run.baselines[i]), _clip(run.baseline_outputs[i], 60), _verdict(run.baseline_failed[i], expected=False)
        )
    console.print(table)
    for role, path in run.artifacts.items():
        console.print(f"{role}: {path}")
    console.print(f"ground truth: {scenario.ground_truth_note}")
    if run.incidents:
        console.print(f"\nnext:\n  model-forensics analyze {run.incidents[0]} --baseline {run.baselines[0]}")


def _verdict(holds: bool | None, expected: bool) -> str:
    if holds is None:
        return "no predicate"
    text = "FAILS (predicate holds)" if holds else "passes"
    return f"[green]{text}[/]" if holds == expected else f"[bold red]{text} (unexpected)[/]"
