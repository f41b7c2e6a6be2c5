"""The ``model-forensics`` command line: parses, calls the library, renders with rich.

Exit codes: 0 ok, 1 analysis found nothing, 2 bad input (one readable line on stderr,
checked before any model is loaded; ``--debug`` shows the traceback).

Every value that comes from a bundle, a model or the user is shown through :func:`_safe`:
rich markup in it is escaped and control characters are written as escapes (``\\x1b``),
so a hostile manifest cannot style, hide or rewrite what the terminal shows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from model_forensics.core.config import Granularity, SketchKind
from model_forensics.core.errors import ForensicsError

_ARGV = "model_forensics.argv"  # ctx.meta key: the command line as given (for --isolate)
FIGURE_FORMATS = ("png", "svg", "pdf")


class _ForensicsGroup(TyperGroup):
    """The root command: every bad value, whether Typer's parser or the library finds it,
    becomes one line on stderr and exit code 2."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        argv = list(args)
        ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta[_ARGV] = argv
        return ctx

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ForensicsError as exc:
            if os.environ.get("MODEL_FORENSICS_DEBUG") == "1":
                raise
            _error_line(str(exc))
            ctx.exit(2)

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # Typer's usage errors: bad int, missing option, …
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
                _error_line(_usage_message(exc))
            sys.exit(2)
        except typer.Abort:
            _error_line("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: typer.TyperException) -> str:
    ctx = getattr(exc, "ctx", None)
    see = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return exc.format_message() + see


app = typer.Typer(
    cls=_ForensicsGroup,
    help="Flight recorder, replay and root-cause analysis for PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bundle_app = typer.Typer(help="Inspect, verify and sign incident bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
scenarios_app = typer.Typer(
    help="Incident scenarios: zoo models with ground truth, and real weights.", no_args_is_help=True
)
app.add_typer(scenarios_app, name="scenarios")
# No emoji codes: ":name:" inside a bundle value must print as written.
console = Console(emoji=False)
err = Console(stderr=True, emoji=False)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="smollm2, minilm, zoo:NAME, a model directory or a .gguf file")
]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The input text")]
BundleArg = Annotated[Path, typer.Argument(help="Bundle directory or .mfb.zip")]
ConfigOpt = Annotated[Path | None, typer.Option(help="YAML config (default: built-in defaults)")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors")] = False) -> None:
    if debug:
        os.environ["MODEL_FORENSICS_DEBUG"] = "1"


def main() -> None:
    """Console entry point."""
    app()


# -- rendering ---------------------------------------------------------------------------------
def _safe(value: object) -> str:
    """``value`` as rich markup that prints literally: markup escaped, and every character
    Python would not print (ESC, BEL, CR, other C0/C1 controls, bidi overrides) written
    as its escape (``\\x1b``), never sent to the terminal raw."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return escape(text)


def _clip(text: str, n: int = 160) -> str:
    """A bundle or model text for one table cell: newlines as ⏎, clipped, made safe."""
    text = text.replace("\n", "⏎ ")
    return _safe(text if len(text) <= n else text[: n - 1] + "…")


def _error_line(message: str) -> None:
    """One line on stderr, whatever the message holds."""
    one_line = _safe(message.replace("\n", " "))
    err.print(f"[bold red]error:[/] {one_line}", soft_wrap=True, highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# -- checks that run before any work -----------------------------------------------------------
def _check_folder(folder: Path, what: str, fix: str) -> None:
    """``folder`` must be an existing, writable directory; ``what`` names the write."""
    if not folder.exists():
        raise ForensicsError(f"{what}: '{folder}' does not exist; {fix}")
    if not folder.is_dir():
        raise ForensicsError(f"{what}: '{folder}' is not a directory; {fix}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ForensicsError(f"{what}: '{folder}' is not writable; {fix}")


def _check_file_out(path: Path, option: str) -> None:
    """A file the command will write (replacing a file, never a directory)."""
    fix = "name a file in an existing directory"
    if path.is_dir():
        raise ForensicsError(f"cannot write {option} '{path}': it is a directory; {fix}")
    _check_folder(path.parent, f"cannot write {option} '{path}'", fix)


def _check_dir_out(path: Path, option: str) -> None:
    """A directory the command fills (created, with its parents, if missing)."""
    if path.exists() and not path.is_dir():
        raise ForensicsError(f"cannot write into {option} '{path}': it exists and is not a directory; choose another")
    existing = next(p for p in (path, *path.parents) if p.exists())
    _check_folder(existing, f"cannot write into {option} '{path}'", f"choose another {option}")


def _check_bundle_out(path: Path, overwrite: bool) -> None:
    """A bundle the command will write: never '.', a user's file or folder, or (without
    --overwrite) an existing bundle; its directory must exist and be writable."""
    from model_forensics.core.bundle import check_writable_target

    check_writable_target(path, overwrite)
    _check_folder(path.parent, f"cannot write bundle '{path}'", "name a bundle in an existing directory (--out)")


def _check_exists(path: Path, what: str, fix: str) -> None:
    if not (path.exists() or path.is_symlink()):
        raise ForensicsError(f"{what} '{path}' does not exist; {fix}")


def _check_config(config: Path | None) -> None:
    """Parse --config once, up front (commands hand the path on to the library)."""
    from model_forensics.core.config import load_config

    load_config(config)


def _read_data(path: Path, option: str) -> Any:
    """The samples of a JSONL data file (--data, --reference)."""
    from model_forensics.inspection import read_jsonl

    return read_jsonl(path)


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ForensicsError("--prompt is empty; pass the input text, e.g. --prompt 'Hello'")


def _parse_predicate(spec: str) -> Any:
    """A --predicate spec, fully checked: its form, a non-empty value, a regex that compiles."""
    from model_forensics.core.predicates import parse_predicate

    pred = parse_predicate(spec)
    if pred.needs_text and not next(iter(pred.args.values()), ""):
        raise ForensicsError(f"predicate '{spec}' has an empty value; e.g. contains:HACKED")
    if any(i < 0 for i in pred.indices()):
        raise ForensicsError(f"predicate '{spec}' names a negative index; token and class ids start at 0")
    if pred.kind == "regex":
        pred.evaluate(text="")  # raises naming the pattern when it does not compile
    return pred


def _check_experiments(experiments: str) -> list[str] | None:
    from model_forensics.inspection import EXPERIMENTS

    if experiments.strip() == "all":
        return None
    names = [e.strip() for e in experiments.split(",") if e.strip()]
    unknown = [e for e in names if e not in EXPERIMENTS]
    if unknown:
        raise ForensicsError(
            f"unknown experiment(s) {', '.join(map(repr, unknown))} in --experiments; choose from "
            f"{', '.join(EXPERIMENTS)} or all"
        )
    if not names:
        raise ForensicsError(f"--experiments selects nothing; choose from {', '.join(EXPERIMENTS)} or all")
    return names


def _check_figure_formats(spec: str) -> list[str]:
    formats = [f.strip().lower() for f in spec.split(",") if f.strip()]
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise ForensicsError(
            f"--figures {spec!r}: unknown format {', '.join(map(repr, bad)) or '(none given)'}; "
            f"use {', '.join(FIGURE_FORMATS)} (comma-separated)"
        )
    return formats


def _load(reference: str) -> Any:
    from model_forensics.models import load

    with err.status(f"loading {_safe(reference)}…"):
        return load(reference)


# -- bundles -------------------------------------------------------------------------------------
def _signature_status(bundle: Any) -> str:
    """One line (markup) on a bundle's signature: none, valid (signer not checked), or invalid."""
    from model_forensics.core import signing
    from model_forensics.core.errors import BundleError

    try:
        if signing.read_signature(bundle) is None:
            return "unsigned"
        signer = signing.check_signature(bundle)
    except BundleError as exc:
        return f"[bold red]INVALID[/]: {_safe(exc)}"
    return f"signed by {_safe(signer)} (not checked against a trusted key: run bundle verify --trusted-key KEY)"


