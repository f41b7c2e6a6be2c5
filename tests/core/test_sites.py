import pytest

from model_forensics.core.errors import SiteError
from model_forensics.core.sites import match_sites, parse_selector, sites_for_granularity

AVAILABLE = sites_for_granularity("all", 4)


def test_selector_parts() -> None:
    sel = parse_selector("blocks.2.mlp.post[17,3]@pos=5,6")
    assert sel.pattern == "blocks.2.mlp.post"
    assert sel.neurons == (17, 3)
    assert sel.positions == (5, 6)
    assert parse_selector("blocks.3.attn.head.5").head == 5


def test_wildcards_match_every_layer() -> None:
    assert match_sites("blocks.*.mlp", AVAILABLE) == [f"blocks.{i}.mlp" for i in range(4)]


def test_head_selector_resolves_to_z() -> None:
    assert match_sites("blocks.1.attn.head.3", AVAILABLE) == ["blocks.1.attn.z"]


def test_unknown_site_lists_nearest_and_layer_count() -> None:
    with pytest.raises(SiteError, match=r"blocks\.40\.mlp.*4 blocks \(0–3\)"):
        match_sites("blocks.40.mlp", AVAILABLE)
    with pytest.raises(SiteError, match="nearest: blocks.1.mlp"):
        match_sites("blocks.1.mpl", AVAILABLE)


def test_garbage_is_rejected() -> None:
    with pytest.raises(SiteError):
        parse_selector("blocks.1.mlp[abc]")
