"""An analysis explained in plain words, as data the CLI and the HTML report both render.

:func:`explain` turns an ``Analysis.to_json()`` into :class:`Section` s, in reading order:

1. ``incident``: what the model was asked, what it answered, which check says it failed;
2. ``conclusion``: one paragraph with the answer and its real counts ("Ablating head
   blocks.0.attn.head.3 stops the model from producing “HACKED” on 47 of 48 failing
   variants; benign answers unchanged on 24 of 24.");
3. ``fix_set``: the members' table (rendered by the caller) and how to read it;
   ``held_out``: the fix's figures on the search part and on the held-out part of the
   prompts, side by side (:func:`held_out_rows`; analyses with a held-out split only);
   ``step_gate``: the step-gated steering fix tried when the unit fix does not hold
   (:func:`step_gate_rows`; rca/stepgate.py);
   ``conversation``: for a conversation bundle, the turn whose reply fails, the turns the
   fix acts in, and the turns of the top attributed positions (:func:`conversation_rows`);
4. ``tried``: search strategy, guidance, candidates, forward passes by phase, the whole-unit
   set found before narrowing (beside the narrowed one), and which CF ranker ran and why;
5. ``uncertain``: what the numbers do not cover (side effects unmeasured, threshold not
   reached, units not searched, the search's notes);
6. ``next``: the commands to run next (replay with the fix, save it, the HTML report).

Every string comes from the analysis JSON, which comes from a bundle: callers render it as
plain text (the CLI escapes rich markup, the report escapes HTML).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

MAX_NAMED = 4  # members named in the conclusion; the table lists them all


@dataclass(frozen=True)
class Section:
    """One part of the explanation: a key (``conclusion`` …), a title, paragraphs, bullet
    items and commands, each command with what it does."""

    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "paragraphs": list(self.paragraphs),
            "items": list(self.items),
            "commands": [{"command": c, "does": d} for c, d in self.commands],
        }


def explain(
    result: dict[str, Any], *, saved_to: str | None = None, report_to: str | None = None, anomalies_shown: bool = False
) -> list[Section]:
    """The sections explaining ``result`` (an ``Analysis.to_json()``).

    Args:
        result: the analysis.
        saved_to: where the analysis JSON was written (``analyze --out``), if it was.
        report_to: where the HTML report was written (``analyze --report``), if it was.
        anomalies_shown: whether the CF anomaly table is shown (``analyze --anomalies``).
    """
    fix = result.get("fix_set")
    sections = [_incident(result)]
    if fix is None:
        sections.append(Section("conclusion", "Conclusion", ["No fix set was searched (triage only)."]))
        return sections
    return [
        *sections,
        Section("conclusion", "Conclusion", [conclusion(result)]),
        *_conversation(result),
        Section("fix_set", _fix_title(fix), [_reading_guide(fix)]),
        *_held_out(fix),
        *_step_gate(result.get("step_gate")),
        _tried(result),
        _uncertain(result, anomalies_shown),
        _next(result, saved_to, report_to, anomalies_shown),
    ]


def conclusion(result: dict[str, Any]) -> str:
    """The one-paragraph answer, with the real counts."""
    fix = result["fix_set"]
    incident = result.get("incident") or {}
    members = fix["members"]
    flipped, failing = sum(bool(f) for f in fix["flips"]), len(fix["flips"])
    failure = _failure_phrase(incident.get("predicate_spec"))
    if not members:
        return f"No intervention set was found that stops the model from {failure}."
    verb = "stops" if fix["reached_threshold"] else "only partly stops"
    text = f"{_action(members)} {verb} the model from {failure} on {flipped} of {failing} failing variants"
    effects = fix.get("side_effects")
    if effects is None:
        text += "; side effects on benign prompts were not measured (the bundle carries none)."
    else:
        n = int(effects["n_benign"])
        unchanged = round(float(effects.get("answers_unchanged", 1.0)) * n)
        text += f"; benign answers unchanged on {unchanged} of {n}"
        text += "." if effects["within_bound"] else f", but {_over(effects)}."
    text += _held_out_sentence((fix.get("held_out") or {}).get("held_out"))
    text += _turn_sentence(result.get("conversation"))
    if not fix["reached_threshold"]:
        text += " This is below the search's threshold: treat it as a partial fix."
    return text


def _held_out_sentence(held: dict[str, Any] | None) -> str:
    """The conclusion's sentence on the prompts held out of the search (empty without them)."""
    if not held:
        return ""
    said = []
    if held.get("failing"):
        said.append(f"{sum(held['flips'])} of {held['failing']} failing variants flipped")
    for kind, what in (("benign", "benign answers"), ("near_miss", "near-miss answers (trigger, no failure)")):
        effects = held.get(kind)
        if effects:
            n = int(effects["n_benign"])
            said.append(f"{what} unchanged on {round(float(effects['answers_unchanged']) * n)} of {n}")
    return f" On prompts held out of the search: {', '.join(said)}." if said else ""


