"""SIGKILL at random instants while a bundle is written.

After every kill the name holds nothing (a new bundle) or a complete bundle that opens
and verifies, for an overwrite exactly the old or the new one, and the next write leaves
no temporaries behind. Writers are ``os.fork()`` children of this already-initialised
process (a fresh Python with torch per kill would take seconds); each kill comes after a
delay drawn from a seeded RNG over the measured duration of one write.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from replay_models import BASELINES, PROMPT

from model_forensics import Bundle, BundleError, RecorderHooks
from model_forensics.core import bundle as bundle_mod
from model_forensics.core.bundle import BundleContents, clean_stale_temporaries, write_bundle
from model_forensics.recorder import hooks as hooks_mod
from model_forensics.recorder.session import encode_prompt

KILLS = 50  # per kind of write
SEED = 20240812


@dataclass
class Recorded:
    """Contents ready for write_bundle, and the digest of the bundle they make."""

    contents: BundleContents
    digest: str


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread before forking: a forked child must not need the parent's pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded(word_models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorded, Recorded]:
    """Two small recordings (old, new): six files, ~25 kB, one write takes ~10-20 ms."""
    root = tmp_path_factory.mktemp("kills-reference")
    old, new = (
        _record(word_models["llama"], prompt, root / name) for name, prompt in (("old", PROMPT), ("new", BASELINES[0]))
    )
    assert old.digest != new.digest
    return old, new


def _record(loaded: Any, prompt: str, out: Path) -> Recorded:
    """Record ``prompt`` once, keeping the BundleContents that create_bundle hands to write_bundle."""
    captured: list[BundleContents] = []
    real_write = hooks_mod.write_bundle

    def capture(path: Any, contents: BundleContents, **kwargs: Any) -> Path:
        captured.append(contents)
        return real_write(path, contents, **kwargs)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(hooks_mod, "write_bundle", capture)
        with RecorderHooks(granularity="layer", sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
            loaded.model(**encode_prompt(loaded, prompt))
            digest = Bundle.open(rec.create_bundle(out)).digest
    again = Bundle.open(write_bundle(out.with_name(out.name + "-again"), captured[0])).digest
    assert again == digest, "writing the same contents twice must give the same bundle"
    return Recorded(captured[0], digest)


# -- forked writers ----------------------------------------------------------------------------
def _fork_writer(target: Path, writes: list[BundleContents], overwrite: bool, loop: bool, exchange: bool) -> int:
    """Fork a child that writes ``writes`` in turn (forever with ``loop``) and return its pid
    once it is about to start. The child never returns into pytest."""
    ready, signal_ready = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready)
            if not exchange:
                bundle_mod._renameat2 = lambda: None  # as on an OS without renameat2
            os.write(signal_ready, b"1")
            n = 0
            while loop or n < len(writes):
                write_bundle(target, writes[n % len(writes)], overwrite=overwrite)
                n += 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(signal_ready)
    try:
        assert select.select([ready], [], [], 30)[0], "the forked writer did not start"
        os.read(ready, 1)
    finally:
        os.close(ready)
    return pid


def _temporaries(target: Path, pid: int | None = None) -> list[Path]:
    prefix = f".{target.name}." + (f"{pid}." if pid is not None else "")
    return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]


def _kill(pid: int, delay: float) -> bool:
    """SIGKILL ``pid`` after ``delay`` seconds; True if it was still running then."""
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)  # reaped: a zombie would still look alive to the cleaner
    return os.WIFSIGNALED(status)


def _write_seconds(recorded: Recorded, where: Path) -> float:
    """Median duration of one write, measured in a forked child as the kills will see it."""
    pid = _fork_writer(where / "probe", [recorded.contents] * 5, overwrite=True, loop=False, exchange=True)
    start = time.perf_counter()
    os.waitpid(pid, 0)
    total = time.perf_counter() - start
    shutil.rmtree(where / "probe")
    return max(total / 5, 0.002)


def _assert_complete(target: Path, digests: set[str]) -> str:
    """The bundle at ``target`` opens, verifies and is one of ``digests``; returns its digest."""
    bundle = Bundle.open(target)
    assert bundle.verify_contents() == []
    assert bundle.digest in digests, "the name holds a bundle that is neither the old nor the new one"
    return bundle.digest


def _assert_next_write_is_clean(target: Path, recorded: Recorded) -> None:
    write_bundle(target, recorded.contents, overwrite=target.exists())
    assert Bundle.open(target).digest == recorded.digest
    assert _temporaries(target) == [], "a successful write leaves no stale temporaries"


# -- the kills ---------------------------------------------------------------------------------
def test_kills_while_creating_a_new_bundle(recorded, tmp_path: Path) -> None:
    _, new = recorded
    rng = random.Random(SEED)
    seconds = _write_seconds(new, tmp_path)
    target = tmp_path / "incident"
    stats: Counter[str] = Counter()

    def covered() -> bool:  # the kills reached every state the assertions below need
        return (
            stats["killed mid-write (temp dir present)"] >= KILLS // 5
            and stats["name holds nothing"] >= 1
            and stats["name holds the new bundle"] >= 1
        )

    # At least KILLS kills; more (up to 3×) when a loaded machine made the random delays miss
    # the states the coverage needs (each kill's outcome is checked all the same).
    for kill in range(3 * KILLS):
        if kill >= KILLS and covered():
            break
        pid = _fork_writer(target, [new.contents], overwrite=False, loop=False, exchange=True)
        if not _kill(pid, rng.uniform(0, 1.5 * seconds)):
            stats["finished before the kill"] += 1
        elif _temporaries(target, pid):
            stats["killed mid-write (temp dir present)"] += 1
        else:
            stats["killed before or after its temp dir existed"] += 1
        if target.exists() or target.is_symlink():
            _assert_complete(target, {new.digest})
            stats["name holds the new bundle"] += 1
        else:
            stats["name holds nothing"] += 1
        _assert_next_write_is_clean(target, new)
        shutil.rmtree(target)
    kills = stats["name holds the new bundle"] + stats["name holds nothing"]
    print(f"\n{kills} kills creating a bundle (one write ≈ {seconds * 1000:.1f} ms): {dict(stats)}")
    assert covered(), stats


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_kills_while_overwriting_a_bundle(recorded, tmp_path: Path, exchange: bool) -> None:
    old, new = recorded
    rng = random.Random(SEED + exchange)
    seconds = _write_seconds(new, tmp_path)
    target = tmp_path / "incident"
    write_bundle(target, old.contents)
    stats: Counter[str] = Counter({"name empty, old bundle recovered": 0})
    kills = KILLS if exchange else KILLS // 2
    for _ in range(kills):
        pid = _fork_writer(target, [new.contents, old.contents], overwrite=True, loop=True, exchange=exchange)
        assert _kill(pid, rng.uniform(0, 2.5 * seconds)), "a looping writer is always running"
        stats["killed mid-write (temp dir present)"] += bool(_temporaries(target, pid))
        if not (target.exists() or target.is_symlink()):
            # Killed between the two renames: the old bundle waits in the .old temp, and
            # the next write (or clean_stale_temporaries) puts it back first.
            assert not exchange, "with renameat2 the name is never empty"
            assert clean_stale_temporaries(target)
            stats["name empty, old bundle recovered"] += 1
        digest = _assert_complete(target, {old.digest, new.digest})
        stats["name holds the old bundle" if digest == old.digest else "name holds the new bundle"] += 1
        _assert_next_write_is_clean(target, old)
    print(f"\n{kills} kills overwriting a bundle ({'renameat2' if exchange else 'two renames'}): {dict(stats)}")
    assert stats["killed mid-write (temp dir present)"] >= kills // 4, stats
    assert stats["name holds the old bundle"] >= 1 and stats["name holds the new bundle"] >= 1, stats


def _kill_between_the_two_renames(target: Path, new: Recorded) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            bundle_mod._renameat2 = lambda: None
            real_replace, calls = os.replace, []

            def replace(src: Any, dst: Any) -> None:
                calls.append(dst)
                if len(calls) == 2:  # the old bundle is aside, the new one not yet in place
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)

            os.replace = replace  # type: ignore[assignment]
            write_bundle(target, new.contents, overwrite=True)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert not target.exists()
    assert sorted(p.suffix for p in _temporaries(target)) == [".old", ".tmp"]


def test_a_replace_killed_between_its_two_renames_gets_the_old_bundle_back(recorded, tmp_path: Path) -> None:
    old, new = recorded
    target = tmp_path / "incident"
    write_bundle(target, old.contents)
    _kill_between_the_two_renames(target, new)
    with pytest.raises(BundleError, match="already exists"):  # the next write finds the old bundle first
        write_bundle(target, new.contents)
    assert Bundle.open(target).digest == old.digest
    assert _temporaries(target) == []


def test_opening_a_bundle_killed_between_its_two_renames_recovers_it(recorded, tmp_path: Path) -> None:
    old, new = recorded
    target = tmp_path / "incident"
    write_bundle(target, old.contents)
    _kill_between_the_two_renames(target, new)
    assert Bundle.open(target).digest == old.digest
    assert [p.suffix for p in _temporaries(target)] == [".tmp"]  # the new half-write, removed by the next write
