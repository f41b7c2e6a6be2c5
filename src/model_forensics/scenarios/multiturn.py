"""The multi-turn scenario: a false fact planted in an earlier turn, repeated when asked later.

Its incidents are conversations on the ``multiturn-false-fact`` zoo model, recorded turn by
turn (:func:`~model_forensics.recorder.conversation.record_conversation`): each
``incident-<i>`` bundle carries the conversation's turns in ``extras["conversation"]`` and
the turn that planted the fact in ``extras["planted_turn"]``; ``baseline-<i>`` is the same
conversation with the statement made true. Variants, benign prompts and baselines in the
extras are transcripts (every turn's message, reply and ``<eos>``), which replay reads as
single prompts.

::

    run = get("multiturn-false-fact").record("runs/multiturn")
    session = SandboxReplayer().load_bundle(run.incidents[0])
    replay_turns(session).bit_identical          # every turn as recorded
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.errors import ForensicsError
from model_forensics.models.loading import LoadedModel
from model_forensics.scenarios.scenario import Scenario, ScenarioRun, from_zoo

NAME = "multiturn-false-fact"


@dataclass
class ConversationScenario(Scenario):
    """A :class:`Scenario` whose prompts are conversations.

    Attributes:
        messages: transcript → its user messages, one a turn (every incident and baseline).
        planted_turns: the turn that plants the failure in each incident (0-based).
    """

    messages: dict[str, list[str]] = field(default_factory=dict)
    planted_turns: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "conversation"

    def incident_extras(self, i: int) -> dict[str, Any]:
        extras = super().incident_extras(i)
        if i < len(self.planted_turns):
            extras["planted_turn"] = self.planted_turns[i]
        return extras

    def _record_bundle(
        self,
        loaded: LoadedModel,
        prompt: str,
        path: Path,
        extras: dict[str, Any],
        overwrite: bool,
        run: ScenarioRun,
    ) -> Path:
        from model_forensics.recorder.conversation import record_conversation
        from model_forensics.recorder.hooks import RecorderHooks

        messages = self.messages.get(prompt)
        if messages is None:
            raise ForensicsError(f"scenario '{self.name}' has no turns for the prompt '{prompt[:60]}'")
        return record_conversation(
            loaded,
            messages,
            path,
            recorder=RecorderHooks(granularity=self.granularity, sketch=self.sketch),
            max_new_tokens=self.max_new_tokens,
            predicate=self.predicate,
            overwrite=overwrite,
            extras=extras,
        )


def multiturn_false_fact() -> ConversationScenario:
    """The scenario of zoo entry ``multiturn-false-fact`` (its ``scenario.json``)."""
    from model_forensics.models import zoo

    base = from_zoo(NAME)
    record = zoo.scenario_data(NAME)
    prompts = [*record["incident_prompts"], *record["baseline_prompts"]]
    turns = [*record["incident_messages"], *record["baseline_messages"]]
    fields = {k: getattr(base, k) for k in Scenario.__dataclass_fields__}
    return ConversationScenario(
        **fields,
        messages=dict(zip(prompts, turns, strict=True)),
        planted_turns=list(record["incident_planted_turns"]),
    )
