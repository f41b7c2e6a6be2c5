"""JSON-safe conversion of result data: numpy → lists, NaN/inf → None, floats rounded."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(value: Any, digits: int = 6) -> Any:
    """``value`` with numpy arrays/scalars turned into plain lists/numbers, non-finite
    floats into None, and floats rounded to ``digits`` significant digits."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), digits)
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        if not math.isfinite(f):
            return None
        return float(f"{f:.{digits}g}")
    return value
