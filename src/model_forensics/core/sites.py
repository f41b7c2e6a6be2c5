"""Site names: one naming scheme for every tensor inside a forward pass.

Canonical names (DESIGN.md)::

    embed  final  logits
    blocks.{L}.resid_pre  blocks.{L}.resid_post  blocks.{L}.attn  blocks.{L}.mlp
    blocks.{L}.attn.q|k|v|z|pattern   blocks.{L}.attn.head.{H}   blocks.{L}.mlp.post

Selectors narrow a site: ``blocks.*.mlp`` (any layer), ``blocks.2.mlp.post[17]`` or
``[3,5]`` (neurons), ``blocks.3.attn.head.5@pos=7`` or ``@pos=2,3`` (token positions).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache

from model_forensics.core.errors import SiteError

BLOCK_SITES = ("resid_pre", "resid_post", "attn", "mlp")
ATTN_SITES = ("q", "k", "v", "z", "pattern")

# Which sites each granularity records, as suffixes of "blocks.{L}." (plus embed/final).
GRANULARITY_SITES: dict[str, tuple[str, ...]] = {
    "layer": ("resid_post", "attn", "mlp"),
    "head": ("resid_post", "attn", "mlp", "attn.z", "attn.pattern"),
    "neuron": ("resid_post", "attn", "mlp", "mlp.post"),
    "all": (
        "resid_pre",
        "resid_post",
        "attn",
        "mlp",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.z",
        "attn.pattern",
        "mlp.post",
    ),
}

# Lower number = more important; the size cap drops the largest numbers first.
_PRIORITY = {
    "embed": 1,
    "final": 1,
    "resid_post": 0,
    "resid_pre": 2,
    "attn": 1,
    "mlp": 1,
    "attn.z": 3,
    "mlp.post": 3,
    "attn.q": 4,
    "attn.k": 4,
    "attn.v": 4,
    "attn.pattern": 5,
}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SELECTOR_RE = re.compile(r"^(?P<base>[^\[@]+)(?:\[(?P<idx>[\d,\s]+)\])?(?:@pos=(?P<pos>[-\d,\s]+))?$")


@dataclass(frozen=True)
class SiteSelector:
    """A parsed selector: a site pattern plus optional neuron and position indices."""

    pattern: str
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    @property
    def head(self) -> int | None:
        """The head index of a ``blocks.L.attn.head.H`` selector, else None."""
        match = re.match(r"^blocks\.[^.]+\.attn\.head\.(\d+)$", self.pattern)
        return int(match.group(1)) if match else None


def parse_selector(text: str) -> SiteSelector:
    """Parse ``blocks.2.mlp.post[17]@pos=3`` into its parts.

    Raises:
        SiteError: the text is not a selector.
    """
    match = _SELECTOR_RE.match(text.strip())
    if not match:
        raise SiteError(
            f"'{text}' is not a site selector; write e.g. 'blocks.3.mlp', 'blocks.*.attn', "
            "'blocks.2.mlp.post[17]' or 'blocks.1.attn.head.3@pos=5'"
        )
    idx, pos = match.group("idx"), match.group("pos")
    return SiteSelector(
        pattern=match.group("base"),
        neurons=tuple(int(i) for i in idx.split(",") if i.strip()) if idx else None,
        positions=tuple(int(p) for p in pos.split(",") if p.strip()) if pos else None,
    )


def block_index(site: str) -> int | None:
    """The block number of ``blocks.L.…`` sites, None for embed/final/logits/raw paths."""
    match = _BLOCK_RE.match(site)
    return int(match.group(1)) if match else None


def site_kind(site: str) -> str:
    """The part after ``blocks.L.`` (``attn.z``), or the site itself (``embed``)."""
    match = _BLOCK_RE.match(site)
    return match.group(2) if match else site


def site_priority(site: str) -> int:
    """Importance of a site for the size cap (0 = keep longest)."""
    return _PRIORITY.get(site_kind(site), 6)


@lru_cache(maxsize=1 << 16)
def site_order(site: str) -> tuple[int, int, str]:
    """Sort key that follows the forward pass: embed, blocks in order, final, logits
    (memoised: every install and site listing sorts hundreds of names by it)."""
    if site == "embed":
        return (-1, 0, site)
    layer = block_index(site)
    if layer is not None:
        return (layer, 0, site_kind(site))
    return (10**6, 0 if site == "final" else 1, site)


def sites_for_granularity(granularity: str, n_layers: int) -> list[str]:
    """Every canonical site a granularity records on a model with ``n_layers`` blocks."""
    if granularity not in GRANULARITY_SITES:
        raise SiteError(f"granularity '{granularity}' is unknown; use one of {sorted(GRANULARITY_SITES)}")
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{kind}" for kind in GRANULARITY_SITES[granularity]]
    return [*names, "final"]


def match_sites(selector: str | SiteSelector, available: list[str]) -> list[str]:
    """The available sites a selector names (wildcards allowed).

    Raises:
        SiteError: nothing matches; the message lists the nearest valid names.
    """
    sel = parse_selector(selector) if isinstance(selector, str) else selector
    pattern = sel.pattern
    head_match = re.match(r"^(blocks\.[^.]+\.attn)\.head\.\d+$", pattern)
    lookup = head_match.group(1) + ".z" if head_match else pattern
    found = [s for s in available if fnmatch.fnmatchcase(s, lookup)]
    if not found:
        raise SiteError(unknown_site_message(pattern, available))
    return found


def unknown_site_message(name: str, available: list[str]) -> str:
    """A message naming the nearest valid site names for a mistyped one."""
    near = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
    layers = sorted({b for b in (block_index(s) for s in available) if b is not None})
    span = f"; the model has {len(layers)} blocks (0–{layers[-1]})" if layers else ""
    hint = f"; nearest: {', '.join(near)}" if near else ""
    return f"site '{name}' does not exist{span}{hint}"
