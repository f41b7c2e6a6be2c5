"""Architecture adapters: map a model's modules onto canonical site names.

An adapter knows, for each site, which module to hook and how to read (and, for
interventions, replace) the tensor there. GPT-2, BERT and Llama-family models get
canonical names (``blocks.3.attn.z``); any other ``nn.Module`` falls back to its raw leaf
module paths (``encoder.0.linear``) through :class:`GenericAdapter`.

Layouts of the tensors a site yields (B = batch, T = tokens):
    embed, resid_pre, resid_post, attn, mlp, final   (B, T, d_model)
    attn.q, attn.z                                   (B, T, n_heads, d_head)
    attn.k, attn.v                                   (B, T, n_kv_heads, d_head)   (Llama: before RoPE)
    attn.pattern                                     (B, n_heads, T_q, T_k)
    mlp.post                                         (B, T, d_mlp)
    logits                                           (B, T, vocab) or (B, n_classes)

Generic sites (any other ``nn.Module``) are read as the module returns them, except that a
channels-first image tensor (B, C, H, W) (convolutions, pooling, 2-D norms and what follows
them) reads as (B, H·W, C): spatial positions, row-major, take the token axis and channels
are the units, so ``features.2[5]`` is channel 5 and ``@pos=9`` is row 1, column 1 of an
8-wide map. Writing a site turns the tensor back into (B, C, H, W).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from model_forensics.core.errors import SiteError
from model_forensics.core.sites import GRANULARITY_SITES, match_sites, site_order


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives: a module, which side of it, and how to cut the tensor out.

    ``io``: "output" hooks the module's result, "input" its first argument.
    ``index``: element of a tuple result (attention modules return (out, weights)).
    ``span``: a slice of the last dimension (GPT-2's fused q/k/v projection).
    ``heads``: split the last dimension into (heads, d_head).
    ``channels``: a (B, C, H, W) tensor reads as (B, H·W, C) (generic image sites); other
    layouts are read as they are.
    """

    module: str
    io: Literal["output", "input"] = "output"
    index: int | None = None
    span: tuple[int, int] | None = None
    heads: int | None = None
    pattern: bool = False
    channels: bool = False


def read(point: HookPoint, payload: Any) -> torch.Tensor | None:
    """The site's tensor inside a hook payload (module output, or first input)."""
    t = payload
    if isinstance(t, tuple | list):
        t = t[point.index or 0]
    if t is None:
        return None
    if point.span is not None:
        t = t[..., point.span[0] : point.span[1]]
    if point.heads is not None:
        t = t.unflatten(-1, (point.heads, -1))
    if point.channels and t.dim() == 4:
        t = t.flatten(2).transpose(1, 2).contiguous()  # (B, C, H, W) → (B, H·W, C)
    return t


def replace(point: HookPoint, payload: Any, new: torch.Tensor) -> Any:
    """The payload with the site's tensor swapped for ``new`` (same layout as :func:`read`)."""
    if point.heads is not None:
        new = new.flatten(-2)
    if isinstance(payload, tuple | list):
        i = point.index or 0
        inner = replace(HookPoint(point.module, point.io, None, point.span, channels=point.channels), payload[i], new)
        return type(payload)((*payload[:i], inner, *payload[i + 1 :]))
    if point.span is not None:
        out = payload.clone()
        out[..., point.span[0] : point.span[1]] = new
        return out
    if point.channels and isinstance(payload, torch.Tensor) and payload.dim() == 4:
        return new.transpose(1, 2).reshape(payload.shape)  # (B, H·W, C) → (B, C, H, W)
    return new


