"""The ``model-forensics`` command line: parses, calls the library, renders with rich.

Exit codes: 0 ok, 1 analysis found nothing, 2 bad input (one readable line on stderr,
checked before any model is loaded; ``--debug`` shows the traceback).

Every value that comes from a bundle, a model or the user is shown through :func:`_safe`:
rich markup in it is escaped and control characters are written as escapes (``\\x1b``),
so a hostile manifest cannot style, hide or rewrite what the terminal shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
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
circuits_app = typer.Typer(
    help="Circuits: token influence, head importance, claim evaluation, dependency graphs, discovery.",
    no_args_is_help=True,
)
app.add_typer(circuits_app, name="circuits")
fix_app = typer.Typer(
    help="Ship a fix: edited weights or a torch-only hook module, checked against replay.", no_args_is_help=True
)
app.add_typer(fix_app, name="fix")
# No emoji codes: ":name:" inside a bundle value must print as written.
console = Console(emoji=False)
err = Console(stderr=True, emoji=False)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="smollm2, minilm, zoo:NAME, a model directory or a .gguf file")
]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The input text")]
BundleArg = Annotated[Path, typer.Argument(help="Bundle directory or .mfb.zip")]
ConfigOpt = Annotated[Path | None, typer.Option(help="YAML config (default: built-in defaults)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto (CUDA if available)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | float16 | bfloat16 (the weights' dtype)")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="auto: place a model directory's layers with accelerate")
]
OffloadOpt = Annotated[
    Path | None, typer.Option("--offload-dir", help="With --device-map: keep layers that fit nowhere else here")
]
ReplayDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="float32 | float16 | bfloat16 (default: as recorded; another dtype is not bit-identical)"
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for the replay (default: replay.threads, else as recorded; verify says "
        "whether another count stays bit-identical)",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        from model_forensics import __version__

        console.print(f"model-forensics {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit"),
    ] = False,
) -> None:
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
    if pred.resolved and any(i < 0 for i in pred.indices()):
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


def _check_device(device: str | None, dtype: str | None) -> None:
    """--device and --dtype, checked before any work (no CUDA here is one line, exit 2)."""
    from model_forensics.models.loading import parse_dtype, resolve_device

    if dtype is not None:
        parse_dtype(dtype)
    if device is not None:
        resolve_device(device)


def _load(
    reference: str,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    offload_dir: Path | None = None,
) -> Any:
    from model_forensics.models.loading import load
    from model_forensics.models.onnx_model import is_onnx_reference, load_onnx

    if is_onnx_reference(reference):  # onnxruntime on the CPU (docs/onnx.md)
        return load_onnx(reference)
    _check_device(device, dtype)
    with err.status(f"loading {_safe(reference)}…"):
        return load(reference, device=device, dtype=dtype, device_map=device_map, offload_dir=offload_dir)


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
        name = (m.get("extras") or {}).get("predicate_name")
        if isinstance(name, str):  # given by name (class_is:positive): the name, then the id it resolved to
            args = f"{name!r} = {args}"
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
    table.add_row("format", _safe(f"{m['format']} {m['format_version']}, digests {b.hash}"))
    table.add_row("path", _safe(bundle_path))
    console.print(table)
    # Outside the table so neither is ever wrapped: people copy and compare these.
    console.print(f"digest    {b.digest}", soft_wrap=True)
    console.print(f"signature {_signature_status(b)}", soft_wrap=True)


@app.command()
def record(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The input text (a text model)")] = None,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            help="The input image of an image model (a CNN, an image .onnx): a .npy, .safetensors or .json "
            "file holding one preprocessed (C, H, W) image",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=0, help="Greedy-generate this many tokens (0: one forward pass)")
    ] = 0,
    predicate: Annotated[
        str | None,
        typer.Option(help="Failure predicate, e.g. contains:HACKED, class_is:positive (or 1), token_is:HACKED (or 42)"),
    ] = None,
    variants: Annotated[
        str | None,
        typer.Option(
            help="Failing variants of the incident: a .jsonl/.txt file of prompts, or 'auto' (generated from "
            "--prompt); those that do not fail the predicate are dropped"
        ),
    ] = None,
    benign: Annotated[
        Path | None,
        typer.Option(help="Benign prompts (.jsonl/.txt) for side-effect checks; those that fail are dropped"),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Clean counterparts of the incident (.jsonl/.txt), the CF baseline; those that fail are dropped"
        ),
    ] = None,
    near_miss: Annotated[
        Path | None,
        typer.Option(
            "--near-miss",
            help="Near misses (.jsonl/.txt): prompts with the trigger on which the model behaves; analyze checks a "
            "fix leaves them alone. Those that fail are dropped",
        ),
    ] = None,
    turns: Annotated[
        Path | None,
        typer.Option(
            "--turns",
            help="Record a conversation instead of one prompt: the user's messages, one a turn (.txt: one per line; "
            ".jsonl: one JSON string per line); each reply is greedy, --max-new-tokens long at most",
        ),
    ] = None,
    granularity: Annotated[Granularity | None, typer.Option(help="Which sites to record")] = None,
    sketch: Annotated[SketchKind | None, typer.Option(help="How site tensors are stored")] = None,
    config: ConfigOpt = None,
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help="Sign the bundle with this ed25519 private key (bundle keygen)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    device_map: DeviceMapOpt = None,
    offload_dir: OffloadOpt = None,
) -> None:
    """Record one prompt (or one image) into an incident bundle (with your variants, benign
    prompts and baselines), or a whole conversation turn by turn (--turns FILE)."""
    from model_forensics.core import signing
    from model_forensics.inspection.collect import model_device
    from model_forensics.models.image_files import check_input_kind, image_input, read_image
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import NoFailingVariants, record_incident, record_inputs, record_prompt

    if turns is not None:
        _check_turns_options(prompt, image, variants, benign, baseline, near_miss, max_new_tokens)
    else:
        _check_prompt_or_image(prompt, image, variants, benign, baseline, max_new_tokens, near_miss)
    pixels = read_image(image) if image is not None else None
    pred = _parse_predicate(predicate) if predicate else None
    _check_config(config)
    recorder = RecorderHooks(config, granularity=granularity, sketch=sketch)
    prompt_sets, sources = _read_prompt_sets(
        variants, benign, baseline, pred, recorder.config_tree.bundle, near_miss=near_miss
    )
    conversation = None if turns is None else _read_turns(turns, recorder.config_tree.bundle)
    if sign_key is not None:
        signing.load_private_key(sign_key)
    _check_bundle_out(out, overwrite)
    loaded = _load(model, device=device, dtype=dtype, device_map=device_map, offload_dir=offload_dir)
    check_input_kind(loaded, image=pixels is not None)
    if conversation is not None:
        from model_forensics.recorder.conversation import record_conversation

        with err.status(f"recording {len(conversation)} turns…"):
            path = record_conversation(
                loaded,
                conversation,
                out,
                recorder=recorder,
                max_new_tokens=max_new_tokens,
                predicate=pred,
                overwrite=overwrite,
                sign_key=sign_key,
            )
        _print_recorded(path, as_json)
        return
    if pixels is not None:
        with err.status("recording…"):
            inputs = {str(image_input(loaded.model)): pixels.to(model_device(loaded.model))}
            path = record_inputs(
                loaded, inputs, out, recorder=recorder, predicate=pred, overwrite=overwrite, sign_key=sign_key
            )
        _print_recorded(path, as_json)
        return
    assert prompt is not None
    with err.status("recording…"):
        if variants == "auto":
            prompt_sets["variants"] = _auto_variants(prompt)
        if prompt_sets:
            assert pred is not None
            try:
                recording = record_incident(
                    loaded,
                    prompt,
                    out,
                    predicate=pred,
                    **prompt_sets,
                    sources=sources,
                    variants_generated=variants == "auto",
                    recorder=recorder,
                    max_new_tokens=max_new_tokens,
                    overwrite=overwrite,
                    sign_key=sign_key,
                )
            except NoFailingVariants as exc:
                _error_line(str(exc))
                raise typer.Exit(1) from None
            path, messages = recording.path, [check.message for check in recording.checks]
        else:
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
            messages = []
    for message in messages:
        err.print(_safe(message), soft_wrap=True, highlight=False)
    _print_recorded(path, as_json)


def _print_recorded(path: Path, as_json: bool) -> None:
    if as_json:
        console.print_json((path / "manifest.json").read_text())
    else:
        _print_summary(path)


def _check_turns_options(
    prompt: str | None,
    image: Path | None,
    variants: str | None,
    benign: Path | None,
    baseline: Path | None,
    near_miss: Path | None,
    max_new_tokens: int,
) -> None:
    """``record --turns`` records a conversation: no other input, no prompt sets, and a
    reply of at least one token per turn."""
    given = [o for o, v in (("--prompt", prompt), ("--image", image)) if v is not None]
    given += [f"--{o}" for o, v in (("variants", variants), ("benign", benign), ("baseline", baseline)) if v]
    given += ["--near-miss"] if near_miss else []
    if given:
        raise ForensicsError(
            f"--turns records a conversation from its messages alone; drop {'/'.join(given)} (a conversation "
            "bundle carries no prompt sets: record its clean counterpart with --turns and pass it to analyze --baseline)"
        )
    if max_new_tokens < 1:
        raise ForensicsError("--turns needs --max-new-tokens N (N ≥ 1): the longest reply of each turn, e.g. 8")


def _read_turns(path: Path, limits: Any) -> list[str]:
    """The messages of ``record --turns``: a prompt file (.txt, .jsonl), one message a turn."""
    from model_forensics.core.prompts import read_prompts

    lines = read_prompts(path, limits)
    objects = [line.where for line in lines if line.fields]
    if objects:
        raise ForensicsError(f"{objects[0]}: a turn is one message, not an object; write one JSON string per line")
    return [line.text for line in lines]


def _check_prompt_or_image(
    prompt: str | None,
    image: Path | None,
    variants: str | None,
    benign: Path | None,
    baseline: Path | None,
    max_new_tokens: int,
    near_miss: Path | None = None,
) -> None:
    """``record`` takes a text prompt or one image; the prompt-set options and generation
    apply to text only (clean images are recorded as their own bundles, for analyze --baseline)."""
    if (prompt is None) == (image is None):
        raise ForensicsError(
            "record takes one input: --prompt TEXT for a text model or --image FILE for an image model"
            + (", not both" if prompt is not None else "")
        )
    if prompt is not None:
        _check_prompt(prompt)
        return
    options = (("variants", variants), ("benign", benign), ("baseline", baseline), ("near-miss", near_miss))
    given = [f"--{o}" for o, v in options if v]
    if given:
        raise ForensicsError(
            f"{'/'.join(given)} read prompt files, which an image model cannot take; record each clean image as its "
            "own bundle (record --image) and pass them to analyze --baseline"
        )
    if max_new_tokens:
        raise ForensicsError("--max-new-tokens applies to text models; an image model is recorded in one forward pass")


AUTO_VARIANTS = 32  # --variants auto: how many are generated (seed 0) before the predicate filters them


def _read_prompt_sets(
    variants: str | None,
    benign: Path | None,
    baseline: Path | None,
    predicate: Any,
    limits: Any,
    near_miss: Path | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The prompt files of ``record``, read and checked before the model loads (``--variants
    auto`` is generated after). Returns the prompts and the source of each set, by role."""
    from model_forensics.core.prompts import read_prompts

    files = {
        "variants": None if variants in (None, "auto") else Path(str(variants)),
        "benign": benign,
        "baseline": baseline,
        "near_miss": near_miss,
    }
    given = [role for role, path in files.items() if path is not None] + (["variants"] if variants == "auto" else [])
    if given and predicate is None:
        raise ForensicsError(
            f"--{'/--'.join(g.replace('_', '-') for g in given)} {'needs' if len(given) == 1 else 'need'} a "
            "--predicate: each prompt is checked "
            "against it (variants must fail it, benign and baseline prompts must not); e.g. --predicate contains:HACKED"
        )
    prompt_sets = {role: read_prompts(path, limits) for role, path in files.items() if path is not None}
    sources = {role: path.name for role, path in files.items() if path is not None}
    if variants == "auto":
        sources["variants"] = "generated from --prompt by --variants auto, seed 0"
    return prompt_sets, sources