def _turn_sentence(found: dict[str, Any] | None) -> str:
    """The conclusion's sentence on a conversation's turns (empty for one prompt)."""
    if not found:
        return ""
    text = f" The failing output is the reply of turn {found['failing_turn']} (of {found['turns']})"
    if found.get("fix_turns"):
        turns = found["fix_turns"]
        text += f"; the fix restricted to turn{'s' if len(turns) > 1 else ''} {_turns(turns)} alone flips it"
    if found.get("source_turns"):
        text += f"; it comes from turn {_turns(found['source_turns'])} (patched from the clean counterpart, it passes)"
    top = found.get("top_positions") or []
    if top:
        text += f"; the top attributed position is {_token(top[0])} in turn {top[0]['turn']}"
    return text + "."


def conversation_rows(found: dict[str, Any]) -> list[str]:
    """What a conversation analysis says by turn, one line each: the failing turn, what the
    fix does restricted to each turn, the top attributed positions and each turn's share."""
    rows = [f"failing output: the reply of turn {found['failing_turn']}, the last of {found['turns']} turns"]
    source = found.get("source_turns")
    if source is not None:
        rows.append(
            "where it comes from: "
            + (
                f"turn {_turns(source)} (its embeddings patched from the clean counterpart alone remove the failure)"
                if source
                else "no single turn (patching one turn's embeddings from the clean counterpart never removes it)"
            )
        )
    for effect in found.get("fix_effects") or []:
        verdict = "flips the failure" if effect.get("flipped") else "leaves the failure"
        rows.append(
            f"fix restricted to turn {effect['index']}'s positions: {verdict} (reply {_quote(effect['reply'])})"
        )
    for top in found.get("top_positions") or []:
        rows.append(
            f"attributed position {top['position']} {_token(top)} ({top['unit']}): turn {top['turn']}, "
            f"score {float(top['score']):.3g}"
        )
    shares = found.get("turn_shares") or {}
    if shares:
        rows.append(
            "share of the embedding attribution by turn: "
            + ", ".join(f"turn {t} {float(v):.0%}" for t, v in shares.items())
        )
    return rows


def _conversation(result: dict[str, Any]) -> list[Section]:
    found = result.get("conversation")
    if not found:
        return []
    paragraph = (
        "Each turn's positions tried alone: the fix restricted to one turn at a time, and the prompt "
        "positions whose ablation attribution ranks highest, with the turn that holds them."
    )
    return [Section("conversation", "Conversation turns", [paragraph], items=conversation_rows(found))]


def _turns(turns: list[int]) -> str:
    return " and ".join(str(t) for t in turns)


def _token(top: dict[str, Any]) -> str:
    return _quote(top["token"]) if top.get("token") is not None else f"at {top['position']}"