class Adapter:
    """Site ↔ module mapping for one model. Build with :func:`adapter_for`."""

    architecture = "generic"
    causal = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.n_layers = 0
        self.n_heads: int | None = None
        self.n_kv_heads: int | None = None
        self.d_model: int | None = None
        self.d_head: int | None = None
        self.points: dict[str, HookPoint] = {}

    # -- public -------------------------------------------------------------------------
    def sites(self) -> list[str]:
        """Every site this adapter can record or intervene on, in forward order."""
        return sorted(self.points, key=site_order)

    def point(self, site: str) -> HookPoint:
        if site in self.points:
            return self.points[site]
        match_sites(site, self.sites())  # raises SiteError with the nearest names
        raise SiteError(f"site '{site}' is a pattern; name one site")

    def granularity_sites(self, granularity: str) -> list[str]:
        """The sites a granularity records on this model (only those it has)."""
        if granularity not in GRANULARITY_SITES:
            raise SiteError(f"granularity '{granularity}' is unknown; use one of {sorted(GRANULARITY_SITES)}")
        if self.n_layers == 0:
            return self.sites()
        kinds = GRANULARITY_SITES[granularity]
        wanted = ["embed"] + [f"blocks.{layer}.{kind}" for layer in range(self.n_layers) for kind in kinds] + ["final"]
        return [s for s in wanted if s in self.points]

    def module(self, point: HookPoint) -> nn.Module:
        return self.modules[point.module]

    def recompute_pattern(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """Attention probabilities (B, H, T_q, T_k) from q and k, for implementations that
        hide them (SDPA / flash). Equals eager attention's weights to float tolerance."""
        raise SiteError(f"{self.architecture} models cannot recompute attention patterns; load with eager attention")

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
        }

    # -- helpers for subclasses ---------------------------------------------------------
    def _find_prefix(self, *candidates: str) -> str:
        for prefix in candidates:
            if prefix in self.modules:
                return prefix
        raise SiteError(f"{type(self.model).__name__} has none of the modules {candidates}")

    def _scores_to_pattern(
        self, q: torch.Tensor, k: torch.Tensor, scaling: float, mask: Any, causal: bool
    ) -> torch.Tensor:
        # q: (B, H, Tq, dh); k: (B, Hkv, Tk, dh) → probabilities (B, H, Tq, Tk)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        tq, tk = q.shape[-2], k.shape[-2]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask[..., :tk], torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask[..., :tk]
        elif causal:
            allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _cache_keys(kwargs: dict[str, Any], layer_idx: int) -> torch.Tensor | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if cache is None:
        return None
    if hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return getattr(layers[layer_idx], "keys", None)


