"""Recording never hurts the host: a hook that raises leaves the model's output
bit-identical and the bundle partial, ``overwrite`` replaces only bundles, and a full disk
is one clear error that leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from replay_models import PROMPT
from safetensors import SafetensorError

from model_forensics import Bundle, BundleError, ForensicsError, RecorderHooks, SandboxReplayer
from model_forensics.core import bundle as bundle_mod
from model_forensics.core.bundle import check_writable_target
from model_forensics.models import adapters
from model_forensics.models import hooks as engine_hooks
from model_forensics.recorder.session import encode_prompt, record_prompt

GENERATE = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as the recordings these tests replay were made with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers -----------------------------------------------------------------------------------
def _unrecorded(loaded: Any, generate: bool) -> torch.Tensor:
    batch = encode_prompt(loaded, PROMPT)
    with torch.no_grad():
        return loaded.model.generate(**batch, **GENERATE) if generate else loaded.model(**batch).logits


def _recorded(loaded: Any, generate: bool, rec: RecorderHooks) -> tuple[torch.Tensor, list[str]]:
    """Run the model under ``rec``; returns its output and the warnings model-forensics gave."""
    batch = encode_prompt(loaded, PROMPT)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = rec.generate(batch, **GENERATE) if generate else loaded.model(**batch).logits
    return out, [str(w.message) for w in caught if "model_forensics" in w.filename]


def _fail_site(monkeypatch: pytest.MonkeyPatch, loaded: Any, site: str, how: str) -> None:
    """Make the recorder's hook for ``site`` raise RuntimeError('injected'), by ``how``."""
    if how == "read":  # the output hook's or the input pre-hook's read of the payload
        point = adapters.adapter_for(loaded.model).point(site)
        real_read = engine_hooks.read

        def read(p: adapters.HookPoint, payload: Any) -> Any:
            if p == point:
                raise RuntimeError("injected")
            return real_read(p, payload)

        monkeypatch.setattr(engine_hooks, "read", read)
    elif how == "keep":
        _fail_keep(monkeypatch, {site}, after=0)
    elif how == "recompute_pattern":  # SDPA models recompute the pattern from q and k
        layer = int(site.split(".")[1])
        real_recompute = adapters.LlamaAdapter.recompute_pattern

        def recompute(self: Any, module: Any, args: Any, kwargs: Any) -> torch.Tensor:
            if module.layer_idx == layer:
                raise RuntimeError("injected")
            return real_recompute(self, module, args, kwargs)

        monkeypatch.setattr(adapters.LlamaAdapter, "recompute_pattern", recompute)


def _fail_keep(
    monkeypatch: pytest.MonkeyPatch, sites: set[str], after: int, error: Callable[[], Exception] | None = None
) -> None:
    """``_keep`` raises for ``sites`` once it has kept ``after`` of their tensors."""
    real_keep = RecorderHooks._keep
    seen: dict[str, int] = {}

    def keep(self: RecorderHooks, site: str, tensor: torch.Tensor) -> None:
        if site in sites:
            seen[site] = seen.get(site, 0) + 1
            if seen[site] > after:
                raise (error or (lambda: RuntimeError("injected")))()
        real_keep(self, site, tensor)

    monkeypatch.setattr(RecorderHooks, "_keep", keep)


def _assert_replays(path: Path, loaded: Any) -> None:
    """The bundle opens, every file checks out, and a replay is bit-identical on its sites."""
    bundle = Bundle.open(path)
    assert bundle.verify_contents() == []
    report = SandboxReplayer().load_bundle(path, model=loaded).verify()
    assert report.bit_identical, report.summary()
    assert {c.site for c in report.sites} == set(bundle.sites)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# -- 1. a failing hook is caught -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("site", "how", "attention"),
    [
        ("blocks.0.mlp", "read", "eager"),  # an output hook
        ("blocks.1.resid_pre", "read", "eager"),  # an input-side pre-hook
        ("blocks.0.mlp.post", "keep", "eager"),  # an input-side site, failing while kept
        ("blocks.1.attn.pattern", "recompute_pattern", "sdpa"),  # the adapter's recomputation
    ],
)
def test_a_failing_site_hook_leaves_the_output_and_marks_the_bundle_partial(
    word_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str, how: str, attention: str
) -> None:
    from model_forensics.models.loading import load

    loaded = word_models["llama"]
    if attention != "eager":
        loaded = load(loaded.ref.reference, attn_implementation=attention)
    expected = _unrecorded(loaded, generate=False)
    rec = RecorderHooks(granularity="layer", sketch="full", sites=[site]).install_hooks(loaded.model, loaded.tokenizer)
    with rec, monkeypatch.context() as patch:
        _fail_site(patch, loaded, site, how)
        logits, said = _recorded(loaded, False, rec)
        path = rec.create_bundle(tmp_path / "b")
    assert torch.equal(logits, expected)
    assert len(said) == 1 and f"'{site}'" in said[0] and "partial" in said[0], said
    bundle = Bundle.open(path)
    assert bundle.partial == {site: "RuntimeError: injected"}
    assert site not in bundle.sites
    assert {"embed", "blocks.1.attn", "blocks.1.resid_post", "final"} <= set(bundle.sites)
    _assert_replays(path, loaded)