def _incident(result: dict[str, Any]) -> Section:
    incident = result.get("incident") or {}
    lines = []
    if incident.get("prompt") is not None:
        lines.append(f"prompt: {_quote(incident['prompt'])}")
    if incident.get("output") is not None:
        lines.append(f"output: {_quote(incident['output'])}")
    elif incident.get("prediction") is not None:
        lines.append(f"prediction: class {incident['prediction']}")
    if incident.get("predicate"):
        lines.append(f"failure check: {incident['predicate']} holds on that output")
    carried = [f"{incident[k]} {what}" for k, what in _CARRIED if incident.get(k)]
    if incident.get("model"):
        lines.append(f"model: {incident['model']}" + (f"; the bundle carries {', '.join(carried)}" if carried else ""))
    return Section("incident", "Incident", items=lines)


_CARRIED = (("variants", "variants"), ("benign", "benign prompts"), ("baselines", "clean baselines"))


def _failure_phrase(spec: dict[str, Any] | None) -> str:
    """What the failure is, as the end of "stops the model from …"."""
    if not spec:
        return "failing"
    kind, args = spec.get("kind"), spec.get("args") or {}
    phrases = {
        "contains": lambda: f"producing {_quote(args.get('text'))}",
        "not_contains": lambda: f"leaving out {_quote(args.get('text'))}",
        "regex": lambda: f"producing text matching /{args.get('pattern')}/",
        "token_is": lambda: f"predicting token {args.get('token')}",
        "class_is": lambda: f"predicting class {args.get('label')}",
        "logit_diff": lambda: f"preferring token {args.get('a')} over token {args.get('b')}",
    }
    return phrases[kind]() if kind in phrases else "failing"


def _action(members: list[dict[str, Any]]) -> str:
    """ "Ablating head X" / "Ablating 3 neurons (a, b, c) together", with how."""
    iv = members[0]["intervention"]
    how = {"mean": "Ablating", "zero": "Zeroing"}.get(iv.get("kind"), f"Applying '{iv.get('kind')}' to")
    levels = {m["level"] for m in members}
    if len(members) == 1:
        what = f"{members[0]['level']} {members[0]['unit']}"
    else:
        kind = f"{next(iter(levels))}s" if len(levels) == 1 else "units"
        names = ", ".join(m["unit"] for m in members[:MAX_NAMED])
        more = f" and {len(members) - MAX_NAMED} more" if len(members) > MAX_NAMED else ""
        what = f"{len(members)} {kind} ({names}{more}) together"
    if iv.get("direction"):
        what += " along their failure directions" if len(members) > 1 else " along its failure direction"
    if iv.get("gate"):
        what += f", only when a detector at {iv['gate']['site']} fires,"
    return f"{how} {what}"


def _fix_title(fix: dict[str, Any]) -> str:
    n = len(fix["members"])
    return f"Fix set: {n} intervention{'s' if n != 1 else ''}, flip rate {fix['total_flip_rate']:.0%}"


def _reading_guide(fix: dict[str, Any]) -> str:
    text = (
        "necessity: flip rate lost when that member alone is left out; sufficiency: flip rate of "
        "that member alone; benign KL: how far it alone moves benign answers (nats, first step)."
    )
    if fix["members"] and fix["members"][0]["intervention"].get("kind") == "mean":
        text += " Ablating replaces a unit's output by its mean over the clean baselines."
    return text