def _auto_variants(prompt: str) -> list[str]:
    from model_forensics.inspection.variants import auto_variants

    return auto_variants(prompt, count=AUTO_VARIANTS, seed=0)


@app.command()
def trace(
    model: ModelOpt,
    prompt: PromptOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the ActivityCube JSON")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file")] = False,
) -> None:
    """Trace a prompt into an ActivityCube (tokens × layers × metrics) JSON file."""
    import torch

    from model_forensics.recorder import add_hooks_all
    from model_forensics.recorder.session import encode_prompt

    _check_prompt(prompt)
    _check_file_out(out, "--out")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ForensicsError(f"'{out}' already exists; choose another path or pass --overwrite to replace it")
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
        with Bundle.open(path) as opened:
            console.print_json(json.dumps(opened.manifest))
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
        bool, typer.Option("--replay", help="Also re-run the model and compare every site's digest")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Override the bundle's model (with --replay)")
    ] = None,
    allow_weight_mismatch: Annotated[bool, typer.Option(help="Replay even if the weights differ (warns)")] = False,
    isolate: Annotated[
        bool, typer.Option("--isolate", help="Run the replay in a fresh network namespace (with --replay)")
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Check a bundle: every file, site and the recorded verdict; its signature; its replay.

    Prints the content digest. With --trusted-key, a valid signature by that key is
    required; with --replay, the model is re-run and every site must be bit-identical.
    """
    from model_forensics.core import signing
    from model_forensics.core.bundle import Bundle

    if not replay:
        given = {
            "--model": model is not None,
            "--allow-weight-mismatch": allow_weight_mismatch,
            "--isolate": isolate,
            "--threads": threads is not None,
        }
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
        f"{len(bundle.manifest['files'])} files match their digests ({bundle.hash}), {len(sites)} sites decode "
        f"to their stored digests and shape ({exact} exact tensors re-hashed), recorded verdict consistent",
        soft_wrap=True,
    )
    console.print(f"digest {bundle.digest}", soft_wrap=True)
    _verify_signature(bundle, trusted_key)
    if replay:
        _replay_verify(path, model, allow_weight_mismatch, threads)


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
    with Bundle.open(path) as opened:
        problems = opened.verify_contents()
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


@bundle_app.command("pack")
def bundle_pack(
    path: Annotated[Path, typer.Argument(help="Bundle directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The archive to write (NAME.mfb.zip)")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing archive")] = False,
) -> None:
    """Zip a bundle directory into a .mfb.zip the reader accepts, and check what was written.

    (`zip -r x.mfb.zip DIR` is refused: it stores DIR/ and every file under it.)
    """
    from model_forensics.core.bundle import Bundle, pack_bundle

    _check_exists(path, "bundle", "pass a bundle directory")
    _check_file_out(out, "--out")
    archive = pack_bundle(path, out, overwrite=overwrite)
    with Bundle.open(archive) as packed:  # an archive opens into a temporary copy: removed now
        digest = packed.digest
    console.print(
        f"[green]✓[/] packed {_safe(path)} → {_safe(archive)} ({_human(archive.stat().st_size)}), "
        f"verified: digest {digest}",
        soft_wrap=True,
    )


@bundle_app.command("unpack")
def bundle_unpack(
    archive: Annotated[Path, typer.Argument(help="A .mfb.zip archive")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle")] = False,
) -> None:
    """Unpack a .mfb.zip into a bundle directory (checked before anything is written)."""
    from model_forensics.core.bundle import Bundle, unpack_bundle

    _check_exists(archive, "archive", "pass a .mfb.zip file")
    _check_bundle_out(out, overwrite)
    path = unpack_bundle(archive, out, overwrite=overwrite)
    console.print(
        f"[green]✓[/] unpacked {_safe(archive)} → {_safe(path)}: digest {Bundle.open(path).digest}", soft_wrap=True
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
def _open_session(
    path: Path,
    model: str | None,
    allow_weight_mismatch: bool,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    device_map: str | None = None,
    offload_dir: Path | None = None,
    **sandbox: bool,
) -> Any:
    import warnings

    from model_forensics.core.errors import WeightMismatchWarning
    from model_forensics.replay import SandboxReplayer
    from model_forensics.replay.loading import DtypeChangeWarning

    _check_device(device, dtype)
    with err.status(f"loading {_safe(path)} and its model…"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options: dict[str, Any] = {k: v for k, v in sandbox.items() if v}
        if threads is not None:
            options["threads"] = threads
        replayer = SandboxReplayer(None, **options)
        # accelerate places the weights itself: replay's default --device cpu would clash with it
        session = replayer.load_bundle(
            path,
            model=model,
            allow_weight_mismatch=allow_weight_mismatch,
            device=None if device_map is not None and device == "cpu" else device,
            dtype=dtype,
            device_map=device_map,
            offload_dir=offload_dir,
        )
    for w in caught:
        if issubclass(w.category, WeightMismatchWarning):
            err.print(f"[bold red]WARNING:[/] {_safe(w.message)}", soft_wrap=True)
        elif issubclass(w.category, DtypeChangeWarning):
            err.print(f"note: {_safe(w.message)}", soft_wrap=True)
    return session


def _replay_verify(path: Path, model: str | None, allow_weight_mismatch: bool, threads: int | None = None) -> Any:
    from model_forensics.core.errors import ReplayDivergence

    session = _open_session(path, model, allow_weight_mismatch, threads=threads)
    with err.status("replaying…"):
        report = session.verify()
    for note in report.notes:
        err.print(f"note: {_safe(note)}", soft_wrap=True)
    if not report.bit_identical:
        for check in report.differing[:20]:
            diff = f"max |Δ| {check.max_abs_diff:.3g}" if check.max_abs_diff is not None else check.note
            console.print(f"[red]✗[/] {_safe(check.site)}: {_safe(diff)}", soft_wrap=True)
        raise ReplayDivergence(f"replay of '{path}' is {report.summary()}")
    console.print(f"[green]✓[/] replay {_safe(report.summary())} ({report.seconds:.1f} s)", soft_wrap=True)
    turns = _replay_turns(session, [])
    if turns is not None:
        _print_turns(turns, changed=False)
        if not turns.bit_identical:
            differ = [str(t.index) for t in turns.turns if not t.bit_identical]
            raise ReplayDivergence(f"replay of '{path}': turn {', '.join(differ)} differs from the recording")
        console.print(f"[green]✓[/] all {len(turns.turns)} turns replay bit-identically", soft_wrap=True)
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
    fix: Annotated[
        Path | None,
        typer.Option("--fix", help="Apply the fix set an `analyze --out FILE` JSON holds (gates, directions included)"),
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
    device: DeviceOpt = "cpu",
    dtype: ReplayDtypeOpt = None,
    threads: ThreadsOpt = None,
    device_map: DeviceMapOpt = None,
    offload_dir: OffloadOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Replay an incident bundle in the sandbox, optionally with interventions or a fix set.

    A model larger than memory: ``--device-map auto --offload-dir DIR`` loads the bundle's model
    directory with accelerate, as ``record`` does, and replays it from there. A conversation
    bundle (``record --turns``) is also replayed turn by turn, each turn beside its recording.
    """
    from model_forensics.replay import Intervention
    from model_forensics.replay.loading import read_fix_file, recorded_dtype
    from model_forensics.scenarios.agent import replayed_call

    interventions = [Intervention.parse(spec) for spec in intervene or []]
    if fix is not None:
        interventions += read_fix_file(fix)
    _check_exists(path, "bundle", "pass a bundle directory or a .mfb.zip file")
    if isolate:
        _run_isolated(ctx)
    session = _open_session(
        path,
        model,
        allow_weight_mismatch,
        device=device,
        dtype=dtype,
        threads=threads,
        device_map=device_map,
        offload_dir=offload_dir,
        allow_network=allow_network,
        allow_subprocess=allow_subprocess,
    )
    report = None
    same_dtype = next(session.model.parameters()).dtype == recorded_dtype(session.bundle)
    if verify and same_dtype:
        with err.status("verifying the replay…"):
            report = session.verify()
    with err.status("replaying…"):
        result = session.run(interventions)
        turns = _replay_turns(session, interventions)
    call = replayed_call(session, result)  # an agent step: the tool call it would issue (not run)
    if as_json:
        payload = {"verify": report.to_json() if report else None, "recorded_failed": session.recorded_failed}
        extra = {"fix": None if fix is None else str(fix), "agent_call": None if call is None else call.to_json()}
        conversation = {} if turns is None else {"turns": turns.to_json()}
        console.print_json(json.dumps({**payload, **extra, "run": result.to_json(), **conversation}))
        return
    console.print(_replay_table(path, session, result, report, interventions, fix))
    if turns is not None:
        _print_turns(turns, changed=bool(interventions))
    if call is not None:
        colour = "bold red" if call.destructive else "green"
        who = "with the fix the agent would issue" if fix is not None else "the replayed agent would issue"
        console.print(f"{who}: [{colour}]{_safe(call)}[/] (replayed, not executed)", soft_wrap=True)


def _replay_turns(session: Any, interventions: list[Any]) -> Any:
    """A conversation bundle's turn-by-turn replay (replay/turns.py); None for one prompt."""
    from model_forensics.core.conversation import check_conversation
    from model_forensics.replay.turns import replay_turns

    if check_conversation(session.manifest) is None:
        return None
    return replay_turns(session, interventions=interventions)


def _print_turns(turns: Any, changed: bool) -> None:
    """One line a turn: bit-identical to the recording (or what the interventions changed)."""
    for turn in turns.turns:
        if turn.bit_identical:
            verdict = "[green]bit-identical[/] to the recording"
        else:
            verdict = "[yellow]changed[/]" if changed else "[red]differs from the recording[/]"
        line = f"turn {turn.index}: {verdict}: reply “{_clip(turn.reply, 80)}”"
        if not turn.same_reply:
            line += f" (recorded “{_clip(turn.recorded.reply, 80)}”)"
        console.print(line, soft_wrap=True)


def _replay_table(
    path: Path, session: Any, result: Any, report: Any, interventions: list[Any], fix: Path | None
) -> Table:
    table = Table(show_header=False, title=f"replay of [bold]{_safe(path)}[/]", title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    if report is not None:
        colour = "green" if report.bit_identical else "red"
        table.add_row("verification", f"[{colour}]{_safe(report.summary())}[/]")
    if fix is not None:
        n = len(interventions)
        table.add_row("fix set", _safe(f"{fix} ({n} intervention{'s' if n != 1 else ''})"))
    table.add_row("interventions", _safe(", ".join(str(iv) for iv in interventions) or "(none)"))
    for site, opened in result.gates.items():
        table.add_row(
            "gate", _safe(f"{site}: {'opened (the fix applied)' if opened else 'closed (run left unchanged)'}")
        )
    if session.manifest["output"].get("text") is not None:
        table.add_row("recorded output", _clip(session.manifest["output"]["text"]))
    if result.text is not None:
        table.add_row("fixed output" if fix is not None else "replayed output", _clip(result.text))
    recorded = session.manifest["output"].get("prediction")
    if result.text is None and recorded is not None:  # a classifier: its class is the output
        table.add_row("recorded prediction", _safe(recorded))
    table.add_row("fixed prediction" if fix is not None else "prediction", _safe(result.prediction))
    if result.failed is not None:
        if fix is not None:
            verdict = (
                "[bold red]still holds[/] (the fix does not remove the failure)"
                if result.failed
                else "[green]no longer holds[/] (the fix removes the failure)"
            )
        else:
            verdict = "[bold red]FAILS[/]" if result.failed else "[green]passes[/]"
            verdict += " (flipped: the intervention fixes it)" if result.flipped else ""
        table.add_row("failure predicate", verdict)
    table.add_row("forward passes", str(session.forward_passes))
    return table


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
    ray: Annotated[
        str | None, typer.Option(help="Stream the inputs as Ray tasks: 'auto', 'local' or a cluster ADDRESS")
    ] = None,
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
                ray=ray,
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
PLAIN_PROGRESS_EVERY_S = 2.0  # without a terminal: at most one progress line this often per phase


@contextlib.contextmanager
def _progress_callback() -> Iterator[Callable[[str, int, int], None]]:
    """``progress(phase, done, total)`` for ``analyze_bundle`` on stderr: on a terminal a rich
    bar per phase (count, time left); otherwise plain lines (``search: units: 8/56
    candidates, about 3 s left``) at most every 2 s per phase, and each phase's last line
    once the next phase begins (so an error right after a phase stays one line)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from model_forensics.rca.progress import describe

    if err.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def update(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(_safe(phase), total=total)
                elif done == 0:
                    bar.reset(tasks[phase], total=total)
                bar.update(tasks[phase], completed=done, total=total)

            yield update
        return
    state: dict[str, Any] = {"phase": None, "pending": None, "started": 0.0, "printed": 0.0}

    def line(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != state["phase"]:
            if state["pending"]:
                err.print(state["pending"], soft_wrap=True, highlight=False)
            state.update(phase=phase, started=now, printed=now)
        elapsed = now - state["started"]
        eta = elapsed / done * (total - done) if 0 < done < total else None
        state["pending"] = _safe(describe(phase, done, total, eta))
        if now - state["printed"] >= PLAIN_PROGRESS_EVERY_S:
            err.print(state["pending"], soft_wrap=True, highlight=False)
            state.update(pending=None, printed=now)

    yield line
    if state["pending"]:
        err.print(state["pending"], soft_wrap=True, highlight=False)


def _fix_table(result: dict[str, Any], title: str, caption: str) -> Table:
    """The fix set's members, narrow enough for 80 columns; unit names are never cut
    (their column is as wide as the longest). How a member is ablated (along a failure
    direction, behind a gate) is in the level column; attribution and CF scores are in
    --json and the report."""
    from rich import box

    fix = result["fix_set"]
    names = [_safe(f"{m['intervention']['site']}:{m['intervention']['kind']}") for m in fix["members"]]
    table = Table(
        title=_safe(title),
        caption=_safe(caption),
        box=box.SIMPLE_HEAD,
        show_edge=False,
        title_justify="left",
        caption_justify="left",
        title_style="bold",
    )
    table.add_column("intervention", no_wrap=True, min_width=max(map(len, names), default=12))
    for col in ("level", "necessity", "sufficiency", "benign KL"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for name, m in zip(names, fix["members"], strict=True):
        iv = m["intervention"]
        level = m["level"] + (", direction" if iv.get("direction") else "") + (", gated" if iv.get("gate") else "")
        kl = "—" if m["benign_kl"] is None else f"{m['benign_kl']:.2g}"
        table.add_row(name, _safe(level), f"{m['necessity']:.0%}", f"{m['sufficiency']:.0%}", kl)
    return table


def _held_out_table(result: dict[str, Any], title: str, caption: str) -> Table:
    """The fix's figures on the search part and the held-out part, side by side."""
    from rich import box

    from model_forensics.rca.explain import held_out_rows

    table = Table(title=_safe(title), caption=_safe(caption), box=box.SIMPLE_HEAD, show_edge=False)
    table.title_justify = table.caption_justify = "left"
    table.title_style = "bold"
    table.add_column("figure")
    table.add_column("search", justify="right")
    table.add_column("held out", justify="right")
    for row in held_out_rows(result["fix_set"]):
        table.add_row(*(_safe(cell) for cell in row))
    return table


def _print_explanation(result: dict[str, Any], sections: list[Any]) -> None:
    """The analysis in reading order (:func:`model_forensics.rca.explain.explain`); every
    string from the bundle printed literally."""
    for section in sections:
        if section.key == "fix_set":
            console.print(_fix_table(result, section.title, " ".join(section.paragraphs)))
            console.print()
            continue
        if section.key == "held_out":
            console.print(_held_out_table(result, section.title, " ".join(section.paragraphs)))
            console.print()
            continue
        console.print(f"[bold]{_safe(section.title)}[/]")
        for paragraph in section.paragraphs:
            console.print(_safe(paragraph), highlight=False)
        if section.items:
            bullets = Table.grid(padding=(0, 1))
            bullets.add_column(no_wrap=True)
            bullets.add_column()
            for item in section.items:
                bullets.add_row(" •", _safe(item))
            console.print(bullets, highlight=False)
        for command, does in section.commands:
            for line in _command_lines(command, console.width - 2):
                console.print(f"  [cyan]{_safe(line)}[/]", soft_wrap=True, highlight=False)
            console.print(f"      {_safe(does)}", highlight=False)
        console.print()


def _command_lines(command: str, width: int) -> list[str]:
    """A shell command cut at word boundaries into lines of at most ``width`` characters,
    continued with a backslash, so it still runs when copied (a word longer than a line
    gets a line of its own)."""
    lines: list[str] = []
    for word in (shlex.quote(w) for w in shlex.split(command)):
        if lines and len(lines[-1]) + 1 + len(word) + 2 <= width:
            lines[-1] += " " + word
        else:
            lines.append(word if not lines else "    " + word)
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


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
def report(
    bundle: Annotated[Path, typer.Argument(help="Incident bundle directory or .mfb.zip")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write")] = Path("report.html"),
    analysis: Annotated[
        Path | None, typer.Option("--analysis", help="An analysis JSON (`analyze --out`) to include")
    ] = None,
    inspect_dir: Annotated[
        Path | None, typer.Option("--inspect", help="An `inspect --out` directory whose plots to include")
    ] = None,
    influence: Annotated[
        bool, typer.Option("--influence/--no-influence", help="Replay once to embed token influence")
    ] = True,
) -> None:
    """One self-contained HTML file (the dashboard's views, offline, no network) for a bundle."""
    from model_forensics.report.html import write_report

    _check_exists(bundle, "bundle", "pass an incident bundle directory or a .mfb.zip file")
    if analysis is not None:
        _check_exists(analysis, "--analysis", "pass the JSON file `analyze --out` wrote")
    _check_file_out(out, "--out")
    path = write_report(bundle, out, analysis=analysis, inspect=inspect_dir, influence=influence)
    size = path.stat().st_size / 1e6
    console.print(f"report written to {_safe(path)} ({size:.1f} MB); open it in a browser (works offline)")


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
    step_gate: Annotated[
        str | None,
        typer.Option(
            "--step-gate",
            help="auto | always | never: also fit a step-gated steering fix (acts only at the positions where the "
            "model is about to emit the failure) when the unit fix does not hold (default: modules.cca.step_gate, "
            "auto); with --out, written beside it as OUT.step_gate.json",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON")] = False,
    anomalies: Annotated[
        bool,
        typer.Option(
            "--anomalies",
            help="Also show the CF anomaly table (hidden by default: on the zoo CF ranks the planted sites "
            "worse than activation norm, benchmarks/results/rca_eval.md)",
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    dtype: ReplayDtypeOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the analysis JSON here")] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the one-file offline report here (the dashboard with the analysis)"),
    ] = None,
) -> None:
    """Root-cause analysis: the smallest verified fix set, explained (what happened, the answer,
    what was tried, what is uncertain, what to run next)."""
    from model_forensics.rca.explain import explain
    from model_forensics.rca.pipeline import NothingToFix, analyze_bundle
    from model_forensics.replay.environment import with_threads

    _check_exists(bundle, "bundle", "pass an incident bundle directory or a .mfb.zip file")
    for given in baseline or []:
        _check_exists(
            given, "--baseline bundle", "pass a baseline bundle directory or .mfb.zip recorded on the same model"
        )
    for path, what in ((out, "--out"), (report, "--report")):
        if path is not None:
            _check_file_out(path, what)
    _check_config(config)
    _check_device(device, dtype)
    try:
        with _progress_callback() as progress:
            result = analyze_bundle(
                bundle,
                model=model,
                baseline=baseline or [],
                config=with_threads(config, threads),
                strategy=strategy,
                directions=directions,
                gating=gating,
                step_gate=step_gate,
                progress=progress,
                device=device,
                dtype=dtype,
            ).to_json()
    except NothingToFix as exc:
        err.print(f"nothing to fix: {_safe(exc)}", soft_wrap=True)
        raise typer.Exit(1) from None
    _add_agent_with_fix(result, bundle, model, device, dtype)
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
        if result.get("step_gate"):
            step_out = step_gate_path(out)
            step_out.write_text(json.dumps({**result["step_gate"], "bundle": result["bundle"]}, indent=1))
            err.print(f"step-gated fix written to {_safe(step_out)} (a fix file: replay --fix, fix export)")
    if report is not None:
        from model_forensics.report import write_analysis_report

        write_analysis_report(result, report)
        err.print(f"report written to {_safe(report)}", soft_wrap=True)
    if as_json:
        console.print_json(json.dumps(result))
        return
    saved, reported = (None if p is None else str(p) for p in (out, report))
    _print_explanation(result, explain(result, saved_to=saved, report_to=reported, anomalies_shown=anomalies))
    _print_agent_with_fix(result)
    if anomalies:
        console.print(_anomaly_table(result))
        for note in result["anomalies"].get("notes", []):
            console.print(f"note: {_safe(note)}", highlight=False)


def step_gate_path(out: Path) -> Path:
    """Where ``analyze --out OUT`` writes the step-gated fix: OUT.step_gate.json beside it."""
    return out.with_name(f"{out.stem}.step_gate.json")


def _add_agent_with_fix(
    result: dict[str, Any], bundle: Path, model: str | None, device: str | None, dtype: str | None
) -> None:
    """For an agent-step incident (tool-misuse), ``result["agent_with_fix"]``: the tool call
    the agent would issue with the fix set applied (replayed in the sandbox, not executed)."""
    from model_forensics.core.bundle import Bundle
    from model_forensics.scenarios.agent import fixed_agent_call

    fix = result.get("fix_set")
    if not fix or not fix.get("interventions") or "agent" not in (Bundle.open(bundle).manifest.get("extras") or {}):
        return
    with err.status("replaying the agent step with the fix…"):
        call = fixed_agent_call(bundle, fix["interventions"], model=model, device=device, dtype=dtype)
    if call is not None:
        result["agent_with_fix"] = call.to_json() | {"call": str(call)}


def _print_agent_with_fix(result: dict[str, Any]) -> None:
    call = result.get("agent_with_fix")
    if call:
        colour = "bold red" if call["destructive"] else "green"
        console.print(f"with the fix the agent would issue: [{colour}]{_safe(call['call'])}[/]", soft_wrap=True)


def _many(
    directory: Path,
    model: str | None,
    config: Path | None,
    search: bool,
    workers: int,
    ray: str | None,
    results_dir: Path | None = None,
    resume: bool = False,
) -> Any:
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
            results_dir=results_dir,
            resume=resume,
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
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Directory for one result JSON per incident, each written as it finishes"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip incidents whose result is already in --results (same job)")
    ] = False,
) -> None:
    """Analyse every bundle in a directory (corrupt ones are skipped and listed)."""
    from model_forensics.rca.pipeline import write_json_atomic

    if out is not None:
        _check_file_out(out, "--out")
    if resume and results is None:
        raise ForensicsError("--resume reads the results an earlier run wrote: pass --results DIR too")
    if results is not None:
        _check_dir_out(results, "--results")
    report = _many(directory, model, config, True, workers, ray, results, resume)
    if out is not None:
        write_json_atomic(out, report.to_json())
    if as_json:
        console.print_json(json.dumps(report.to_json()))
        return
    _print_batch(report, search=True)
    if results is not None:
        console.print(
            f"{len(report.computed)} computed, {len(report.resumed)} resumed from {_safe(results)}", soft_wrap=True
        )


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


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="Directory of bundles, analyses and inspections")] = Path("."),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on (beyond loopback needs --token)")] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option(envvar="MODEL_FORENSICS_TOKEN", help="Require this token on every API call")
    ] = None,
    time_limit: Annotated[float, typer.Option("--time-limit", min=1, help="Longest an analysis job may run (s)")] = 600,
) -> None:
    """The inspection console: dashboard and JSON API over DIRECTORY (prints the URL, then serves)."""
    from model_forensics.server.app import serve as run_server

    run_server(directory, host=host, port=port, token=token, time_limit_s=time_limit, echo=_plain_line)


