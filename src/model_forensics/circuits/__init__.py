"""Circuits: which tokens, heads and units carry a behaviour (issue 17, first slice).

::

    from model_forensics.circuits import token_influence, head_importance, evaluate_claim

    inf = token_influence(model, tok, prompt, target=" HACKED", method="integrated_gradients")
    imp = head_importance(model, tok, prompt=prompt, kind="mean")          # or a replay Session
    ev = evaluate_claim(model, tok, "prompts.jsonl", units=["blocks.0.attn.head.3"], kind="zero")

Built on the engine below it: the hooks API (:mod:`model_forensics.models.hooks`), the
adapters' site names, replay interventions and ``Session.sweep``. It adds no hooks of its
own.
"""

from model_forensics.circuits.claims import ClaimEvaluation, PromptRecord, evaluate_claim, read_prompts
from model_forensics.circuits.discover import Circuit, CircuitScore, discover
from model_forensics.circuits.graph import DependencyGraph, Edge, dependency_graph
from model_forensics.circuits.heads import HeadImportance, head_importance
from model_forensics.circuits.influence import METHODS, TokenInfluence, token_influence
from model_forensics.circuits.subject import Objective, Subject, subject_of

__all__ = [
    "METHODS",
    "Circuit",
    "CircuitScore",
    "ClaimEvaluation",
    "DependencyGraph",
    "Edge",
    "HeadImportance",
    "Objective",
    "PromptRecord",
    "Subject",
    "TokenInfluence",
    "dependency_graph",
    "discover",
    "evaluate_claim",
    "head_importance",
    "read_prompts",
    "subject_of",
    "token_influence",
]