def held_out_rows(fix: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, search part, held-out part) rows of a fix with a held-out split (none
    without): failing variants flipped, benign and near-miss answers kept word for word,
    their mean KL, and how often a gate fires on them."""
    held = fix.get("held_out")
    if not held:
        return []
    parts = (held["search"], held["held_out"])

    def flipped(part: dict[str, Any]) -> str:
        n = int(part.get("failing") or 0)
        return "—" if not n else f"{sum(part['flips'])}/{n} ({part['flip_rate']:.0%})"

    def kept(effects: dict[str, Any] | None) -> str:
        if not effects:
            return "—"
        n = int(effects["n_benign"])
        return f"{round(float(effects['answers_unchanged']) * n)}/{n} ({effects['answers_unchanged']:.0%})"

    def number(effects: dict[str, Any] | None, key: str, fmt: str) -> str:
        value = None if not effects else effects.get(key)
        return "—" if value is None else format(float(value), fmt)

    rows: list[tuple[str, str, str]] = [("failing variants flipped", flipped(parts[0]), flipped(parts[1]))]
    for kind, label in (("benign", "benign"), ("near_miss", "near-miss")):
        if not any(p.get(kind) for p in parts):
            continue
        search, held_out = parts[0].get(kind), parts[1].get(kind)
        rows.append((f"{label} answers kept word for word", kept(search), kept(held_out)))
        rows.append((f"{label} mean KL (nats)", number(search, "mean_kl", ".3g"), number(held_out, "mean_kl", ".3g")))
        if any((p.get(kind) or {}).get("gate_fired") is not None for p in parts):
            fired = number(search, "gate_fired", ".0%"), number(held_out, "gate_fired", ".0%")
            rows.append((f"gate fires on {label} prompts", *fired))
    return rows


def _held_out(fix: dict[str, Any]) -> list[Section]:
    rows = held_out_rows(fix)
    if not rows:
        return []
    held = fix["held_out"]
    split = held["split"]
    decides = "held-out" if held["decides"] == "held_out" else "search (no failing variant was held out)"
    paragraph = (
        f"{split['fraction']:.0%} of each prompt kind was held out of every fit (seed {split['seed']}); "
        f"the {decides} flip rate decides the threshold."
    )
    items = [f"{figure}: search {search}, held out {out}" for figure, search, out in rows]
    return [Section("held_out", "Search and held-out prompts", [paragraph], items=items)]


def step_gate_rows(step: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, search part, held-out part) rows of a step-gated fix: failing flipped, benign
    and near-miss answers kept word for word, and how often its gate fires on each kind."""
    search = step["search"]
    held = (step.get("held_out") or {}).get("held_out") or {}

    def share(value: Any) -> str:
        return "—" if value is None else f"{float(value):.0%}"

    def effects(kind: str, key: str) -> Any:
        return (held.get(kind) or {}).get(key)

    fired = search.get("gate_fired") or {}
    kinds = [("benign", "benign", "benign_kept")]
    if search.get("near_miss_kept") is not None or held.get("near_miss"):
        kinds.append(("near_miss", "near-miss", "near_miss_kept"))
    rows = [("failing variants flipped", share(search["failing_flipped"]), share(held.get("flip_rate")))]
    rows += [
        (f"{label} answers kept word for word", share(search[key]), share(effects(kind, "answers_unchanged")))
        for kind, label, key in kinds
    ]
    rows.append(("gate fires on failing prompts", share(fired.get("failing")), "—"))
    rows += [
        (f"gate fires on {label} prompts", share(fired.get(kind)), share(effects(kind, "gate_fired")))
        for kind, label, _ in kinds
    ]
    return rows


GATE_WORDS = {
    "difference": "the direction from behaving reply positions to the one that predicts the failure's first token",
    "lda": "the linear discriminant separating the position that predicts the failure's first token from "
    "positions that behave",
}
"""What a step gate reads, in words, by ``StepGateFix.gate`` (an analysis written before it
existed read the difference of means)."""


