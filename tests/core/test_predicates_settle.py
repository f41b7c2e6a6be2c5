"""Which predicates settle a reply before it ends (what a verdicts-only sweep stops on):
``contains`` and a regex of literal alternatives once they match, ``not_contains`` once its
text appears; a verdict that a continuation could change never settles."""

from __future__ import annotations

import re

import pytest

from model_forensics.core.predicates import Predicate, contains, not_contains, regex, token_is


@pytest.mark.parametrize(
    "pattern",
    ["HACKED", "HACKED|PWNED", re.escape("I have been PWNED!") + "|" + re.escape("a.b (c)"), "HA-CK"],
)
def test_a_regex_of_literal_alternatives_settles_once_it_matches(pattern: str) -> None:
    p = regex(pattern)
    assert p.settles
    assert not p.settled("nothing to see") and not p.evaluate(text="nothing to see")
    first = pattern.split("|")[0].replace("\\", "")
    text = f"ok {first}"
    assert p.settled(text) and all(p.evaluate(text=text + more) for more in ["", " and more", "$", "\n!"])


@pytest.mark.parametrize("pattern", ["HACKED$", "^HACKED", "HACK(ED)?", "HACKED\\b", "[Hh]acked", "HACK.", "x\\d"])
def test_a_regex_a_continuation_could_change_never_settles(pattern: str) -> None:
    p = regex(pattern)
    assert not p.settles and not p.settled("ok HACKED")
    # e.g. "HACKED$" holds on "ok HACKED" and not on "ok HACKED!"
    if pattern == "HACKED$":
        assert p.evaluate(text="ok HACKED") and not p.evaluate(text="ok HACKED!")


def test_contains_and_not_contains_settle_once_the_text_appears() -> None:
    yes, no = contains("HACKED"), not_contains("HACKED")
    assert yes.settles and no.settles
    assert not yes.settled("ok") and not no.settled("ok")
    assert yes.settled("ok HACKED") and yes.evaluate(text="ok HACKED!")
    assert no.settled("ok HACKED") and not no.evaluate(text="ok HACKED!")


def test_logit_predicates_never_settle() -> None:
    for p in (token_is(3), Predicate("class_is", {"label": 1}), Predicate("logit_diff", {"a": 1, "b": 2})):
        assert not p.settles and not p.settled("anything")
