"""Which parameters each method adapts (docs/design.md, section 12): the selections of the authors' code.

`block_index` is the one reading of a transformer block's index from a module or parameter name
(`blocks.<i>`), used by every selection that skips or picks blocks.
"""
import re
from typing import Iterable, Optional

from torch import nn

from ..layers import FusedSpectralLinear, spectral_layers, spectralize

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def block_index(name: str) -> Optional[int]:
    """i for a module or parameter under `blocks.<i>`, else None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def configure_for_adaptation(model: nn.Module) -> None:
    """The authors' `configure_model`: train mode, every parameter frozen (the method unfreezes its own), and
    BatchNorm layers normalising with the batch's statistics."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None


def norm_parameters(model: nn.Module, who: str = "Tent") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the affine weight and bias of every LayerNorm, GroupNorm and BatchNorm (Tent's
    `collect_params`; EATA's, SAR repo eata.py lines 143–157); ValueError naming `who` when there is none."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, NORMS):
            out += [(f"{name}.{k}" if name else k, p) for k, p in m.named_parameters(recurse=False)
                    if k in ("weight", "bias")]
    if not out:
        raise ValueError(f"{who}: the model has no normalisation layer with affine parameters")
    return out


def block_norm_parameters(model: nn.Module, frozen_blocks: int = 3, who: str = "SAR") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the normalisation affine parameters SAR and DeYO train in a ViT: those of every
    `blocks.<i>` but the last `frozen_blocks`, and of norms outside the blocks except the final `norm`
    (SAR sar.py `collect_params`, lines 109–138, and DeYO deyo.py lines 198–207: skip blocks.9–11 and `norm`)."""
    mods = list(model.named_modules())
    blocks = [b for n, _ in mods if (b := block_index(n)) is not None]
    if frozen_blocks > 0 and not blocks:
        raise ValueError(f"{who}: frozen_blocks={frozen_blocks} needs a ViT with `blocks.<i>` modules; this model has "
                         "none (set frozen_blocks=0 to adapt every normalisation layer but the final `norm`)")
    depth = max(blocks) + 1 if blocks else 0
    out = []
    for name, m in mods:
        if not isinstance(m, NORMS):
            continue
        b = block_index(name)
        if (b is not None and b >= depth - frozen_blocks) or (b is None and name.split(".")[-1] == "norm"):
            continue
        out += [(f"{name}.{k}" if name else k, p) for k, p in m.named_parameters(recurse=False)
                if k in ("weight", "bias")]
    if not out:
        raise ValueError(f"{who}: no normalisation affine parameter to adapt (frozen_blocks={frozen_blocks} of "
                         f"{depth} blocks, the final norm excluded); lower frozen_blocks")
    return out


def weight_and_bias_parameters(model: nn.Module, who: str = "CoTTA") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter named `weight` or `bias` (CoTTA cotta.py `collect_params`,
    lines 136–153: every module's, not only the normalisation layers); ValueError naming `who` when none."""
    out = [(n, p) for n, p in model.named_parameters() if n.split(".")[-1] in ("weight", "bias")]
    if not out:
        raise ValueError(f"{who}: the model has no parameter named `weight` or `bias` to adapt")
    return out


def resolve_blocks(blocks: Optional[Iterable[int]], depth: int, who: str = "IMSE") -> set[int]:
    """Block indices (negative ones from the end); None: all but the last three (the official IMSE choice)."""
    if blocks is None:
        return set(range(max(depth - 3, 0)))
    out = set()
    for b in blocks:
        if not -depth <= b < depth:
            raise ValueError(f"{who}: adapt_blocks index {b} out of range for {depth} blocks")
        out.add(b % depth)
    return out


def select_layers(model: nn.Module, adapt_blocks: Optional[Iterable[int]], diversity_blocks: int,
                  owner: str) -> tuple[dict, dict, dict]:
    """Spectralize `model` if needed and freeze it; returns its spectral layers, the adapted ones (those in
    `adapt_blocks`) and the probed ones (the last `diversity_blocks` blocks), by name (IMSE)."""
    if not spectral_layers(model):
        spectralize(model)
    model.requires_grad_(False)
    layers: dict[str, FusedSpectralLinear] = spectral_layers(model)
    blocks = {n: block_index(n) for n in layers}
    in_blocks = [b for b in blocks.values() if b is not None]
    if not in_blocks:
        raise ValueError(f"{owner}: no spectral layer lives in a `blocks.<i>` module; is this a timm ViT?")
    depth = max(in_blocks) + 1
    adapt = resolve_blocks(adapt_blocks, depth, owner)
    if diversity_blocks > depth:
        raise ValueError(f"{owner}: diversity_blocks={diversity_blocks} but the model has {depth} blocks")
    div = set(range(depth - diversity_blocks, depth))
    adapted = {n: m for n, m in layers.items() if blocks[n] in adapt}
    if not adapted:
        raise ValueError(f"{owner}: no spectral layer in the adapted blocks {sorted(adapt)} (depth {depth})")
    return layers, adapted, {n: m for n, m in layers.items() if blocks[n] in div}