class LlamaAdapter(Adapter):
    """Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2): GQA-aware."""

    architecture = "llama"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg: Any = model.config
        base = self._find_prefix("model", "")
        pre = f"{base}." if base else ""
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.hidden_size)
        self.d_head = int(getattr(cfg, "head_dim", None) or self.d_model // self.n_heads)
        p = self.points
        p["embed"] = HookPoint(f"{pre}embed_tokens")
        for i in range(self.n_layers):
            blk = f"{pre}layers.{i}"
            p[f"blocks.{i}.resid_pre"] = HookPoint(blk, "input")
            p[f"blocks.{i}.resid_post"] = HookPoint(blk)
            p[f"blocks.{i}.attn"] = HookPoint(f"{blk}.self_attn", index=0)
            p[f"blocks.{i}.attn.pattern"] = HookPoint(f"{blk}.self_attn", index=1, pattern=True)
            p[f"blocks.{i}.attn.q"] = HookPoint(f"{blk}.self_attn.q_proj", heads=self.n_heads)
            p[f"blocks.{i}.attn.k"] = HookPoint(f"{blk}.self_attn.k_proj", heads=self.n_kv_heads)
            p[f"blocks.{i}.attn.v"] = HookPoint(f"{blk}.self_attn.v_proj", heads=self.n_kv_heads)
            p[f"blocks.{i}.attn.z"] = HookPoint(f"{blk}.self_attn.o_proj", "input", heads=self.n_heads)
            p[f"blocks.{i}.mlp"] = HookPoint(f"{blk}.mlp")
            p[f"blocks.{i}.mlp.post"] = HookPoint(f"{blk}.mlp.down_proj", "input")
        p["final"] = HookPoint(f"{pre}norm")
        if "lm_head" in self.modules:
            p["logits"] = HookPoint("lm_head")

    def recompute_pattern(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = _hidden(args, kwargs)
        shape = (*hidden.shape[:-1], -1, self.d_head)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)  # type: ignore[operator]
        k = module.k_proj(hidden).view(shape).transpose(1, 2)  # type: ignore[operator]
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
        cos, sin = kwargs["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        cached = _cache_keys(kwargs, int(module.layer_idx))  # type: ignore[arg-type]
        if cached is not None:
            k = cached
        return self._scores_to_pattern(q, k, float(module.scaling), kwargs.get("attention_mask"), causal=True)  # type: ignore[arg-type]


class GPT2Adapter(Adapter):
    architecture = "gpt2"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg: Any = model.config
        base = self._find_prefix("transformer", "")
        pre = f"{base}." if base else ""
        self.n_layers = int(cfg.n_layer)
        self.n_heads = self.n_kv_heads = int(cfg.n_head)
        self.d_model = int(cfg.n_embd)
        self.d_head = self.d_model // self.n_heads
        d, p = self.d_model, self.points
        p["embed"] = HookPoint(f"{pre}drop")
        for i in range(self.n_layers):
            blk = f"{pre}h.{i}"
            p[f"blocks.{i}.resid_pre"] = HookPoint(blk, "input")
            p[f"blocks.{i}.resid_post"] = HookPoint(blk)
            p[f"blocks.{i}.attn"] = HookPoint(f"{blk}.attn", index=0)
            p[f"blocks.{i}.attn.pattern"] = HookPoint(f"{blk}.attn", index=1, pattern=True)
            for j, name in enumerate("qkv"):
                p[f"blocks.{i}.attn.{name}"] = HookPoint(
                    f"{blk}.attn.c_attn", span=(j * d, (j + 1) * d), heads=self.n_heads
                )
            p[f"blocks.{i}.attn.z"] = HookPoint(f"{blk}.attn.c_proj", "input", heads=self.n_heads)
            p[f"blocks.{i}.mlp"] = HookPoint(f"{blk}.mlp")
            p[f"blocks.{i}.mlp.post"] = HookPoint(f"{blk}.mlp.c_proj", "input")
        p["final"] = HookPoint(f"{pre}ln_f")
        if "lm_head" in self.modules:
            p["logits"] = HookPoint("lm_head")
        elif "score" in self.modules:
            p["logits"] = HookPoint("score")

    def recompute_pattern(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = _hidden(args, kwargs)
        q, k, _ = module.c_attn(hidden).split(self.d_model, dim=2)  # type: ignore[operator]
        q = q.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        cached = _cache_keys(kwargs, int(module.layer_idx))  # type: ignore[arg-type]
        if cached is not None:
            k = cached
        return self._scores_to_pattern(q, k, float(module.scaling), kwargs.get("attention_mask"), causal=True)  # type: ignore[arg-type]


class BertAdapter(Adapter):
    """BERT encoders (post-LN). ``attn``/``mlp`` are the sublayer projections before the
    residual add and LayerNorm; ``resid_post`` is the block output after LayerNorm."""

    architecture = "bert"
    causal = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg: Any = model.config
        base = self._find_prefix("bert", "")
        pre = f"{base}." if base else ""
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = self.n_kv_heads = int(cfg.num_attention_heads)
        self.d_model = int(cfg.hidden_size)
        self.d_head = self.d_model // self.n_heads
        p = self.points
        p["embed"] = HookPoint(f"{pre}embeddings")
        for i in range(self.n_layers):
            blk = f"{pre}encoder.layer.{i}"
            p[f"blocks.{i}.resid_pre"] = HookPoint(blk, "input")
            p[f"blocks.{i}.resid_post"] = HookPoint(blk)
            p[f"blocks.{i}.attn"] = HookPoint(f"{blk}.attention.output.dense")
            p[f"blocks.{i}.attn.pattern"] = HookPoint(f"{blk}.attention.self", index=1, pattern=True)
            for name, mod in (("q", "query"), ("k", "key"), ("v", "value")):
                p[f"blocks.{i}.attn.{name}"] = HookPoint(f"{blk}.attention.self.{mod}", heads=self.n_heads)
            p[f"blocks.{i}.attn.z"] = HookPoint(f"{blk}.attention.output.dense", "input", heads=self.n_heads)
            p[f"blocks.{i}.mlp"] = HookPoint(f"{blk}.output.dense")
            p[f"blocks.{i}.mlp.post"] = HookPoint(f"{blk}.intermediate")
        if f"{pre}pooler" in self.modules and self.modules[f"{pre}pooler"] is not None:
            p["final"] = HookPoint(f"{pre}pooler")
        for head in ("classifier", "cls"):
            if head in self.modules:
                p["logits"] = HookPoint(head)
                break

    def recompute_pattern(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = _hidden(args, kwargs)
        q = module.query(hidden).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # type: ignore[operator]
        k = module.key(hidden).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # type: ignore[operator]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return self._scores_to_pattern(q, k, float(module.scaling), mask, causal=False)  # type: ignore[arg-type]


class GenericAdapter(Adapter):
    """Any ``nn.Module``: every leaf module's output is a site named by its path
    (``features.3``); image outputs (B, C, H, W) read as (B, H·W, C), channels as units."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                self.points[name] = HookPoint(name, channels=True)

    def sites(self) -> list[str]:
        return list(self.points)


def conv_sites(adapter: Adapter) -> list[tuple[str, int]]:
    """(site, output channels) of every convolution among a generic model's sites, in
    forward order: the sites whose units are channels (none on canonical models)."""
    out = []
    for site in adapter.sites():
        point = adapter.points[site]
        module = adapter.modules.get(point.module)
        if point.channels and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            out.append((site, int(module.out_channels)))
    return out


_FAMILIES: dict[str, type[Adapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "smollm": LlamaAdapter,
    "gpt2": GPT2Adapter,
    "bert": BertAdapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a model: canonical for GPT-2/BERT/Llama-family, generic otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _FAMILIES.get(str(model_type), GenericAdapter)
    try:
        return cls(model)
    except SiteError:
        return GenericAdapter(model)
