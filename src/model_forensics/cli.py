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
