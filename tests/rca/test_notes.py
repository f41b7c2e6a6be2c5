"""Notes are data (an event and its numbers) rendered to one sentence in one place."""

from __future__ import annotations

import json

import pytest

from model_forensics.rca.cca import FixSet
from model_forensics.rca.notes import Note, distinct

GATE = {"gate_site": "blocks.0.resid_post", "gate_reads": "last", "gate_above": 1.23456, "detected": 0.75}


def test_a_note_renders_its_numbers() -> None:
    note = Note("side_effects_exceed_bound", {"kl": 0.21345, "bound": 0.05})
    assert str(note) == "side effects exceed the bound: mean benign KL 0.213 > 0.05 nats"
    assert note.to_json() == {"event": "side_effects_exceed_bound", "kl": 0.21345, "bound": 0.05, "text": str(note)}


def test_a_gate_note_says_where_the_gate_reads_and_whether_its_calibration_is_in_sample() -> None:
    numbers = {"flip_rate": 1.0, "kl": 1e-4, "ungated_flip_rate": 0.9, "ungated_kl": 0.2}
    kept = Note("gated", {**GATE, "shared": 0, **numbers})
    assert str(kept) == (
        "gated: a gate at blocks.0.resid_post (last prompt position, along the failure direction, above 1.235) "
        "fires on 75% of the failing variants and on none of the baselines; benign KL 0.2 → 0.0001 nats at "
        "flip rate 100% (ungated: 90%)"
    )
    in_sample = Note("gating_did_not_help", {**GATE, "gate_reads": "max", "shared": 3, **numbers})
    assert "(largest over the prompt," in str(in_sample)
    assert "(3 of which are benign prompts" in str(in_sample)
    assert str(in_sample).endswith("benign KL 0.0001 vs 0.2 nats ungated); the fix stays ungated")


def test_unknown_events_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown note event 'typo'"):
        Note("typo")


def test_repeated_notes_are_kept_once_in_order() -> None:
    a, b = Note("fell_back_to_sites"), Note("no_gate_site")
    assert distinct([a, b, Note("fell_back_to_sites")]) == [a, b]


def test_a_fix_set_gives_its_notes_as_text_and_as_data() -> None:
    note = Note("sites_truncated", {"sites": 3, "limit": 1})
    fix = FixSet([], 0.0, [], False, None, 0, 0, "greedy", "attribution", 0.0, note_records=[note])
    assert fix.notes == ["the site-level set needs 3 sites; reporting the top 1 (max_fix_set_size)"]
    data = json.loads(json.dumps(fix.to_json()))
    assert data["notes"] == fix.notes
    assert data["note_records"] == [{"event": "sites_truncated", "sites": 3, "limit": 1, "text": fix.notes[0]}]