def _plain_line(text: str) -> None:
    console.print(_safe(text), highlight=False, soft_wrap=True)


# -- demo and scenarios --------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the incident bundle")] = Path("demo-bundle"),
) -> None:
    """Record a real prompt-injection incident on SmolLM2-135M-Instruct (offline)."""
    from model_forensics.core.predicates import contains
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt
    from model_forensics.scenarios.demo import demo_incident, write_demo_report

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
    with err.status("writing the offline report…"):
        report = write_demo_report(Path(path))
    console.print(
        "\nnext:\n"
        f"  model-forensics bundle verify {shown}\n"
        f"  model-forensics bundle info {shown} --json\n"
        f'  model-forensics trace --model smollm2 --prompt "..." --out cube.json\n'
        f"\noffline report: {_safe(report)} (open it in a browser)\n"
        f"dashboard:      model-forensics serve {_safe(Path(path).resolve().parent)}"
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


# -- circuits --------------------------------------------------------------------------------------
CircuitsModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="zoo:NAME, smollm2, a model directory … (or use --bundle)")
]
CircuitsBundleOpt = Annotated[
    Path | None, typer.Option("--bundle", "-b", help="Run on an incident bundle's model (and prompt), no re-recording")
]
CircuitsOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the JSON result and figures")]
CircuitsFiguresOpt = Annotated[str, typer.Option("--figures", help="Figure formats: png, svg, pdf")]
CircuitsJsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON result to stdout instead of a table")]
CircuitsTargetOpt = Annotated[
    str | None, typer.Option("--target", "-t", help="Output token to explain, e.g. ' HACKED' (default: the top one)")
]