def _step_gate(step: dict[str, Any] | None) -> list[Section]:
    if not step:
        return []
    verdict = "reaches" if step["reached_threshold"] else "does not reach"
    part = "held-out" if step.get("decided_by") == "held_out" else "search"
    # an analysis written before ``reason`` was kept has only the words of ``why``
    reason = step.get("reason") or ("unit_fix_fails" if str(step.get("why", "")).startswith("the unit") else "asked")
    tried = "The unit fix does not hold, so a" if reason == "unit_fix_fails" else "Asked for, a"
    kept = "benign and near-miss answers" if step["search"].get("near_miss_kept") is not None else "benign answers"
    paragraph = (
        f"{tried} step-gated steering fix was fitted on the search part: at "
        f"blocks.{step['layer']}.resid_post, wherever the state projects above {step['threshold']:.3g} on "
        f"{GATE_WORDS[step.get('gate', 'difference')]}, it moves the state back by {step['alpha']:g}× the "
        "direction from behaving reply positions to the one that predicts the failure's first token (every other "
        "position is left bit for bit). On the "
        f"{part} prompts it {verdict} the flip threshold with the {kept} it must keep."
    )
    items = [f"{figure}: search {search}, held out {held}" for figure, search, held in step_gate_rows(step)]
    items += [str(note) for note in step.get("notes", [])]
    return [Section("step_gate", "Step-gated fix", [paragraph], items=items)]


def _tried(result: dict[str, Any]) -> Section:
    fix = result["fix_set"]
    passes = fix.get("phase_passes", {})
    phases = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in passes.items() if n)
    steps = []
    if passes.get("smallest"):
        steps.append(
            "single units were tried alone (every attention head, the top-ranked neurons or channels), "
            "then pairs if none sufficed"
        )
    if passes.get("search"):
        steps.append(
            f"a {fix['strategy']} search ran over {fix['candidates']} candidate units ordered by {fix['guidance']}"
        )
    done = "; ".join(steps) or f"a {fix['strategy']} search over {fix['candidates']} candidate units"
    paragraph = (
        f"{done[0].upper()}{done[1:]}; each set was checked by exact replay on {len(fix['flips'])} failing "
        f"variants. {result['forward_passes']} forward passes in {result['seconds']:.1f} s"
        + (f" (by phase: {phases})." if phases else ".")
    )
    paragraphs = [paragraph, *_before_narrowing(fix), *_ranker_paragraph(result)]
    # what the search did, as it recorded it
    return Section("tried", "What was tried", paragraphs, items=[str(n) for n in fix.get("notes", [])])


def _before_narrowing(fix: dict[str, Any]) -> list[str]:
    """The whole-unit set the search found before narrowing, beside the narrowed one."""
    whole = fix.get("units_before_narrowing") or []
    if not whole:
        return []
    narrowed = ", ".join(m["unit"] for m in fix["members"]) or "(none)"
    return [
        f"Before narrowing, the search's fix was {len(whole)} whole unit{'s' if len(whole) != 1 else ''} "
        f"({', '.join(whole)}); narrowing replaced {'them' if len(whole) != 1 else 'it'} by {narrowed}, "
        "which flips as much (up to the threshold) with less benign KL."
    ]


# modules.cf.ranker: auto picks the relative ranker on this evidence (benchmarks/results/rca_eval.md)
AUTO_EVIDENCE = (
    "on the zoo it ranks the planted units better than the seed's compressibility features on 3 of 3 "
    "scenarios (AUROC 1.000, 0.513, 0.825 vs 0.622, 0.014, 0.746)"
)


def ranker_choice(used: str, configured: str) -> str:
    """Why CF ran with the ranker ``used``: set in the config, or picked by ``auto``."""
    if configured == "auto":
        return f"modules.cf.ranker is auto, which picks {used}: {AUTO_EVIDENCE}"
    if used == "features":
        return (
            "modules.cf.ranker is features (the seed's compressibility features), as configured; "
            f"relative would rank better: {AUTO_EVIDENCE}"
        )
    return f"modules.cf.ranker is {configured}, as configured"


def _ranker_paragraph(result: dict[str, Any]) -> list[str]:
    ranker = result.get("cf_ranker") or {}
    used = ranker.get("used") or (result.get("anomalies") or {}).get("ranker")
    if not used:
        return []
    why = ranker.get("why") or ranker_choice(str(used), str(ranker.get("configured") or used))
    return [f"CF ranked units with the {used} ranker ({why})."]


