"""Result records as JSON: a dataclass's fields by name, with the few that need converting.

::

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, units=[u.to_json() for u in self.units])
"""

from __future__ import annotations

import dataclasses
from typing import Any


def fields_json(record: Any, /, **values: Any) -> dict[str, Any]:
    """``record``'s dataclass fields in declaration order, then ``values`` on top.

    Field values are taken as they are (shallow: not copied, nested records not
    converted); a keyword replaces the field of that name (a converted form) or adds a
    key (a derived value).
    """
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    out.update(values)
    return out
