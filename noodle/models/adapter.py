"""Map a transformers decoder-only model onto placement units by its structure.

No architecture names are hard-coded: the decoder blocks are the longest
``nn.ModuleList`` of same-class modules inside the base model (or inside its one
child that holds them, OPT's ``model.decoder``); that module's other children that
come before the blocks form the ``embed`` unit, the ones after form the head together
with the output embedding (``lm_head``); modules whose class name contains ``Rotary``
are shared helpers every stage copies. Children declared before the blocks but named
as output-side modules (``final_*``, ``project_out``: OPT) belong to the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from noodle.errors import ModelError
from noodle.models.conformance import check_verified
from noodle.types import unit_names

__all__ = ["UnitLayout", "layout_of"]


@dataclass(frozen=True)
class UnitLayout:
    """Dotted module paths (relative to the full model) of each placement unit.

    Attributes:
        base: path of the base model (``transformer`` for GPT-2, ``model`` for Llama).
        embed: modules of the ``embed`` unit, in call order.
        blocks: one path per decoder block, ``blocks[i]`` is unit ``block.<i>``.
        final: modules after the blocks (final norm), part of the ``lm_head`` unit.
        lm_head: path of the output projection.
        shared: helpers without weights that every stage needs (rotary embedding).
        tied: whether ``lm_head`` shares its weight with an input embedding.
        input_embedding: path of the token embedding (one of ``embed``); a last
            stage of a tied model without it loads this weight for its head.
    """

    base: str
    embed: tuple[str, ...]
    blocks: tuple[str, ...]
    final: tuple[str, ...]
    lm_head: str
    shared: tuple[str, ...]
    tied: bool
    input_embedding: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def unit_names(self) -> list[str]:
        return unit_names(self.num_blocks)

    def unit_modules(self) -> dict[str, tuple[str, ...]]:
        """Unit name -> module paths it owns (shared helpers excluded)."""
        out: dict[str, tuple[str, ...]] = {"embed": self.embed}
        for i, path in enumerate(self.blocks):
            out[f"block.{i}"] = (path,)
        out["lm_head"] = (*self.final, self.lm_head)
        return out

    def unit_of_module(self, path: str) -> str | None:
        """Placement unit owning module ``path`` (or one of its submodules)."""
        for unit, roots in self.unit_modules().items():
            for root in roots:
                if path == root or path.startswith(root + "."):
                    return unit
        return None


def _path_of(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ModelError(f"module {type(target).__name__} is not part of the model")


_OUTPUT_SIDE = ("final_", "project_out")


def _blocks_in(module: nn.Module) -> bool:
    return any(isinstance(c, nn.ModuleList) and len(c) > 0 for c in module.children())


def _decoder_root(base: nn.Module, prefix: str) -> tuple[nn.Module, str]:
    """The module whose children are the blocks: the base model, or its only child when that holds them."""
    if _blocks_in(base):
        return base, prefix
    children = list(base.named_children())
    if len(children) == 1 and _blocks_in(children[0][1]):  # a pure wrapper (OPTModel -> decoder)
        return children[0][1], f"{prefix}.{children[0][0]}"
    return base, prefix


def layout_of(model: nn.Module, *, verified: bool = True) -> UnitLayout:
    """Find the unit layout of a decoder-only causal LM (GPT-2, Llama, Mistral, ...).

    With ``verified`` (the default) an architecture whose staging is not verified exact by the
    conformance suite is refused (:func:`noodle.models.conformance.check_verified`).

    Raises:
        ModelError: the model has no output embedding or no list of decoder blocks, or its
            architecture is not verified.
    """
    if verified and getattr(model, "config", None) is not None:
        check_verified(model.config)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        raise ModelError(
            f"{type(model).__name__} has no output embedding (lm_head); noodle runs decoder-only causal LMs"
        )
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        prefix, base = "model", model.model  # a text-only class of a multimodal family (Llama 4)
    if not isinstance(base, nn.Module):
        raise ModelError(f"{type(model).__name__} has no base model {prefix!r}; not a transformers causal LM")

    root, root_path = _decoder_root(base, prefix)
    best: tuple[str, nn.ModuleList] | None = None
    for name, child in root.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            if len({type(m) for m in child}) == 1 and (best is None or len(child) > len(best[1])):
                best = (name, child)
    if best is None:
        raise ModelError(f"{type(model).__name__}: found no list of decoder blocks in {prefix!r}")
    blocks_name = best[0]

    embed: list[str] = []
    final: list[str] = []
    shared: list[str] = []
    seen_blocks = False
    for name, child in root.named_children():
        path = f"{root_path}.{name}"
        if name == blocks_name:
            seen_blocks = True
        elif "rotary" in type(child).__name__.lower():
            shared.append(path)
        elif not seen_blocks and not name.startswith(_OUTPUT_SIDE):
            embed.append(path)
        else:
            final.append(path)
    final.sort(key=lambda p: p.rpartition(".")[2].startswith("project_out"))  # norm, then the projection (OPT)
    if not any(isinstance(model.get_submodule(p), nn.Embedding) for p in embed):
        raise ModelError(f"{type(model).__name__}: found no token embedding before the decoder blocks")

    get_in = getattr(model, "get_input_embeddings", None)
    emb_in = get_in() if callable(get_in) else None
    tied = emb_in is not None and getattr(emb_in, "weight", None) is getattr(head, "weight", object())
    input_embedding = _path_of(model, emb_in) if isinstance(emb_in, nn.Module) else ""
    if input_embedding not in embed:
        raise ModelError(f"{type(model).__name__}: the input embedding is not before the decoder blocks")
    return UnitLayout(
        base=prefix,
        embed=tuple(embed),
        blocks=tuple(f"{root_path}.{blocks_name}.{i}" for i in range(len(best[1]))),
        final=tuple(final),
        lm_head=_path_of(model, head),
        shared=tuple(shared),
        tied=tied,
        input_embedding=input_embedding,
    )