def _print_summary(bundle_path: Path) -> None:
    """What a bundle holds, as a table, then its content digest and signature status."""
    from model_forensics.core.bundle import Bundle

    b = Bundle.open(bundle_path)
    m = b.manifest
    table = Table(show_header=False, title=f"incident bundle [bold]{_safe(m['name'])}[/]", title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    model = m["model"]
    layers = f", {model['n_layers']} blocks" if model.get("n_layers") is not None else ""
    table.add_row("model", _safe(f"{model['name']} ({model.get('class')}, {model['architecture']}{layers})"))
    table.add_row("weights sha256", model["weights_sha256"][:16] + "…")
    tokens = m["input"].get("tokens", [])
    table.add_row("tokens", f"{len(tokens)} ({_safe(m['input']['mode'])})")
    if m["input"].get("text"):
        table.add_row("input", _clip(m["input"]["text"]))
    if m["output"].get("text") is not None:
        table.add_row("output", _clip(m["output"]["text"]))
    pred = m.get("predicate")
    if pred:
        verdict = (
            "[bold red]FAILS[/] (predicate holds)" if pred["holds"] else "[green]passes[/] (predicate does not hold)"
        )
        args = ", ".join(map(repr, pred["args"].values()))
        table.add_row("failure predicate", f"{_safe(pred['kind'])}({_safe(args)}) → {verdict}")
    sketches = ", ".join(sorted({s["sketch"] for s in m["sites"].values()}))
    granularity = m["recorder"].get("granularity")
    table.add_row("sites recorded", _safe(f"{len(m['sites'])} ({granularity} granularity, sketch {sketches})"))
    if m["dropped_sites"]:
        more = "…" if len(m["dropped_sites"]) > 6 else ""
        table.add_row(
            "dropped (size cap)", _safe(f"{len(m['dropped_sites'])}: {', '.join(m['dropped_sites'][:6])}{more}")
        )
    if b.partial:
        shown = "; ".join(f"{site}: {error}" for site, error in list(b.partial.items())[:4])
        table.add_row(
            "[bold red]partial[/] (hook failed)",
            _clip(f"{len(b.partial)} site{'s' if len(b.partial) > 1 else ''}: {shown}", 300),
        )
    table.add_row("calls recorded", str(len(b.calls())))
    table.add_row("bundle size", _human(b.size_bytes()))
    table.add_row("format", _safe(f"{m['format']} {m['format_version']}"))
    table.add_row("path", _safe(bundle_path))
    console.print(table)
    # Outside the table so neither is ever wrapped: people copy and compare these.
    console.print(f"digest    {b.digest}", soft_wrap=True)
    console.print(f"signature {_signature_status(b)}", soft_wrap=True)


@app.command()
def record(
    model: ModelOpt,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create")],
    max_new_tokens: Annotated[
        int, typer.Option(min=0, help="Greedy-generate this many tokens (0: one forward pass)")
    ] = 0,
    predicate: Annotated[str | None, typer.Option(help="Failure predicate, e.g. contains:HACKED or class_is:1")] = None,
    granularity: Annotated[Granularity | None, typer.Option(help="Which sites to record")] = None,
    sketch: Annotated[SketchKind | None, typer.Option(help="How site tensors are stored")] = None,
    config: ConfigOpt = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="Sign the bundle with this ed25519 private key (bundle keygen)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
) -> None:
    """Record one prompt into an incident bundle."""
    from model_forensics.core import signing
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt

    _check_prompt(prompt)
    pred = _parse_predicate(predicate) if predicate else None
    _check_config(config)
    recorder = RecorderHooks(config, granularity=granularity, sketch=sketch)
    if sign_key is not None:
        signing.load_private_key(sign_key)
    _check_bundle_out(out, overwrite)
    loaded = _load(model)
    with err.status("recording…"):
        path = record_prompt(
            loaded,
            prompt,
            out,
            recorder=recorder,
            max_new_tokens=max_new_tokens,
            predicate=pred,
            overwrite=overwrite,
            sign_key=sign_key,
        )
    if as_json:
        console.print_json((path / "manifest.json").read_text())
    else:
        _print_summary(path)


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

    _check_prompt(prompt)
    _check_file_out(out, "--out")
    loaded = _load(model)
    batch = encode_prompt(loaded, prompt)
    with add_hooks_all(loaded.model, loaded.tokenizer) as tracer, torch.no_grad():
        loaded.model(**batch)
        cube = tracer.cube(loaded.ref.name)
    try:
        cube.save(out)
    except OSError as exc:
        raise ForensicsError(f"cannot write '{out}': {exc.strerror}; choose a writable path") from None
    console.print(
        f"ActivityCube: {len(cube.tokens)} tokens × {len(cube.layers)} layers × 3 metrics → [bold]{_safe(out)}[/]"
    )


@bundle_app.command("info")
def bundle_info(
    path: BundleArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
) -> None:
    """Show what a bundle holds, its content digest and its signature."""
    from model_forensics.core.bundle import Bundle

    if as_json:
        console.print_json(json.dumps(Bundle.open(path).manifest))
        return
    _print_summary(path)


@bundle_app.command("verify")
def bundle_verify(
    ctx: typer.Context,
    path: BundleArg,
    trusted_key: Annotated[
        Path | None,
        typer.Option("--trusted-key", help="Require a valid signature by this ed25519 public key (PEM or ssh-ed25519)"),
    ] = None,
    replay: Annotated[
        bool, typer.Option("--replay", help="Also re-run the model and compare every site's sha256")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Override the bundle's model (with --replay)")
    ] = None,
    allow_weight_mismatch: Annotated[bool, typer.Option(help="Replay even if the weights differ (warns)")] = False,
    isolate: Annotated[
        bool, typer.Option("--isolate", help="Run the replay in a fresh network namespace (with --replay)")
    ] = False,
) -> None:
    """Check a bundle: every file, site and the recorded verdict; its signature; its replay.

    Prints the content digest. With --trusted-key, a valid signature by that key is
    required; with --replay, the model is re-run and every site must be bit-identical.
    """
    from model_forensics.core import signing
    from model_forensics.core.bundle import Bundle

    if not replay:
        given = {"--model": model is not None, "--allow-weight-mismatch": allow_weight_mismatch, "--isolate": isolate}
        needs_replay = [option for option, on in given.items() if on]
        if needs_replay:
            raise ForensicsError(f"{needs_replay[0]} only applies with --replay; add --replay or drop it")
    if trusted_key is not None:
        signing.load_public_key(trusted_key)
    if isolate:
        _run_isolated(ctx)
    bundle = Bundle.open(path, verify=False)
    problems = bundle.verify_contents()
    if problems:
        for p in problems:
            console.print(f"[red]✗[/] {_safe(p)}", soft_wrap=True)
        raise ForensicsError(
            f"bundle '{path}' failed verification ({len(problems)} problems; first: {problems[0]}); "
            "it was modified or is corrupt"
        )
    sites = bundle.manifest["sites"]
    exact = sum(info["sketch"] == "full" for info in sites.values())
    console.print(
        f"[green]✓[/] {_safe(path)}: schema ok, format {_safe(bundle.manifest['format_version'])}, "
        f"{len(bundle.manifest['files'])} files match their sha256, {len(sites)} sites decode to their "
        f"stored sha256 and shape ({exact} exact tensors re-hashed), recorded verdict consistent",
        soft_wrap=True,
    )
    console.print(f"digest {bundle.digest}", soft_wrap=True)
    _verify_signature(bundle, trusted_key)
    if replay:
        _replay_verify(path, model, allow_weight_mismatch)


def _verify_signature(bundle: Any, trusted_key: Path | None) -> None:
    """Print the signature's status; a bad signature, or none when a key is trusted, is an error."""
    from model_forensics.core import signing

    if trusted_key is not None:
        signer = signing.check_signature(bundle, trusted_key=trusted_key)
        console.print(f"[green]✓[/] signed by {_safe(signer)}, the trusted key {_safe(trusted_key)}", soft_wrap=True)
    elif signing.read_signature(bundle) is None:
        console.print("signature: none (unsigned)")
    else:
        signer = signing.check_signature(bundle)
        console.print(
            f"signature: valid, signed by {_safe(signer)}, not checked against a trusted key (pass --trusted-key KEY)",
            soft_wrap=True,
        )


@bundle_app.command("keygen")
def bundle_keygen(
    name: Annotated[Path, typer.Argument(help="Writes NAME.key (private, keep it secret) and NAME.pub")],
) -> None:
    """Create an ed25519 key pair for signing bundles."""
    from model_forensics.core import signing

    if not name.name or name.name in (".", ".."):
        raise ForensicsError(f"key name '{name}' names no file; pass a name such as keys/alice")
    _check_folder(name.parent, f"cannot write the key pair '{name}.key'", "name a key in an existing directory")
    private, public = signing.generate_key(name)
    signer = signing.fingerprint(signing.load_public_key(public))
    console.print(f"private key {_safe(private)} (keep it secret), public key {_safe(public)}", soft_wrap=True)
    console.print(f"fingerprint {signer}")


@bundle_app.command("sign")
def bundle_sign(
    path: Annotated[Path, typer.Argument(help="Bundle directory (sign before packing it)")],
    key: Annotated[Path, typer.Option("--key", "-k", help="ed25519 private key file (bundle keygen)")],
) -> None:
    """Sign a bundle directory in place (writes signature.json) after checking its contents."""
    from model_forensics.core import signing
    from model_forensics.core.bundle import Bundle

    signing.load_private_key(key)
    problems = Bundle.open(path).verify_contents()
    if problems:
        raise ForensicsError(
            f"refusing to sign '{path}': it fails verification ({len(problems)} problems; first: {problems[0]})"
        )
    signing.write_signature(path, key)
    bundle = Bundle.open(path)
    console.print(
        f"[green]✓[/] signed {_safe(path)} as {_safe(signing.check_signature(bundle))}: digest {bundle.digest}",
        soft_wrap=True,
    )


def _run_isolated(ctx: typer.Context) -> NoReturn:
    """Re-run this command line, minus --isolate, in a fresh network namespace."""
    from model_forensics.replay import isolation

    problem = isolation.isolation_problem()
    if problem is not None:
        raise ForensicsError(f"--isolate cannot run here: {problem}")
    argv = [a for a in ctx.meta[_ARGV] if a != "--isolate"]
    raise typer.Exit(int(isolation.run_isolated(argv)))


# -- replay --------------------------------------------------------------------------------------
def _open_session(path: Path, model: str | None, allow_weight_mismatch: bool, **sandbox: bool) -> Any:
    import warnings

    from model_forensics.core.errors import WeightMismatchWarning
    from model_forensics.replay import SandboxReplayer

    with err.status(f"loading {_safe(path)} and its model…"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options: dict[str, Any] = {k: v for k, v in sandbox.items() if v}
        replayer = SandboxReplayer(None, **options)
        session = replayer.load_bundle(path, model=model, allow_weight_mismatch=allow_weight_mismatch)
    for w in caught:
        if issubclass(w.category, WeightMismatchWarning):
            err.print(f"[bold red]WARNING:[/] {_safe(w.message)}", soft_wrap=True)
    return session


def _replay_verify(path: Path, model: str | None, allow_weight_mismatch: bool) -> Any:
    from model_forensics.core.errors import ReplayDivergence

    session = _open_session(path, model, allow_weight_mismatch)
    with err.status("replaying…"):
        report = session.verify()
    if not report.bit_identical:
        for check in report.differing[:20]:
            diff = f"max |Δ| {check.max_abs_diff:.3g}" if check.max_abs_diff is not None else check.note
            console.print(f"[red]✗[/] {_safe(check.site)}: {_safe(diff)}", soft_wrap=True)
        raise ReplayDivergence(f"replay of '{path}' is {report.summary()}")
    console.print(f"[green]✓[/] replay {_safe(report.summary())} ({report.seconds:.1f} s)", soft_wrap=True)
    return report


@app.command()
def replay(
    ctx: typer.Context,
    path: BundleArg,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the bundle's model")] = None,
    intervene: Annotated[
        list[str] | None,
        typer.Option("--intervene", "-i", help="SITE:KIND[=VALUE], e.g. blocks.1.attn.head.3:zero (repeatable)"),
    ] = None,
    verify: Annotated[bool, typer.Option(help="Check the unchanged replay is bit-identical first")] = True,
    allow_weight_mismatch: Annotated[bool, typer.Option(help="Replay even if the weights differ (warns)")] = False,
    isolate: Annotated[bool, typer.Option("--isolate", help="Replay in a fresh network namespace")] = False,
    allow_network: Annotated[
        bool, typer.Option("--allow-network", help="Let replayed code open sockets (off: the sandbox refuses)")
    ] = False,
    allow_subprocess: Annotated[
        bool, typer.Option("--allow-subprocess", help="Let replayed code start processes (off: the sandbox refuses)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Replay an incident bundle in the sandbox, optionally with interventions."""
    from model_forensics.replay import Intervention

    interventions = [Intervention.parse(spec) for spec in intervene or []]
    _check_exists(path, "bundle", "pass a bundle directory or a .mfb.zip file")
    if isolate:
        _run_isolated(ctx)
    session = _open_session(
        path, model, allow_weight_mismatch, allow_network=allow_network, allow_subprocess=allow_subprocess
    )
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
    table = Table(show_header=False, title=f"replay of [bold]{_safe(path)}[/]", title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    if report is not None:
        colour = "green" if report.bit_identical else "red"
        table.add_row("verification", f"[{colour}]{_safe(report.summary())}[/]")
    table.add_row("interventions", _safe(", ".join(str(iv) for iv in interventions) or "(none)"))
    if session.manifest["output"].get("text") is not None:
        table.add_row("recorded output", _clip(session.manifest["output"]["text"]))
    if result.text is not None:
        table.add_row("replayed output", _clip(result.text))
    table.add_row("prediction", _safe(result.prediction))
    if result.failed is not None:
        verdict = "[bold red]FAILS[/]" if result.failed else "[green]passes[/]"
        flip = " (flipped: the intervention fixes it)" if result.flipped else ""
        table.add_row("failure predicate", verdict + flip)
    table.add_row("forward passes", str(session.forward_passes))
    console.print(table)


# -- inspection ----------------------------------------------------------------------------------
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
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Inputs per forward pass (default: inspection.batch_size, 8)")
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(min=1, help="Tokens kept per input, the last ones (default: inspection.max_length, 128)"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0, help="Seed of the reservoirs, subsets, variants and bootstrap (default: inspection.seed, 0)"
        ),
    ] = None,
    config: ConfigOpt = None,
    figure_format: Annotated[
        str, typer.Option("--figures", help=f"Figure formats, comma-separated: {', '.join(FIGURE_FORMATS)}")
    ] = "png",
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout instead of tables")] = False,
) -> None:
    """Run the inspection experiments on a model over a JSONL prompt set."""
    import warnings

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model_forensics.inspection import ModelInspector

    names = _check_experiments(experiments)
    _check_config(config)
    formats = _check_figure_formats(figure_format)
    _check_dir_out(out, "--out")
    samples = _read_data(data, "--data")
    ref = _read_data(reference, "--reference") if reference is not None else None
    loaded = _load(model)
    candidate = _load(compare_model) if compare_model else None
    given = {"batch_size": batch_size, "max_length": max_length, "seed": seed}
    overrides: dict[str, Any] = {key: value for key, value in given.items() if value is not None}  # rest: --config
    inspector = ModelInspector(loaded.model, loaded.tokenizer, config=config, name=loaded.ref.name, **overrides)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(_safe(stage), total=total)
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
        err.print(f"[yellow]warning:[/] {_safe(w)}", soft_wrap=True)
    written = result.save(out, formats=formats)
    if as_json:
        console.print_json((out / "results.json").read_text())
        return
    console.print(result.tables())
    console.print(
        f"\nwrote {len(written)} files to [bold]{_safe(out)}[/]: results.json, summary.md and {len(written) - 2} figures"
    )


# -- root-cause analysis -------------------------------------------------------------------------
def _progress_callback(progress: Any, task: Any) -> Any:
    def say(message: str) -> None:
        progress.update(task, description=_safe(message), advance=1)

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
            _safe(
                f"{iv['site']}:{iv['kind']}"
                + (" along its failure direction" if iv.get("direction") else "")
                + (f", gated at {iv['gate']['site']}" if iv.get("gate") else "")
            ),
            _safe(m["level"]),
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
            _safe(a["site"]),
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
    config: ConfigOpt = None,
    strategy: Annotated[str | None, typer.Option(help="greedy | exhaustive")] = None,
    directions: Annotated[
        str | None,
        typer.Option(
            help="auto | always | never: narrow heads to their failure direction when whole heads break benign "
            "prompts (default: modules.cca.directions, auto)"
        ),
    ] = None,
    gating: Annotated[
        str | None,
        typer.Option(
            help="auto | always | never: put the fix behind a detector that fires on failing prompts only, "
            "when the fix breaks benign prompts (default: modules.cca.gating, auto)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the analysis JSON here")] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write a self-contained HTML report here (tables + figures)")
    ] = None,
) -> None:
    """Root-cause analysis: CF anomalies, attribution ranking, a verified minimal fix set."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from model_forensics.rca.pipeline import NothingToFix, analyze_bundle

    _check_exists(bundle, "bundle", "pass an incident bundle directory or a .mfb.zip file")
    for given in baseline or []:
        _check_exists(
            given, "--baseline bundle", "pass a baseline bundle directory or .mfb.zip recorded on the same model"
        )
    for path, what in ((out, "--out"), (report, "--report")):
        if path is not None:
            _check_file_out(path, what)
    _check_config(config)
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
            err.print(f"nothing to fix: {_safe(exc)}", soft_wrap=True)
            raise typer.Exit(1) from None
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    if report is not None:
        from model_forensics.report import write_analysis_report

        write_analysis_report(result, report)
        err.print(f"report written to {_safe(report)}", soft_wrap=True)
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
        console.print(f"note: {_safe(note)}")


def _many(directory: Path, model: str | None, config: Path | None, search: bool, workers: int, ray: str | None) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from model_forensics.rca.pipeline import find_bundles, run_many

    paths = find_bundles(directory)
    _check_config(config)  # a bad config fails here, not once per bundle in the workers
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
    table = Table(title=f"{len(report.results)} incidents analysed ({_safe(report.backend)}, {report.seconds:.1f} s)")
    for col in ("bundle", "top sites (attribution)", "max CF score", *(("fix set", "flip rate") if search else ())):
        table.add_column(col)
    for r in report.results:
        sites = [u["unit"] for u in r["ranking"]["units"] if u["level"] == "site"][:3]
        score = max((a["score"] for a in r["anomalies"]["anomalies"]), default=0.0)
        row = [_safe(Path(r["bundle"]).name), _safe(", ".join(sites)), f"{score:.1f}"]
        if search and r["fix_set"]:
            members = ", ".join(m["unit"] for m in r["fix_set"]["members"][:4])
            row += [_safe(members), f"{r['fix_set']['total_flip_rate']:.0%}"]
        table.add_row(*row)
    console.print(table)
    groups = Table(title="incident groups (shared root-cause sites), by severity")
    for col in ("severity", "incidents", "shared sites"):
        groups.add_column(col)
    for g in report.groups:
        groups.add_row(
            f"{g['severity']:.1f}",
            _safe(", ".join(Path(i).name for i in g["incidents"])),
            _safe(", ".join(g["shared_sites"]) or "—"),
        )
    console.print(groups)
    for s in report.skipped:
        console.print(f"[yellow]skipped[/] {_safe(s['bundle'])}: {_safe(s['error'])}", soft_wrap=True)


WorkersOpt = Annotated[int, typer.Option(min=1, help="Local worker processes")]
RayOpt = Annotated[str | None, typer.Option(help="Run on Ray: 'auto', 'local' or a cluster ADDRESS")]


@app.command()
def batch(
    directory: Annotated[Path, typer.Argument(help="Directory of bundles")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model override")] = None,
    config: ConfigOpt = None,
    workers: WorkersOpt = 2,
    ray: RayOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the summary JSON here")] = None,
) -> None:
    """Analyse every bundle in a directory (corrupt ones are skipped and listed)."""
    if out is not None:
        _check_file_out(out, "--out")
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
    config: ConfigOpt = None,
    workers: WorkersOpt = 2,
    ray: RayOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Cheap triage: CF + attribution only; groups incidents sharing root-cause sites."""
    report = _many(directory, model, config, False, workers, ray)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        _print_batch(report, search=False)


# -- demo and scenarios --------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the incident bundle")] = Path("demo-bundle"),
) -> None:
    """Record a real prompt-injection incident on SmolLM2-135M-Instruct (offline)."""
    from model_forensics.core.predicates import contains
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt
    from model_forensics.scenarios.demo import demo_incident

    _check_bundle_out(out, overwrite=True)
    incident = demo_incident()
    console.rule("[bold]model-forensics demo: a prompt injection on a real model")
    console.print(f"prompt: [italic]{_safe(incident['prompt'])}[/]")
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
    _print_summary(path)
    shown = _safe(path)
    console.print(
        "\nnext:\n"
        f"  model-forensics bundle verify {shown}\n"
        f"  model-forensics bundle info {shown} --json\n"
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
            table.add_row(f"[bold]{_safe(name)}[/]", "", "", "", "", "", f"[red]unavailable:[/] {_safe(s)}")
            continue
        table.add_row(
            f"[bold]{_safe(s.name)}[/]",
            _safe(s.model),
            _safe(s.kind),
            str(len(s.variants)),
            str(len(s.benign)),
            _safe(s.ground_truth_level),
            _safe(s.description),
        )
    console.print(table)


@scenarios_app.command("run")
def scenarios_run(
    name: Annotated[str, typer.Argument(help="Scenario name (see `scenarios list`)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for incident-*/ and baseline-*/ bundles")],
    overwrite: Annotated[bool, typer.Option(help="Replace bundles that already exist")] = False,
    incidents: Annotated[int | None, typer.Option(min=1, help="Record only the first N incidents")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON")] = False,
) -> None:
    """Record a scenario's incident and baseline bundles, ready for `analyze`."""
    from model_forensics.scenarios import get

    scenario = get(name)
    _check_dir_out(out, "--out")
    with err.status(f"loading {_safe(scenario.model)} and recording {_safe(name)}…"):
        run = scenario.record(out, overwrite=overwrite, limit=incidents)
    if as_json:
        console.print_json(json.dumps(run.to_json()))
        return
    table = Table(title=f"scenario [bold]{_safe(name)}[/] → {_safe(out)}", title_justify="left")
    for column in ("bundle", "output", "predicate"):
        table.add_column(column)
    for i, path in enumerate(run.incidents):
        table.add_row(_safe(path), _clip(run.outputs[i], 60), _verdict(run.incident_failed[i], expected=True))
        table.add_row(
            _safe(run.baselines[i]),
            _clip(run.baseline_outputs[i], 60),
            _verdict(run.baseline_failed[i], expected=False),
        )
    console.print(table)
    for role, path in run.artifacts.items():
        console.print(f"{_safe(role)}: {_safe(path)}", soft_wrap=True)
    console.print(f"ground truth: {_safe(scenario.ground_truth_note)}")
    if run.incidents:
        console.print(
            f"\nnext:\n  model-forensics analyze {_safe(run.incidents[0])} --baseline {_safe(run.baselines[0])}"
        )


def _verdict(holds: bool | None, expected: bool) -> str:
    if holds is None:
        return "no predicate"
    text = "FAILS (predicate holds)" if holds else "passes"
    return f"[green]{text}[/]" if holds == expected else f"[bold red]{text} (unexpected)[/]"


if __name__ == "__main__":
    main()