def _circuits_start(
    model: str | None, bundle: Path | None, prompt: str | None, needs_prompt: bool, out: Path | None, figures: str
) -> tuple[Any, Any]:
    """Check a circuits command's options (figure formats, --out, one of --model /
    --bundle, a prompt where one is needed), then load what it runs on: (model or replay
    session, tokenizer) as the circuits functions take them."""
    _check_figure_formats(figures)
    if out is not None:
        _check_dir_out(out, "--out")
    return _circuits_call(_circuits_subject(model, bundle, prompt, needs_prompt))


def _circuits_subject(model: str | None, bundle: Path | None, prompt: str | None, needs_prompt: bool) -> Any:
    """The loaded model (``LoadedModel``) or replay session the command runs on."""
    if (model is None) == (bundle is None):
        raise ForensicsError("pass either --model (with --prompt) or --bundle (an incident bundle), not both or none")
    if prompt is not None:
        _check_prompt(prompt)
    if bundle is not None:
        _check_exists(bundle, "bundle", "pass an incident bundle directory or .mfb.zip")
        return _open_session(bundle, None, False)
    if needs_prompt and prompt is None:
        raise ForensicsError("--model needs --prompt (the text to analyse); or pass --bundle to use a recorded prompt")
    assert model is not None
    return _load(model)


