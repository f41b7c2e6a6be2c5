"""What an analysis fitted its fix on, restored on a fresh session (for ``fix export``).

``analyze`` fits everything (mean ablations among it) on the search part of its held-out
split (:mod:`~model_forensics.rca.heldout`) plus any ``--baseline`` bundles. The analysis
JSON records the split's settings (``fix_set.held_out.split``: fraction, seed and the
counts per kind) and the bundles (``baseline_bundles``), read by
:class:`~model_forensics.replay.export.FittedOn`; :func:`split_prompts` is seeded,
so the same bundle splits the same way again. Inside :func:`fitted_on` a session's
baseline set is what the analysis' means were taken over::

    interventions, analysis, bundle = read_analysis("analysis.json")
    session = SandboxReplayer().load_bundle(bundle)
    with fitted_on(session, analysis):
        export_fix(session, interventions, "fix/", analysis=analysis)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model_forensics.core.errors import ForensicsError
from model_forensics.rca.heldout import PromptSplit, searching, split_prompts
from model_forensics.rca.runs import add_baseline_bundles
from model_forensics.replay import Session
from model_forensics.replay.export import FittedOn


@contextmanager
def fitted_on(
    session: Session, analysis: dict[str, Any], baseline: Sequence[str | Path] | None = None
) -> Iterator[PromptSplit | None]:
    """Inside the block, ``session`` sees the prompts and baselines ``analysis`` was fitted
    on: the search part of its held-out split (none: every prompt) and the baseline bundles
    it names (``baseline``: these instead). Yields the split (None without one); the
    session is restored on leaving, also on an exception.

    Raises:
        ForensicsError: the split's settings are malformed, the bundle does not split into
            the counts the analysis recorded (the analysis belongs to another bundle), or a
            named baseline bundle is missing.
    """
    fit = FittedOn.of(analysis)
    split = split_prompts(session.extras, fit.fraction, fit.seed) if fit.fraction else None
    if split is not None and fit.counts is not None and split.counts() != fit.counts:
        raise ForensicsError(
            f"the analysis split its prompts into {fit.counts}, but this bundle splits into {split.counts()} with "
            f"the same settings (fraction {fit.fraction}, seed {fit.seed}); pass the bundle the analysis was made on"
        )
    bundles = fit.baseline_bundles if baseline is None else [str(b) for b in baseline]
    for path in bundles:
        if not Path(path).exists():
            raise ForensicsError(
                f"baseline bundle '{path}' that the analysis' means were fitted on does not exist here; "
                "pass it with --baseline (or every baseline bundle the analysis used)"
            )
    part = split.search if split is not None else {"baseline": list(session.extras.get("baseline") or [])}
    with searching(session, split) if split is not None else session.restricted(part):
        add_baseline_bundles(session, bundles)
        yield split