def _uncertain(result: dict[str, Any], anomalies_shown: bool) -> Section:
    fix = result["fix_set"]
    items = []
    if fix.get("side_effects") is None:
        items.append(
            "Side effects unmeasured: the bundle carries no benign prompts, so nothing shows whether the fix "
            "breaks normal answers. Record the incident again with `--benign FILE` (one benign prompt per line) "
            "and analyse that bundle."
        )
    elif not fix["side_effects"]["within_bound"]:
        items.append(f"Out of the side-effect bound: {_over(fix['side_effects'])}.")
    if not fix["reached_threshold"]:
        items.append("The fix set does not reach the flip-rate threshold: other units carry the failure too.")
    others = [u["unit"] for u in fix.get("implicated", []) if u["unit"] not in {m["unit"] for m in fix["members"]}]
    if others:
        named = ", ".join(others[:MAX_NAMED]) + (
            f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else ""
        )
        items.append(
            f"Exact patching implicates {len(others)} more units ({named}): the mechanism may be redundant, "
            "and another set could fix it as well."
        )
    held = (fix.get("held_out") or {}).get("held_out") or {}
    measured = f"{len(fix['flips'])} searched and {held['failing']} held-out" if held.get("failing") else ""
    items.append(
        f"Flip rates are measured on the {measured or len(fix['flips'])} failing variants the bundle carries; "
        "other phrasings of the failure were not tested."
    )
    if not anomalies_shown:
        items.append(_anomalies_hidden((result.get("anomalies") or {}).get("ranker")))
    return Section("uncertain", "What is uncertain", items=items)


def _anomalies_hidden(ranker: str | None) -> str:
    """Why the CF table is hidden, with the figures of the ranker that ran (rca_eval.md)."""
    if ranker == "relative":
        return (
            "CF anomaly table hidden: the fix search follows attribution, which ranks the zoo's planted units "
            "at AUROC 0.92-1.0 (CF relative 0.51-1.0); show it with --anomalies."
        )
    return (
        "CF anomaly table hidden: on the zoo, CF ranks the planted sites worse than activation norm "
        "(AUROC 0.33-0.38 vs 0.67-1.0); show it with --anomalies."
    )


def _next(result: dict[str, Any], saved_to: str | None, report_to: str | None, anomalies_shown: bool) -> Section:
    bundle = shlex.quote(result["bundle"])
    saved = shlex.quote(saved_to) if saved_to else "analysis.json"
    commands = []
    if saved_to is None:
        commands.append((f"model-forensics analyze {bundle} --out {saved}", "save the analysis and its fix set"))
    commands.append((f"model-forensics replay {bundle} --fix {saved}", "replay the incident with the fix applied"))
    if result.get("step_gate") and saved_to:
        stem = saved_to[: -len(".json")] if saved_to.endswith(".json") else saved_to
        step = shlex.quote(f"{stem}.step_gate.json")
        commands.append((f"model-forensics replay {bundle} --fix {step}", "replay it with the step-gated fix instead"))
    if report_to is None:
        commands.append((f"model-forensics analyze {bundle} --report analysis.html", "a shareable HTML report"))
    if not anomalies_shown:
        commands.append((f"model-forensics analyze {bundle} --anomalies", "also show the CF anomaly table"))
    return Section("next", "Next", commands=commands)


def _quote(text: Any) -> str:
    return f"“{text}”"


def _over(effects: dict[str, Any]) -> str:
    """Which side-effect bounds a fix breaks, in words (older analyses name no bound: KL)."""
    over = effects.get("out_of_bound", ["kl"])
    parts = []
    if "kl" in over:
        parts.append(f"benign answers move by {effects['mean_kl']:.3g} nats (over the {effects['bound']:g} KL bound)")
    if "accuracy" in over:
        drop = max(float(effects.get("accuracy_drop", 0.0)), float(effects.get("predicate_changed", 0.0)))
        bound = float(effects.get("max_accuracy_drop", 0.02))
        parts.append(f"benign accuracy changes by {drop:.0%} (over the {bound:.0%} accuracy bound)")
    return " and ".join(parts) or "out of bound"