def _circuits_call(subject: Any) -> tuple[Any, Any]:
    """(model or session, tokenizer) as the circuits functions take them."""
    from model_forensics.replay.session import Session

    if isinstance(subject, Session):
        return subject, None
    return subject.model, subject.tokenizer


def _circuits_output(out: Path | None, name: str, result: Any, figure_format: str, as_json: bool) -> list[Path] | None:
    """Write ``NAME.json`` and ``NAME.FORMAT`` figures in ``out`` (with --out), then print
    the JSON (with --json: returns None, nothing more to show) or return what was written."""
    from model_forensics.core.files import write_text_atomic

    data = result.to_json()
    written: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        written.append(write_text_atomic(out / f"{name}.json", json.dumps(data, indent=2)))
        figure = result.figure()
        for fmt in _check_figure_formats(figure_format):
            figure.savefig(out / f"{name}.{fmt}")
            written.append(out / f"{name}.{fmt}")
    if as_json:
        console.print_json(json.dumps(data))
        return None
    return written


def _circuits_done(written: list[Path]) -> None:
    if written:
        console.print(f"wrote {', '.join(_safe(p) for p in written)}", soft_wrap=True)


@circuits_app.command("influence")
def circuits_influence(
    model: CircuitsModelOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The input text")] = None,
    bundle: CircuitsBundleOpt = None,
    target: CircuitsTargetOpt = None,
    method: Annotated[
        str, typer.Option(help="integrated_gradients | grad_x_input | occlusion | attention_rollout")
    ] = "integrated_gradients",
    position: Annotated[int, typer.Option(help="Output position explained (-1: the last prompt token)")] = -1,
    measure: Annotated[str, typer.Option(help="logprob | logit of the target")] = "logprob",
    baseline: Annotated[str, typer.Option(help="zero | pad: what IG integrates from and occlusion writes")] = "zero",
    n_steps: Annotated[int, typer.Option("--n-steps", min=1, help="Integration points (IG)")] = 32,
    out: CircuitsOutOpt = None,
    figure_format: CircuitsFiguresOpt = "png",
    as_json: CircuitsJsonOpt = False,
) -> None:
    """Score each prompt token by its influence on one output token."""
    from model_forensics.circuits import METHODS, token_influence

    if method not in METHODS:
        raise ForensicsError(f"--method '{method}' is unknown; use one of {', '.join(METHODS)}")
    net, tok = _circuits_start(model, bundle, prompt, True, out, figure_format)
    with err.status(f"{method}…"):
        result = token_influence(
            net,
            tok,
            prompt,
            target=_circuits_target(target),
            method=method,
            position=position,
            measure=measure,
            baseline=baseline,
            n_steps=n_steps,
        )
    written = _circuits_output(out, "influence", result, figure_format, as_json)
    if written is None:
        return
    table = Table(
        title=f"{_safe(method)} ({result.evidence}) → {_safe(repr(result.objective.label))} "
        f"at position {result.objective.position}",
        title_justify="left",
    )
    for column in ("pos", "token", "score", ""):
        table.add_column(column, justify="right" if column in ("pos", "score") else "left")
    top = set(result.top(3))
    for i, (token, score) in enumerate(zip(result.tokens, result.scores, strict=True)):
        table.add_row(str(i), _clip(token, 40), f"{score:+.4f}", "[bold]top 3[/]" if i in top else "")
    console.print(table)
    if result.convergence_delta is not None:
        console.print(f"convergence delta {result.convergence_delta:+.2e} ({result.n_steps} steps)")
    _circuits_done(written)


