"""Batched sweeps: many intervention sets in few forward passes.

``session.sweep(sets)`` packs the N sets into the batch dimension (row i of the batch runs
set i), micro-batched so a batch fits ``memory_budget_mb`` and ``max_batch_size``. For
forward incidents on decoder models it also shares work between runs: a run whose earliest
intervention is at block l computes exactly what the clean run computes in blocks < l, so
the clean run's block inputs are captured once and each batch runs as a ladder — it starts
at the smallest l of its rows, and rows join the batch at their own l, initialised with
the clean residual stream there. Scores are computed only at the last position, the one
the predicate reads.

Equality with serial runs: every row sees the same operations as a run of its own. On CPU
the results are bit-identical whenever the matrix multiplications have enough rows to take
the same kernel path (the prompt has ≥ 12 tokens here); the last-position scores are
computed on at least ``GEMM_ROWS`` rows for the same reason. Generation sweeps decode
greedily in a batch; their decoding steps multiply few rows, so they match serial runs to
float tolerance rather than bit for bit.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from model_forensics.core.records import fields_json
from model_forensics.models.hooks import hooks
from model_forensics.models.inputs import ModelInputs
from model_forensics.replay.interventions import Clock, Intervention, Prepared, first_block, intervening
from model_forensics.replay.results import RunResult

if TYPE_CHECKING:
    from model_forensics.replay.encoding import InputLike
    from model_forensics.replay.session import Session

# Matrix products with fewer rows than this may take a different CPU kernel (and round
# differently) than the same rows inside a larger product; pad the last-position logits
# product to at least this many rows so single runs and batches agree exactly.
GEMM_ROWS = 64

Set = Sequence[Intervention | str | dict[str, Any]]  # one intervention set, as Session.sweep takes it


@dataclass
class SweepResult(Sequence["RunResult"]):
    """The runs of a sweep, in the order of the sets given, plus what they cost.

    Attributes:
        results: one :class:`RunResult` per intervention set.
        forward_passes: forward passes the sweep used (a prefix-shared partial pass counts
            as one; the one-off capture of the clean prefix is included).
        batches: how many batches the sets were packed into.
        shared_prefix: whether the clean computation of early blocks was shared.
        seconds: wall time (:func:`sweep_each`: a prompt's share of the batches it ran in).
    """

    results: list[RunResult]
    forward_passes: int
    batches: int
    shared_prefix: bool
    seconds: float

    def __getitem__(self, index: Any) -> Any:
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.results)

    @property
    def flip_rate(self) -> float:
        """Fraction of runs whose failure flipped."""
        return sum(bool(r.flipped) for r in self.results) / max(1, len(self.results))

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, results=[r.to_json() for r in self.results])


def run_sweep(
    session: Session,
    sets: Sequence[Set],
    *,
    inputs: InputLike = None,
    share_prefix: bool = True,
    prefixes: PrefixCache | None = None,
    verdicts_only: bool = False,
) -> SweepResult:
    """Run every intervention set of ``sets``; results equal :meth:`Session.run` on each.

    Args:
        session: the replay session.
        sets: N intervention sets (each a list, possibly empty for a clean run).
        inputs: run on other inputs than the incident's (a prompt, ids, an input dict).
        share_prefix: reuse the clean computation of the blocks before each run's earliest
            intervention (forward incidents on decoder LMs).
        prefixes: the clean prefixes earlier sweeps of the session captured (None: a cache
            for this sweep alone).
        verdicts_only: generations stop once every row's verdict is settled
            (:meth:`Session.sweep`).
    """
    start = time.perf_counter()
    before = session.forward_passes
    batch = session.encode(inputs)
    rows = session.prepare_sets(sets, batch)
    per_batch = rows_per_batch(session, batch)
    logits: list[torch.Tensor | None] = [None] * len(rows)  # per row: (S, V)
    sequences: list[torch.Tensor | None] = [None] * len(rows)
    passes = [0] * len(rows)
    full = list(range(len(rows)))
    batches = 0
    shared = False
    starts, worth = _entry_blocks(rows, session.adapter.n_layers)
    if share_prefix and session.mode == "forward" and worth:
        prefix = _prefix_for(session, PrefixCache() if prefixes is None else prefixes, batch)
        if prefix is not None:
            ladder = sorted((i for i in full if starts[i] is not None), key=lambda i: starts[i])  # type: ignore[arg-type,return-value]
            full = [i for i in full if starts[i] is None]
            shared = True
            for chunk in _chunks(ladder, rows_per_batch(session, batch, last_position=True)):
                out = prefix.tail([rows[i] for i in chunk], [int(starts[i]) for i in chunk])  # type: ignore[arg-type]
                for i, row in zip(chunk, out, strict=True):
                    logits[i], passes[i] = row.unsqueeze(0), 1
                batches += 1
    for chunk in _chunks(full, per_batch):
        used = session.forward_passes
        step_logits, seqs = session.execute(batch, [rows[i] for i in chunk], verdicts_only, share_prefix)
        used = session.forward_passes - used
        for j, i in enumerate(chunk):
            logits[i], passes[i] = step_logits[j], used
            sequences[i] = None if seqs is None else seqs[j]
        batches += 1
    assert all(t is not None for t in logits)
    results = session.results(batch, rows, logits, sequences, passes)  # type: ignore[arg-type]
    return SweepResult(results, session.forward_passes - before, batches, shared, time.perf_counter() - start)


def sweep_each(
    session: Session,
    prompts: Sequence[InputLike],
    sets: Sequence[Set] | Sequence[Sequence[Set]],
    *,
    verdicts_only: bool = False,
    per_prompt: bool = False,
) -> Iterator[tuple[int, SweepResult]]:
    """``session.sweep(sets, inputs=prompt)`` for every prompt of ``prompts``: yields
    (index, result), every index once, generation sweeps batched together. With
    ``per_prompt``, ``sets[i]`` is prompt i's own list of sets (as many lists as prompts).

    The rows of every prompt's generation sweep run in shared generations, one row per
    (prompt, set), micro-batched to the memory budget with prompts of similar length
    together, because a decoding step of few rows costs nearly what one of many does
    (SmolLM2, one thread: 80 ms for one row, 198 ms for sixteen). The prompt pass still runs
    the blocks before each row's first change once per prompt (:func:`shared_prompt_pass`).
    Prompts of different lengths share a batch left-padded (:func:`mixed_lengths` says where
    a model allows it): each row's interventions and gates see its own positions only, so a
    row runs what its own prompt's sweep runs, to float tolerance (the products have other
    shapes). Elsewhere prompts of one length share batches, unpadded. Forward sweeps, and
    prompts that are not one row of token ids, run one sweep per prompt.
    """
    sets_of: list[list[Set]] = (
        [list(s) for s in cast("Sequence[Sequence[Set]]", sets)]
        if per_prompt
        else [list(cast("Sequence[Set]", sets))] * len(prompts)
    )
    if len(sets_of) != len(prompts):
        raise ValueError(
            f"per_prompt sweeps need one list of sets per prompt: {len(sets_of)} lists, {len(prompts)} prompts"
        )
    batches = [session.encode(p) for p in prompts]
    mixed = mixed_lengths(session)
    groups: dict[int, list[int]] = {}
    for i, batch in enumerate(batches):
        together = (
            session.mode == "generate"
            and bool(sets_of[i])
            and batch.one_row
            and "input_ids" in batch
            and all(v.shape[1:] == batch["input_ids"].shape[1:] for v in batch.values())
        )
        padded = mixed and set(batch) <= {"input_ids", "attention_mask"} and not _on_patterns(session, sets_of[i])
        groups.setdefault((0 if padded else batch.length) if together else -1 - i, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            yield from _sweep_together(
                session, [batches[i] for i in members], members, [sets_of[i] for i in members], verdicts_only
            )
            continue
        (i,) = members
        if not sets_of[i]:
            yield i, SweepResult([], 0, 0, False, 0.0)
            continue
        yield (
            i,
            run_sweep(session, sets_of[i], inputs=batches[i], prefixes=session.prefixes, verdicts_only=verdicts_only),
        )


def _sweep_together(
    session: Session,
    batches: list[ModelInputs],
    indices: list[int],
    sets_of: list[list[Set]],
    verdicts_only: bool,
) -> Iterator[tuple[int, SweepResult]]:
    """Sweeps of several prompts in shared batches; row (prompt p, set j) runs set j of
    prompt p's sets on p. Prompts of one length stack as they are; a batch of several
    lengths is left-padded (the caller groups only prompts that may be). Each prompt's
    result is yielded once its last batch has run (shorter prompts first)."""
    prepared = [
        session.prepare_sets(s, b) for s, b in zip(sets_of, batches, strict=True)
    ]  # each row keeps its own gate state
    lengths = [b.length for b in batches]
    units = sorted(((p, j) for p, s in enumerate(sets_of) for j in range(len(s))), key=lambda u: lengths[u[0]])
    longest = max(range(len(batches)), key=lengths.__getitem__)
    logits: dict[tuple[int, int], torch.Tensor] = {}
    sequences: dict[tuple[int, int], torch.Tensor | None] = {}
    passes: dict[tuple[int, int], int] = {}
    left = [len(s) for s in sets_of]  # per prompt, its rows still to run
    took = [0] * len(batches)  # per prompt, the batches its rows ran in
    calls = [0] * len(batches)  # and their forward passes
    spent = [0.0] * len(batches)  # and its share of their time (split evenly among their prompts)
    for chunk in _chunks(list(range(len(units))), rows_per_batch(session, batches[longest])):
        start = time.perf_counter()
        rows = [units[u] for u in chunk]
        owners = [p for p, _ in rows]
        pads: list[int] = []
        if len(set(owners)) == 1:  # one prompt's rows: its own sweep's batch
            stacked = batches[owners[0]]
        elif len({lengths[p] for p in owners}) == 1:
            stacked = ModelInputs({k: torch.cat([batches[p][k] for p in owners]) for k in batches[owners[0]]})
        else:
            stacked, pads = ModelInputs.left_padded([batches[p] for p in owners], pad_id(session))
        used = session.forward_passes
        step_logits, seqs = session.execute(
            stacked, [prepared[p][j] for p, j in rows], verdicts_only, pads=pads, prompts=owners
        )
        used = session.forward_passes - used
        for r, unit in enumerate(rows):
            logits[unit], passes[unit] = step_logits[r], used
            sequences[unit] = None if seqs is None else seqs[r, pads[r] :] if pads else seqs[r]
            left[unit[0]] -= 1
        held = dict.fromkeys(owners)
        for p in held:
            took[p] += 1
            calls[p] += used
            spent[p] += (time.perf_counter() - start) / len(held)
        for p in held:
            if left[p]:
                continue
            keys = [(p, j) for j in range(len(sets_of[p]))]
            results = session.results(
                batches[p],
                prepared[p],
                [logits[k] for k in keys],
                [sequences[k] for k in keys],
                [passes[k] for k in keys],
            )
            yield indices[p], SweepResult(results, calls[p], took[p], False, spent[p])


def mixed_lengths(session: Session) -> bool:
    """Whether prompts of different lengths may share one left-padded generation: a decoder
    (not encoder-decoder) whose ``forward`` takes an attention mask and position ids (which
    ``generate`` derives from the mask, so each row keeps its own positions), generating a
    fixed number of new tokens (``max_new_tokens``; a ``max_length`` would count the pads)."""
    options = session.generation
    if "max_new_tokens" not in options or {"max_length", "min_length"} & set(options):
        return False
    config = getattr(session.model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        taken = inspect.signature(session.model.forward).parameters
    except (TypeError, ValueError):
        return False
    return {"attention_mask", "position_ids"} <= set(taken)


def pad_id(session: Session) -> int:
    """The token id that fills a left-padded prompt (masked out, so any id in the
    vocabulary serves): the generation's pad id, else its EOS id, else 0."""
    config = getattr(session.model, "generation_config", None)
    for value in (
        session.generation.get("pad_token_id"),
        getattr(config, "pad_token_id", None),
        session.generation.get("eos_token_id"),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _on_patterns(session: Session, sets: Sequence[Set]) -> bool:
    """Whether any set edits an attention pattern (its token axes are not the batch's second)."""
    return any(t.point.pattern for s in sets for t in session.resolve(s))


def forced_picks(
    session: Session,
    rows: Sequence[Sequence[Prepared]],
    forced: ModelInputs,
    steps: int,
    prompt_len: int,
    prefixes: PrefixCache,
    per_batch: int,
) -> list[torch.Tensor] | None:
    """The argmax at the last ``steps`` positions of the teacher-forced input ``forced``
    (one row: a prompt of ``prompt_len`` tokens and an answer), per row of ``rows``, in
    batches of ``per_batch`` rows: each row enters at the first block it changes, on the
    clean computation of the blocks before it (the clean prefix of ``forced``, captured once
    into ``prefixes``). None, for the caller to run whole models, where a row changes
    something outside the blocks (``embed``, ``logits``), where sharing would not save two
    rows' worth of blocks the first time ``forced`` is asked for (from the second time on, the
    capture is shared by every later call; once ``prefixes`` holds it, sharing is free), or
    where the model's blocks cannot be re-entered."""
    return forced_scores(session, rows, forced, steps, prompt_len, prefixes, per_batch, lambda s: s.argmax(-1))


def forced_scores(
    session: Session,
    rows: Sequence[Sequence[Prepared]],
    forced: ModelInputs,
    steps: int,
    prompt_len: int,
    prefixes: PrefixCache,
    per_batch: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """The scores (``steps``, V) at the last ``steps`` positions of ``forced`` per row of
    ``rows`` (``reduce`` of them, taken chunk by chunk, when given), each row entering at the
    first block it changes; None where :func:`forced_picks` would be (the same rules)."""
    starts, worth = _entry_blocks(rows, session.adapter.n_layers)
    if any(s is None for s in starts):
        return None
    held = bool(prefixes.usable) and prefixes.get(forced.key) is not None
    again = prefixes.asked(forced.key)
    if not (worth or held or again):
        return None
    prefix = _prefix_for(session, prefixes, forced)
    if prefix is None:
        return None
    order = sorted(range(len(rows)), key=lambda i: starts[i])  # type: ignore[arg-type,return-value]
    picks: list[torch.Tensor | None] = [None] * len(rows)
    for chunk in _chunks(order, per_batch):
        scores = prefix.scores([rows[i] for i in chunk], [int(starts[i]) for i in chunk], steps, prompt_len)  # type: ignore[arg-type]
        for i, row in zip(chunk, scores if reduce is None else reduce(scores), strict=True):
            picks[i] = row
    return picks  # type: ignore[return-value]


def _entry_blocks(rows: Sequence[Sequence[Prepared]], n_layers: int) -> tuple[list[int | None], bool]:
    """Each row's first changed block (None: it changes something before or outside the
    blocks), and whether sharing the clean prefix pays: it costs one clean pass of one row,
    so take it when the rows skip at least two rows' worth of blocks."""
    starts = [first_block([p.target for p in r], n_layers) for r in rows]
    return starts, sum(s for s in starts if s is not None) / max(1, n_layers) >= 2


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def rows_per_batch(session: Session, batch: Mapping[str, torch.Tensor], *, last_position: bool = False) -> int:
    """How many runs fit one batch under ``memory_budget_mb`` and ``max_batch_size``.

    Estimate per row (elements of the model's dtype): T · (10·d_model + 3·d_mlp +
    2·n_heads·T) for hidden states, MLP activations and attention probabilities of one
    block, plus the output scores: 2 · T · vocab for a full forward pass (measured: counted
    once, the SmolLM2 sweep at 512 MB peaked 592 MB above the loaded model; counted twice,
    482 MB; benchmarks/results/sweep_memory.md), or one vocab row for a prefix-shared tail
    (``last_position``: only the last position is scored).
    """
    cfg = getattr(session.model, "config", None)
    a = session.adapter
    tokens = ModelInputs.of(batch).length or 1
    if session.mode == "generate":
        tokens += int(session.generation.get("max_new_tokens") or 0)
    d = a.d_model or int(getattr(cfg, "hidden_size", 1024) or 1024)
    d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
    heads = a.n_heads or 1
    vocab = int(getattr(cfg, "vocab_size", 1) or 1)
    first = next(iter(session.model.parameters()), None)
    size = first.element_size() if first is not None else 4
    scores = vocab if last_position else 2 * tokens * vocab
    per_row = size * (tokens * (10 * d + 3 * d_mlp + 2 * heads * tokens) + scores)
    budget = int(session.config.memory_budget_mb * 1024 * 1024)
    return max(1, min(session.config.max_batch_size, budget // max(1, per_row)))


# -- prefix sharing --------------------------------------------------------------------------
class _Prefix:
    """The clean run's inputs to every block, and the tail that runs blocks ≥ l on them.

    ``blocks`` and ``final`` are module paths: the decoder blocks in order and the final norm.
    """

    def __init__(self, session: Session, blocks: list[str], final: str, head: nn.Module):
        self.session = session
        self.paths = blocks
        self.blocks = [session.adapter.modules[path] for path in blocks]
        self.final_path = final
        self.final = session.adapter.modules[final]
        self.head = head
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.final_input: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None
        self.exact = False
        self.prompt_len = 0

    def capture(self, batch: ModelInputs) -> None:
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def block_hook(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                calls[index] = (args, kwargs)

            return hook

        def final_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.final_input = args[0]

        before = {path: block_hook(i) for i, path in enumerate(self.paths)}
        s = self.session
        with s.environment(), hooks(s.adapter, before={**before, self.final_path: final_hook}):
            # use_cache=False: the blocks are called again later and must not append to a cache.
            out = s.model(**batch, **{**s.kwargs, "use_cache": False})
        logits = getattr(out, "logits", None)
        if len(calls) != len(self.blocks) or self.final_input is None or logits is None or logits.dim() != 3:
            raise RuntimeError("the model's forward does not call its blocks once each in order")
        self.calls = [calls[i] for i in range(len(self.blocks))]
        self.reference = logits[:, -1]
        self.prompt_len = int(logits.shape[1])

    def _hidden(self, layer: int) -> torch.Tensor:
        args, kwargs = self.calls[layer]
        return args[0] if args else kwargs["hidden_states"]

    @property
    def nbytes(self) -> int:
        """Bytes of the block inputs held (the blocks' other arguments are shared or small)."""
        held = [self._hidden(layer) for layer in range(len(self.calls))]
        if self.final_input is not None:
            held.append(self.final_input)
        return sum(t.numel() * t.element_size() for t in held)

    def tail(self, rows: Sequence[Sequence[Prepared]], starts: Sequence[int]) -> torch.Tensor:
        """Last-position scores (N, V) of the rows, row i entering at block ``starts[i]``
        (sorted ascending; ``n_layers`` = only the final norm and head). Counts as one
        forward pass of N rows."""
        return self.scores(rows, starts, 1, self.prompt_len)[:, -1]

    def scores(
        self, rows: Sequence[Sequence[Prepared]], starts: Sequence[int], keep: int, prompt_len: int
    ) -> torch.Tensor:
        """Scores (N, keep, V) at the last ``keep`` positions of the rows, row i entering at
        block ``starts[i]`` (sorted ascending), interventions placed for a prompt of
        ``prompt_len`` tokens (a teacher-forced answer follows it). One forward pass of N rows."""
        s = self.session
        n_layers = len(self.blocks)
        clock = Clock(0, prompt_len)
        hidden: torch.Tensor | None = None
        j = 0

        def join(current: torch.Tensor | None, clean: torch.Tensor, layer: int) -> torch.Tensor | None:
            nonlocal j
            k = 0
            while j + k < len(starts) and starts[j + k] == layer:
                k += 1
            j += k
            if k == 0:
                return current
            new = clean.expand(k, *clean.shape[1:])
            return new.contiguous() if current is None else torch.cat([current, new])

        with s.environment(), intervening(s.adapter, rows, clock):
            s.counter.count(len(starts))  # the blocks are called directly: the root hook does not see this pass
            for layer in range(starts[0], n_layers):
                hidden = join(hidden, self._hidden(layer), layer)
                assert hidden is not None
                args, kwargs = self.calls[layer]
                if args:
                    out = self.blocks[layer](hidden, *args[1:], **kwargs)
                else:
                    out = self.blocks[layer](**{**kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out
            assert self.final_input is not None
            hidden = join(hidden, self.final_input, n_layers)
            assert hidden is not None
            last = self.final(hidden)[:, -keep:].reshape(-1, hidden.shape[-1])  # (N · keep, d_model)
            n = last.shape[0]
            if n < GEMM_ROWS:
                last = torch.cat([last, last.new_zeros(GEMM_ROWS - n, last.shape[1])])
            return self.head(last)[:n].reshape(len(starts), keep, -1)

    def check(self) -> bool:
        """Does the tail reproduce the clean run? Sets ``exact`` (bit-identical)."""
        assert self.reference is not None
        n_layers = len(self.blocks)
        got = self.tail([[], []], [0, n_layers])
        ref = self.reference.expand_as(got)
        self.exact = bool(torch.equal(got, ref))
        scale = float(ref.abs().max()) or 1.0
        return bool((got - ref).abs().max() <= 1e-5 * max(1.0, scale))


class PrefixCache:
    """The clean prefixes a session's sweeps share: one per input, the latest inputs whose
    prefixes fit in ``max_mb`` (first in, first out), and whether the model's blocks can be
    re-entered at all. It also remembers which inputs were asked for and not captured
    (:meth:`asked`): a screen repeated on an input pays for its capture even when one call
    alone would not. A SmolLM2 input of 80 tokens holds 31 block inputs of 80 × 576 floats
    (5.7 MB), so the default holds the 30 search variants of its injection incident.

    Attributes:
        usable: None until the first capture is checked against the clean run; then
            whether prefix sharing reproduces it (False also for models that are not
            decoder LMs, and after a capture failed).
    """

    def __init__(self, max_mb: float = 256.0):
        self.max_bytes = int(max_mb * 2**20)
        self.usable: bool | None = None
        self._prefixes: dict[tuple[int, ...], _Prefix] = {}
        self._bytes: dict[tuple[int, ...], int] = {}  # each held prefix's size, taken when it was added
        self._held = 0  # their sum
        self._asked: set[tuple[int, ...]] = set()

    def __len__(self) -> int:
        return len(self._prefixes)

    def get(self, key: tuple[int, ...]) -> _Prefix | None:
        return self._prefixes.get(key)

    def asked(self, key: tuple[int, ...]) -> bool:
        """Whether ``key``'s prefix was asked for before (True from the second time on)."""
        seen = key in self._asked
        self._asked.add(key)
        return seen

    def add(self, key: tuple[int, ...], prefix: _Prefix) -> None:
        self._drop(key)
        size = prefix.nbytes
        while self._prefixes and self._held + size > self.max_bytes:
            self._drop(next(iter(self._prefixes)))
        self._prefixes[key] = prefix
        self._bytes[key] = size
        self._held += size

    def _drop(self, key: tuple[int, ...]) -> None:
        self._prefixes.pop(key, None)
        self._held -= self._bytes.pop(key, 0)


def _prefix_for(session: Session, cache: PrefixCache, batch: ModelInputs) -> _Prefix | None:
    """The captured clean prefix for ``batch`` (from ``cache``, or captured into it), or None
    where blocks cannot be re-entered (not a decoder LM, or the tail does not reproduce the
    clean run; checked once per cache)."""
    key = ModelInputs.of(batch).key
    found = cache.get(key)
    if found is not None:
        return found
    if cache.usable is False:
        return None
    a = session.adapter
    points = [a.points.get(f"blocks.{i}.resid_pre") for i in range(a.n_layers)]
    final, head = a.points.get("final"), a.points.get("logits")
    if not (a.n_layers and all(points) and final and head and isinstance(a.modules[head.module], nn.Linear)):
        cache.usable = False
        return None
    prefix = _Prefix(session, [p.module for p in points if p is not None], final.module, a.modules[head.module])
    try:
        prefix.capture(batch)
        if cache.usable is None:
            cache.usable = prefix.check()
    except (RuntimeError, TypeError, KeyError, IndexError, ValueError):
        cache.usable = False
    if not cache.usable:
        return None
    cache.add(key, prefix)
    return prefix


# -- a generation's prompt pass, shared ------------------------------------------------------
# The decoder blocks of a generation's prompt pass run fewer rows than the batch: prompts
# shorter than this may take other kernels for few rows than for many.
SHARED_PROMPT_TOKENS = 12


def prompt_ladder(session: Session, rows: Sequence[Sequence[Prepared]], prompt_len: int) -> list[int] | None:
    """Each row's first changed block, when a batched generation's prompt pass can share the
    blocks before it (:func:`shared_prompt_pass`); None when it cannot: fewer than two rows,
    a row that changes something before or outside the blocks, a prompt shorter than
    ``SHARED_PROMPT_TOKENS``, an encoder-decoder, or blocks the adapter cannot name."""
    a = session.adapter
    starts, _ = _entry_blocks(rows, a.n_layers)
    config = getattr(session.model, "config", None)
    if (
        len(rows) < 2
        or not a.n_layers
        or any(s is None for s in starts)
        or not any(starts)
        or prompt_len < SHARED_PROMPT_TOKENS
        or len(rows) == prompt_len  # a (T, …) tensor would be taken for a batch of rows
        or getattr(config, "is_encoder_decoder", False)
        or not all(f"blocks.{i}.resid_pre" in a.points for i in range(a.n_layers))
    ):
        return None
    return [int(s) for s in starts]  # type: ignore[arg-type]


@contextmanager
def shared_prompt_pass(
    session: Session, starts: Sequence[int], prompts: Sequence[int] = (), clock: Clock | None = None
) -> Iterator[None]:
    """Inside the block, the first forward call of a batched generation (its prompt pass) runs
    each decoder block only on the rows that change it or an earlier block, plus one clean
    row of each prompt; the rows that join later are copies of their prompt's clean row, in
    the block outputs and in the key/value cache. Decoding steps run every row on its own
    tokens, as before.

    ``starts``: the first changed block of each batch row (:func:`prompt_ladder`; empty:
    nothing is shared). ``prompts``: which prompt each row holds, for a batch of several
    prompts (:func:`sweep_each`; empty: every row holds the same prompt). ``clock``: the
    interventions' clock, told which batch rows each shared block holds (``Clock.held``), so
    a row's edits inside the block find it. Nothing is
    shared where transformers' cache is not a plain ``DynamicCache``; that is found on the
    first block call, before anything is changed. A shared block's rows are bit for bit
    what the whole batch computes there (the kernels multiply at least
    ``SHARED_PROMPT_TOKENS`` rows either way); tests compare the sequences and every step's
    scores with an unshared run.
    """
    n = len(starts)
    a = session.adapter
    blocks = [a.points[f"blocks.{m}.resid_pre"].module for m in range(a.n_layers)]
    owners = list(prompts) if n and prompts else [0] * n
    plan = {blocks[m]: rows for m in range(a.n_layers) if (rows := _block_rows(starts, owners, m))}
    if not plan:
        yield
        return
    state = {"prompt": True, "on": False}
    first = a.modules[blocks[0]]

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not state["prompt"]:
            return None
        if module is first:
            cache = _cache_in(args, kwargs)
            state["on"] = cache is not None and _dynamic(cache) and _hidden_rows(args, kwargs) == n
        if not state["on"]:
            return None
        run, _, held = rows_of[id(module)]
        if clock is not None:
            clock.held = held
        return tuple(_rows_of(v, n, run) for v in args), {key: _rows_of(v, n, run) for key, v in kwargs.items()}

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not (state["prompt"] and state["on"]):
            return None
        run, source, _ = rows_of[id(module)]
        k = len(run)
        if clock is not None:
            clock.held = None
        for layer in _cache_in(args, kwargs).layers:
            if layer.is_initialized and layer.keys.shape[0] == k and layer.keys.shape[-2] > 0:
                layer.keys, layer.values = _rows_of(layer.keys, k, source), _rows_of(layer.values, k, source)
        return _rows_of(output, k, source)

    def ended(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        state["prompt"] = False

    rows_of = {id(a.modules[path]): rows for path, rows in plan.items()}
    with hooks(a, before=dict.fromkeys(plan, pre), after={**dict.fromkeys(plan, post), "": ended}):
        yield


def _block_rows(
    starts: Sequence[int], prompts: Sequence[int], m: int
) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]] | None:
    """Which batch rows block ``m`` of a shared prompt pass runs (ascending); for every batch
    row the index among those of the row its output is (itself, or its prompt's clean row:
    the first row of that prompt not changed by block ``m``); and where each run row sits
    (``Clock.held``). None where it runs them all."""
    source = list(range(len(starts)))
    clean: dict[int, int] = {}
    for i, (start, prompt) in enumerate(zip(starts, prompts, strict=True)):
        if start > m:
            source[i] = clean.setdefault(prompt, i)
    run = sorted(set(source))
    if len(run) == len(starts):
        return None
    at = {row: j for j, row in enumerate(run)}
    return torch.tensor(run), torch.tensor([at[row] for row in source]), at


def _cache_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from transformers.cache_utils import Cache

    return next((v for v in [*args, *kwargs.values()] if isinstance(v, Cache)), None)


def _dynamic(cache: Any) -> bool:
    """A transformers DynamicCache whose layers hold plain key/value tensors (expandable)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    kinds = (DynamicLayer, DynamicSlidingWindowLayer)
    return type(cache) is DynamicCache and all(type(layer) in kinds for layer in cache.layers)


def _hidden_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else -1


def _rows_of(value: Any, rows: int, index: torch.Tensor) -> Any:
    """A batch tensor (≥ 2 dims, ``rows`` rows) as its rows ``index`` (a cut, or a spread to
    more rows); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, tuple):
        return tuple(_rows_of(v, rows, index) for v in value)
    return value
