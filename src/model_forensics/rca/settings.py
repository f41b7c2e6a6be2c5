"""An analysis's settings: its config section, with the constructor's keywords on top.

``configs/default.yaml`` holds every knob (``modules.cf``, ``modules.cca``); a keyword given
to ``CausalCCA(...)`` / ``CompressionForensics(...)`` overrides that one value and is
validated like the file (None means "as configured").
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from model_forensics.core.config import validation_message
from model_forensics.core.errors import ConfigError

Section = TypeVar("Section", bound=BaseModel)


def overridden(section: Section, source: str, **keywords: Any) -> Section:
    """``section`` with every keyword that is not None put in its place.

    Raises:
        ConfigError: a value the config would reject (named, with ``source``).
    """
    given = {key: value for key, value in keywords.items() if value is not None}
    if not given:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source)) from None