def _circuits_target(target: str | None) -> str | int | None:
    """A --target: a token id when it is all digits (``146``), else the token text."""
    if target is None:
        return None
    return int(target) if target.strip().isdigit() else target


@circuits_app.command("heads")
def circuits_heads(
    model: CircuitsModelOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The input text")] = None,
    bundle: CircuitsBundleOpt = None,
    target: CircuitsTargetOpt = None,
    metric: Annotated[str, typer.Option(help="logprob | logit (drop of the target) | kl")] = "logprob",
    kind: Annotated[str, typer.Option(help="mean | zero ablation (a bundle: any intervention kind)")] = "mean",
    baseline: Annotated[
        Path | None, typer.Option(help="Prompts (.jsonl/.txt) whose mean head outputs 'mean' writes (--model)")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--head", help="Measure only this head, blocks.L.attn.head.H (repeat)")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Heads shown in the table")] = 10,
    out: CircuitsOutOpt = None,
    figure_format: CircuitsFiguresOpt = "png",
    as_json: CircuitsJsonOpt = False,
) -> None:
    """Ablate every attention head alone (one batched sweep) and rank them by effect."""
    from model_forensics.circuits import head_importance, read_prompts

    if baseline is not None and bundle is not None:
        raise ForensicsError("--baseline applies to --model; a bundle's mean reads its recorded baseline set")
    base = [r.text for r in read_prompts(baseline)] if baseline is not None else None
    net, tok = _circuits_start(model, bundle, prompt, True, out, figure_format)
    with err.status("ablating every head…"):
        result = head_importance(
            net, tok, prompt, metric=metric, target=_circuits_target(target), kind=kind, baseline=base, heads=only
        )
    written = _circuits_output(out, "heads", result, figure_format, as_json)
    if written is None:
        return
    table = Table(
        title=f"head importance: {_safe(kind)} ablation, {_safe(result.metric)} "
        f"({len(result.heads)} heads, {result.forward_passes} passes, {result.seconds:.1f} s)",
        title_justify="left",
    )
    table.add_column("head")
    table.add_column("effect", justify="right")
    for head, effect in result.ranking()[:top]:
        table.add_row(_safe(head), f"{effect:+.4f}")
    console.print(table)
    _circuits_done(written)