def test_a_site_failing_mid_generation_drops_what_it_had_kept(word_models, tmp_path: Path, monkeypatch) -> None:
    loaded = word_models["llama"]
    expected = _unrecorded(loaded, generate=True)
    with RecorderHooks(granularity="layer", sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
        _fail_keep(monkeypatch, {"blocks.1.mlp"}, after=2)  # fails at the third decoding step
        sequences, said = _recorded(loaded, True, rec)
        path = rec.create_bundle(tmp_path / "b")
    monkeypatch.undo()
    assert torch.equal(sequences, expected)
    assert len(said) == 1
    assert "blocks.1.mlp" not in rec.recorded()
    assert Bundle.open(path).partial == {"blocks.1.mlp": "RuntimeError: injected"}
    _assert_replays(path, loaded)


def test_several_failures_are_warned_about_once(word_models, tmp_path: Path, monkeypatch) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no message")

    loaded = word_models["gpt2"]
    expected = _unrecorded(loaded, generate=False)
    with RecorderHooks(granularity="layer", sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
        _fail_keep(monkeypatch, {"blocks.0.attn", "blocks.1.mlp", "final"}, after=0, error=Unprintable)
        logits, said = _recorded(loaded, False, rec)
        path = rec.create_bundle(tmp_path / "b")
    monkeypatch.undo()
    assert torch.equal(logits, expected)
    assert len(said) == 1 and "'blocks.0.attn'" in said[0]
    partial = Bundle.open(path).partial
    assert sorted(partial) == ["blocks.0.attn", "blocks.1.mlp", "final"]
    assert all(error.startswith("Unprintable: ") for error in partial.values())
    _assert_replays(path, loaded)


def test_warnings_made_errors_do_not_reach_the_model(word_models, tmp_path: Path, monkeypatch) -> None:
    loaded = word_models["llama"]
    expected = _unrecorded(loaded, generate=False)
    batch = encode_prompt(loaded, PROMPT)
    with RecorderHooks(granularity="layer", sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
        _fail_keep(monkeypatch, {"blocks.0.mlp"}, after=0)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")
            logits = loaded.model(**batch).logits
        path = rec.create_bundle(tmp_path / "b")
    assert torch.equal(logits, expected)
    assert Bundle.open(path).partial == {"blocks.0.mlp": "RuntimeError: injected"}


@pytest.mark.parametrize("hook", ["_take_inputs", "_take_logits"])
@pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
def test_a_failing_root_hook_leaves_the_output_and_writes_no_bundle(
    word_models, tmp_path: Path, monkeypatch, hook: str, generate: bool
) -> None:
    loaded = word_models["llama"]
    expected = _unrecorded(loaded, generate)
    real = getattr(RecorderHooks, hook)
    calls: list[int] = []

    def boom(*args: Any) -> None:  # fails on the first forward call only
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        real(*args)

    with RecorderHooks(granularity="layer", sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
        with monkeypatch.context() as patch:
            patch.setattr(RecorderHooks, hook, boom)
            out, said = _recorded(loaded, generate, rec)
            with pytest.raises(ForensicsError, match=r"root (input|output) hook failed.*RuntimeError: injected"):
                rec.create_bundle(tmp_path / "b")
        assert torch.equal(out, expected)
        assert len(said) == 1 and "create_bundle will refuse" in said[0]
        assert os.listdir(tmp_path) == []
        _recorded(loaded, generate, rec)  # the next run records again, from a clean slate
        path = rec.create_bundle(tmp_path / "b")
    assert Bundle.open(path).partial == {}
    _assert_replays(path, loaded)


def test_a_bundle_without_failures_says_partial_is_empty(pristine) -> None:
    for path in pristine.values():
        assert Bundle.open(path).manifest["partial"] == {}


# -- 2. overwrite replaces only bundles ------------------------------------------------------------
def _snapshot(path: Path) -> Any:
    """What is at ``path``, deep enough to tell any change."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    return (
        "dir",
        sorted((str(p.relative_to(path)), p.is_symlink() or p.is_dir() or p.read_bytes()) for p in path.rglob("*")),
    )


def _user_dir(tmp: Path) -> Path:
    (tmp / "work").mkdir()
    (tmp / "work" / "notes.txt").write_text("my notes")
    return tmp / "work"


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _plain_file(tmp: Path) -> Path:
    (tmp / "report.pdf").write_bytes(b"%PDF")
    return tmp / "report.pdf"


def _link_to_bundle(tmp: Path, bundle: Path) -> Path:
    (tmp / "link").symlink_to(bundle, target_is_directory=True)
    return tmp / "link"


def _dangling_link(tmp: Path) -> Path:
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    return tmp / "dangling"


def _bundle_plus_a_user_file(tmp: Path, bundle: Path) -> Path:
    copy = Path(shutil.copytree(bundle, tmp / "almost"))
    (copy / "notes.txt").write_text("mine")
    return copy


def _home(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export A=1")
    monkeypatch.setenv("HOME", str(home))
    return Path.home()


def _cwd(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp / "here").mkdir()
    (tmp / "here" / "data.csv").write_text("1,2")
    monkeypatch.chdir(tmp / "here")
    return Path(".")


TARGETS: dict[str, Callable[[Path, Path, pytest.MonkeyPatch], Path]] = {
    "user directory": lambda tmp, bundle, mp: _user_dir(tmp),
    "empty directory": lambda tmp, bundle, mp: _empty_dir(tmp),
    "plain file": lambda tmp, bundle, mp: _plain_file(tmp),
    "link to a bundle": lambda tmp, bundle, mp: _link_to_bundle(tmp, bundle),
    "dangling link": lambda tmp, bundle, mp: _dangling_link(tmp),
    "bundle plus a user file": lambda tmp, bundle, mp: _bundle_plus_a_user_file(tmp, bundle),
    "home directory": lambda tmp, bundle, mp: _home(tmp, mp),
    "current directory": lambda tmp, bundle, mp: _cwd(tmp, mp),
    "parent directory": lambda tmp, bundle, mp: _cwd(tmp, mp) / "..",
    "inside a bundle": lambda tmp, bundle, mp: bundle / "sub",
}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_overwrite_refuses_anything_but_a_bundle(word_models, fresh, tmp_path: Path, monkeypatch, kind: str) -> None:
    loaded = word_models["gpt2"]
    bundle = fresh("forward")
    target = TARGETS[kind](tmp_path, bundle, monkeypatch)
    before, bundle_before = _snapshot(target), _snapshot(bundle)
    forward_calls: list[int] = []
    handle = loaded.model.register_forward_pre_hook(lambda *a: forward_calls.append(1))
    try:
        with pytest.raises(
            BundleError, match=r"not a model-forensics bundle|cannot be a bundle path|inside the bundle"
        ):
            check_writable_target(target, overwrite=True)
        with pytest.raises(BundleError, match="only replaces bundles|cannot be a bundle path|inside the bundle"):
            record_prompt(loaded, PROMPT, target, overwrite=True)
        assert forward_calls == [], "the target is checked before the model runs"
        with RecorderHooks(granularity="layer").install_hooks(loaded.model, loaded.tokenizer) as rec:
            with torch.no_grad():
                loaded.model(**encode_prompt(loaded, PROMPT))
            with pytest.raises(BundleError):
                rec.create_bundle(target, overwrite=True)
    finally:
        handle.remove()
    assert _snapshot(target) == before
    assert _snapshot(bundle) == bundle_before
    assert Bundle.open(bundle).verify_contents() == []


def test_without_overwrite_an_existing_bundle_is_kept(word_models, fresh) -> None:
    bundle = fresh("forward")
    before = _snapshot(bundle)
    with pytest.raises(BundleError, match="already exists.*--overwrite"):
        record_prompt(word_models["gpt2"], PROMPT, bundle)
    assert _snapshot(bundle) == before


def test_overwrite_replaces_a_bundle_and_leaves_no_temporaries(word_models, fresh) -> None:
    bundle = fresh("forward")
    old = Bundle.open(bundle).digest
    record_prompt(word_models["gpt2"], PROMPT, bundle, overwrite=True)
    assert Bundle.open(bundle).digest != old
    assert Bundle.open(bundle).manifest["model"]["architecture"] == "gpt2"
    assert _siblings(bundle) == [bundle.name]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "create"])
def test_a_target_changed_during_the_write_is_left_alone(
    word_models, fresh, tmp_path: Path, monkeypatch, exchange: bool, overwrite: bool
) -> None:
    """Between the check and the rename someone puts their own directory at the name."""
    target = fresh("forward") if overwrite else tmp_path / "new"
    real_write_files = bundle_mod._write_files

    def write_files(tmp: Path, contents: Any) -> dict[str, Any]:
        manifest = real_write_files(tmp, contents)
        shutil.rmtree(target, ignore_errors=True)
        _user_dir(tmp_path).rename(target)
        return manifest

    monkeypatch.setattr(bundle_mod, "_write_files", write_files)
    if not exchange:
        monkeypatch.setattr(bundle_mod, "_renameat2", lambda: None)
    loaded = word_models["gpt2"]
    with pytest.raises(BundleError, match="stopped being a bundle|appeared at that path"):
        record_prompt(loaded, PROMPT, target, overwrite=overwrite)
    assert _snapshot(target) == ("dir", [("notes.txt", b"my notes")])
    assert _siblings(target) == [target.name]


# -- 3. stale temporaries --------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_temporaries_of_dead_writers_are_cleaned_on_the_next_write(word_models, fresh) -> None:
    bundle = fresh("forward")
    dead, alive = _dead_pid(), os.getpid()
    stale = [f".forward.{dead}.a1b2.tmp", f".forward.{dead}.c3d4.old"]
    kept = [f".forward.{alive}.e5f6.tmp", f".other.{dead}.g7h8.tmp", "notes.forward.txt"]
    for name in stale + kept:
        (bundle.parent / name).mkdir()
        (bundle.parent / name / "inputs.safetensors").write_bytes(b"half")
    (bundle.parent / f".forward.{dead}.zip9.tmp.x").write_text("not ours")
    record_prompt(word_models["gpt2"], PROMPT, bundle, overwrite=True)
    assert _siblings(bundle) == sorted(["forward", *kept, f".forward.{dead}.zip9.tmp.x"])
    assert Bundle.open(bundle).verify_contents() == []


# -- 4. a full disk --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["OSError", "SafetensorError"],
)
@pytest.mark.parametrize("overwrite", [False, True], ids=["create", "overwrite"])
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(
    word_models, fresh, tmp_path: Path, monkeypatch, error: Callable[[], Exception], overwrite: bool
) -> None:
    target = fresh("forward") if overwrite else tmp_path / "new"
    before = _snapshot(target) if overwrite else None
    calls: list[int] = []

    def save_file(tensors: Any, filename: str, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the first file is written, the disk fills on the second
            raise error()
        return real_save_file(tensors, filename, **kwargs)

    real_save_file = bundle_mod.save_file
    monkeypatch.setattr(bundle_mod, "save_file", save_file)
    with pytest.raises(BundleError, match=r"the disk is full; free some space.*nothing was written") as info:
        record_prompt(word_models["gpt2"], PROMPT, target, overwrite=overwrite)
    assert "\n" not in str(info.value)
    if overwrite:
        assert _snapshot(target) == before
        assert _siblings(target) == [target.name]
    else:
        assert os.listdir(tmp_path) == []


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    where = tmp_path / "small"
    where.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command here to make a small filesystem")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until only ``leave`` bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with (disk / "filler").open("wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


def test_a_real_full_disk_is_one_clear_error_and_leaves_nothing(word_models, small_disk: Path) -> None:
    loaded = word_models["llama"]
    old = record_prompt(loaded, PROMPT, small_disk / "b", recorder=RecorderHooks(granularity="layer"))
    before = _snapshot(old)
    _fill(small_disk, leave=12 * 1024)
    for target, overwrite in ((old, True), (small_disk / "new", False)):
        with pytest.raises(BundleError, match=r"the disk is full.*nothing was written"):
            record_prompt(loaded, PROMPT, target, recorder=RecorderHooks(granularity="all"), overwrite=overwrite)
    assert _snapshot(old) == before
    assert Bundle.open(old).verify_contents() == []
    assert sorted(p.name for p in small_disk.iterdir()) == ["b", "filler"]