@circuits_app.command("evaluate")
def circuits_evaluate(
    unit: Annotated[
        list[str], typer.Option("--unit", "-u", help="A claimed unit, e.g. blocks.0.attn.head.3 (repeat the option)")
    ],
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='Prompt set: .jsonl ({"prompt": …, "target": …}) or .txt (a bundle: optional)'),
    ] = None,
    model: CircuitsModelOpt = None,
    bundle: CircuitsBundleOpt = None,
    target: CircuitsTargetOpt = None,
    kind: Annotated[str, typer.Option(help="mean | zero | resample (resample: prompts of one length)")] = "mean",
    measure: Annotated[str, typer.Option(help="logprob | logit of each prompt's target")] = "logprob",
    n_boot: Annotated[int, typer.Option("--n-boot", min=1, help="Bootstrap resamples")] = 1000,
    seed: Annotated[int, typer.Option(min=0, help="Bootstrap seed (and resample donors)")] = 0,
    out: CircuitsOutOpt = None,
    figure_format: CircuitsFiguresOpt = "png",
    as_json: CircuitsJsonOpt = False,
    ray: Annotated[
        str | None, typer.Option(help="Evaluate shards of prompts as Ray tasks: 'auto', 'local' or a cluster ADDRESS")
    ] = None,
) -> None:
    """Ablate the claimed units together on a prompt set: effect size with a bootstrap CI."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model_forensics.circuits import evaluate_claim, read_prompts
    from model_forensics.circuits.subject import incident_prompt_set

    records: list[Any] = read_prompts(prompts) if prompts is not None else []
    net, tok = _circuits_start(model, bundle, None, False, out, figure_format)
    if prompts is None:  # a bundle's incident prompt and variants, scored on its recorded output
        records, recorded = incident_prompt_set(net)
        target = target if target is not None else str(recorded) if recorded is not None else None
    columns = (TextColumn("prompts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("prompts", total=len(records))
        result = evaluate_claim(
            net,
            tok,
            records,
            units=unit,
            kind=kind,
            measure=measure,
            target=_circuits_target(target),
            n_boot=n_boot,
            seed=seed,
            progress=lambda done, total: bar.update(task, completed=done),
            ray=ray,
        )
    written = _circuits_output(out, "claim", result, figure_format, as_json)
    if written is None:
        return
    low, high = result.ci
    console.print(
        f"{_safe(', '.join(result.units))} ({_safe(kind)} ablation) on {len(result.prompts)} prompts: "
        f"mean drop in {_safe(measure)} {result.mean_effect:+.4f} "
        f"[{int(result.confidence * 100)}% CI {low:+.4f} … {high:+.4f}], "
        f"output changed on {result.fraction_changed:.0%}",
        soft_wrap=True,
        highlight=False,
    )
    _circuits_done(written)


CircuitsPromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help='Prompt set: .jsonl ({"prompt": …, "target": …}) or .txt, one per line '
        "(a bundle: optional, default its incident prompt and variants, explained on the recorded output)",
    ),
]
CircuitsCorruptedOpt = Annotated[
    Path | None,
    typer.Option("--corrupted", help="Corrupted twin of each prompt, same token length (default: mean ablation)"),
]
CircuitsEdgeMetricOpt = Annotated[str, typer.Option(help="logprob | logit | logit_diff of each prompt's target")]


def _circuits_edges(
    fn: Callable[..., Any],
    name: str,
    *,
    model: str | None,
    bundle: Path | None,
    prompts: Path | None,
    corrupted: Path | None,
    out: Path | None,
    figure_format: str,
    as_json: bool,
    **options: Any,
) -> tuple[Any, list[Path] | None]:
    """What ``circuits graph`` and ``circuits discover`` share: read the prompt files (before
    loading anything), load the model or open the bundle, take a bundle's own incident
    prompt and variants (targets: its recorded output) when no --prompts is given, run
    ``fn`` (dependency_graph or discover) with a progress bar, and write / print the result
    (:func:`_circuits_output`)."""
    from model_forensics.circuits.graph import prompt_pairs
    from model_forensics.circuits.subject import incident_prompt_set

    if prompts is None and bundle is None:
        raise ForensicsError("pass --prompts (a prompt file), or --bundle to use the incident's prompt and variants")
    texts, twins, targets = prompt_pairs(prompts, corrupted) if prompts is not None else ([], None, None)
    if prompts is None and corrupted is not None:
        twins = prompt_pairs(corrupted)[0]
    net, tok = _circuits_start(model, bundle, None, False, out, figure_format)
    if prompts is None:
        texts, recorded = incident_prompt_set(net)
        targets = [recorded] * len(texts) if recorded is not None else None
    with _progress_callback() as progress:
        result = fn(net, tok, texts, corrupted=twins, targets=targets, progress=progress, **options)
    return result, _circuits_output(out, name, result, figure_format, as_json)


@circuits_app.command("graph")
def circuits_graph(
    prompts: CircuitsPromptsOpt = None,
    model: CircuitsModelOpt = None,
    bundle: CircuitsBundleOpt = None,
    corrupted: CircuitsCorruptedOpt = None,
    metric: CircuitsEdgeMetricOpt = "logprob",
    mlps: Annotated[bool, typer.Option("--mlps/--no-mlps", help="MLPs as nodes (or folded into the stream)")] = True,
    confirm: Annotated[int, typer.Option(min=0, help="Strongest edges confirmed by path patching")] = 10,
    top: Annotated[int, typer.Option(min=1, help="Edges shown in the table")] = 15,
    out: CircuitsOutOpt = None,
    figure_format: CircuitsFiguresOpt = "png",
    as_json: CircuitsJsonOpt = False,
) -> None:
    """Score every edge between heads, MLPs, input and logits (EAP), path-patch the top ones."""
    from model_forensics.circuits.graph import dependency_graph

    result, written = _circuits_edges(
        dependency_graph,
        "graph",
        model=model,
        bundle=bundle,
        prompts=prompts,
        corrupted=corrupted,
        out=out,
        figure_format=figure_format,
        as_json=as_json,
        metric=metric,
        mlps=mlps,
        confirm=confirm,
    )
    if written is None:
        return
    if out is not None:
        written.append(result.write_graphml(out / "graph.graphml"))
    table = Table(
        title=f"dependency graph: {len(result.edges)} edges, {result.n_prompts} prompts, {result.ablation} ablation, "
        f"{_safe(result.metric)} {result.clean_metric:+.3f} clean / {result.corrupted_metric:+.3f} corrupted",
        title_justify="left",
    )
    for column in ("edge", "EAP score", "path patched"):
        table.add_column(column, justify="left" if column == "edge" else "right")
    for e in result.top(top):
        patched = f"{e.patched:+.4f}" if e.patched is not None else ""
        table.add_row(_safe(f"{e.source} → {e.target}"), f"{e.score:+.4f}", patched)
    console.print(table)
    _circuits_done(written)


@circuits_app.command("discover")
def circuits_discover(
    prompts: CircuitsPromptsOpt = None,
    model: CircuitsModelOpt = None,
    bundle: CircuitsBundleOpt = None,
    corrupted: CircuitsCorruptedOpt = None,
    held_out: Annotated[Path | None, typer.Option("--held-out", help="Prompts never used for discovery")] = None,
    held_out_corrupted: Annotated[
        Path | None, typer.Option("--held-out-corrupted", help="Corrupted twins of the held-out prompts")
    ] = None,
    metric: CircuitsEdgeMetricOpt = "logprob",
    target_faithfulness: Annotated[float, typer.Option("--target-faithfulness", help="Fraction to recover")] = 0.9,
    ig_steps: Annotated[int, typer.Option("--ig-steps", min=0, help="EAP-IG points (0: plain EAP)")] = 5,
    mlps: Annotated[bool, typer.Option("--mlps/--no-mlps", help="MLPs as nodes (or folded into the stream)")] = True,
    out: CircuitsOutOpt = None,
    figure_format: CircuitsFiguresOpt = "png",
    as_json: CircuitsJsonOpt = False,
) -> None:
    """Find the smallest circuit reaching the faithfulness target (EAP-IG, exact pruning)."""
    from model_forensics.circuits.discover import discover
    from model_forensics.circuits.graph import prompt_pairs

    held, held_twins = (None, None)
    if held_out is not None:
        held, held_twins, _ = prompt_pairs(held_out, held_out_corrupted)
    result, written = _circuits_edges(
        discover,
        "circuit",
        model=model,
        bundle=bundle,
        prompts=prompts,
        corrupted=corrupted,
        out=out,
        figure_format=figure_format,
        as_json=as_json,
        metric=metric,
        mlps=mlps,
        ig_steps=ig_steps,
        target_faithfulness=target_faithfulness,
        held_out=held,
        held_out_corrupted=held_twins,
    )
    if written is None:
        return
    held_line = ""
    if result.held_out is not None:
        held_line = f"; held out: faithfulness {result.held_out.faithfulness:.3f}, completeness {result.held_out.completeness:.3f}"
    console.print(
        f"circuit: {len(result.edges)} of {result.total_edges} edges, {len(result.nodes)} nodes; faithfulness "
        f"{result.faithfulness:.3f}, completeness {result.completeness:.3f}, CPR {result.cpr:.3f}, CMD {result.cmd:.3f}"
        f"{held_line} ({result.forward_passes} passes, {result.seconds:.1f} s)",
        soft_wrap=True,
        highlight=False,
    )
    table = Table(title="circuit edges (EAP-IG)", title_justify="left")
    table.add_column("edge")
    table.add_column("score", justify="right")
    for e in result.edges:
        table.add_row(_safe(f"{e.source} → {e.target}"), f"{e.score:+.4f}")
    console.print(table)
    _circuits_done(written)


# -- fix export -----------------------------------------------------------------------------------
@fix_app.command("export")
def fix_export(
    analysis: Annotated[Path, typer.Argument(help="Analysis JSON written by `analyze --out` (or a fix-set JSON)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory for the exported fix")],
    bundle: Annotated[
        Path | None, typer.Option(help="The incident bundle (default: the one the analysis names)")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to load instead of the bundle's")] = None,
    baseline: Annotated[
        list[Path] | None,
        typer.Option(
            "--baseline",
            "-b",
            help="The baseline bundles analyze was given (default: those the analysis names); mean ablations are "
            "taken over them and the search part of the analysis' held-out split, as analyze fitted them",
        ),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Also write the whole edited model (save_pretrained)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export report as JSON")] = False,
) -> None:
    """Write the fix as edited weights where it folds exactly, else as apply_fix.py; plus a model card."""
    from model_forensics.rca.fitted import fitted_on
    from model_forensics.replay.export import export_fix, read_analysis

    interventions, data, named = read_analysis(analysis)
    path = bundle or named
    if path is None:
        raise ForensicsError(f"'{analysis}' names no bundle; pass --bundle DIR")
    _check_exists(path, "bundle", "pass the incident bundle with --bundle")
    session = _open_session(path, model, False)
    with err.status("exporting and checking the fix against replay…"), fitted_on(session, data, baseline):
        result = export_fix(session, interventions, out, analysis=data, full_model=full)
    if as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    how = "folded into the weights" if result.folded else "as a hook module (apply_fix.py)"
    console.print(f"exported {len(interventions)} intervention(s) {how} to {_safe(str(out))}")
    for fold in result.folds:
        if not fold.folds:
            console.print(f"  {_safe(fold.site)}: not folded ({_safe(fold.reason or '')})", soft_wrap=True)
    worst = result.max_abs_diff_hooks if result.max_abs_diff_weights is None else result.max_abs_diff_weights
    console.print(f"checked on {result.checked_inputs} prompt(s): largest logit difference to replay {worst:.2g}")
    console.print("files: " + ", ".join(result.files))


if __name__ == "__main__":
    main()
