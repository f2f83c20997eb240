"""The decisions of training across compute islands (Streaming DiLoCo), without clock or storage.

Douillard, Donchev, Rush, et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", arXiv:2501.18512. The model is split into ``F`` fragments (runs of layers); every
fragment is synchronized every ``H`` inner steps, fragment ``p`` at steps ``p H / F + k H``, so
one fragment is exchanged every ``H / F`` steps (a *round* here). The exchange launched at the
end of a round overlaps the first ``overlap`` inner steps of the next one, after which every
worker merges the fragment's new global value into its own: ``alpha * local + (1 - alpha) *
global``.
"""

from __future__ import annotations

import numpy as np
import torch


def fragments(groups: list[int], count: int) -> list[torch.Tensor]:
    """Flat indices of each fragment. ``groups``: the sizes of the model's layers (parameter
    tensors of one module, in the model's order, contiguous in the flat vector); fragments
    are runs of consecutive layers of about equal size (a layer is never split), each at least
    one layer. The paper strides transformer blocks over fragments; with a handful of blocks
    that leaves fragments of very unequal size, which this avoids."""
    if count < 1 or count > len(groups):
        raise ValueError(f"fragments must be between 1 and the model's {len(groups)} layers, "
                         f"got {count}")
    ends = np.cumsum(groups)
    total = int(ends[-1])
    # cut after the layer whose end is nearest each multiple of total / count, keeping every
    # fragment non-empty
    cuts, last = [], 0
    for k in range(1, count):
        target = total * k / count
        best = int(np.argmin(np.abs(ends - target)))
        best = min(max(best, last), len(groups) - 1 - (count - k))
        cuts.append(best + 1)
        last = best + 1
    bounds = [0, *[int(ends[c - 1]) for c in cuts], total]
    return [torch.arange(bounds[i], bounds[i + 1], device="cpu") for i in range(count)]


def equal_fragments(numel: int, count: int) -> list[torch.Tensor]:
    """``count`` contiguous runs of the flat parameter vector of equal size (the first ones one
    value longer when ``count`` does not divide ``numel``); a layer may be split."""
    if count < 1 or count > numel:
        raise ValueError(f"fragments must be between 1 and the model's {numel} values, got {count}")
    bounds = [numel * k // count for k in range(count + 1)]
    return [torch.arange(bounds[i], bounds[i + 1], device="cpu") for i in range(count)]


def layer_sizes(names: list[str], numels: list[int]) -> list[int]:
    """Sizes of the layers: consecutive parameters whose names share the module prefix."""
    sizes, prefix = [], None
    for name, numel in zip(names, numels, strict=True):
        own = name.rsplit(".", 1)[0]
        if own == prefix:
            sizes[-1] += numel
        else:
            sizes.append(numel)
            prefix = own
    return sizes


def synced_fragment(round_: int, count: int) -> int:
    """The fragment exchanged at the end of ``round_`` (1-based): 0, 1, ..., count - 1, 0, ..."""
    return (round_ - 1) % count


def round_seconds(before_merge_s: np.ndarray, after_merge_s: np.ndarray, exchange_s: float) -> float:
    """A round's length on the simulated clock. Each worker computes ``before_merge_s`` (the
    ``overlap`` steps) while the previous round's exchange (``exchange_s``: the slowest upload,
    then the slowest download) is in flight, waits for it if it is slower, merges, and computes
    ``after_merge_s``; the round ends when the last worker ends (the next exchange needs every
    worker's fragment)."""
    if len(before_merge_s) == 0:
        return 0.0
    return float(np.max(np.maximum(before_merge_s, exchange_s) + after_merge_s))


OVERLAP_KEY = 1 << 40        # added to the round: the data-order key of its overlapped steps
DOWNLINK_KEY = 1 << 62       # added to the exchange: the key of its re-encoded average


def merged(alpha: float, local: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """A worker's fragment after the merge: ``alpha * local + (1 - alpha) * outer``."""
    return alpha * local + (1 - alpha) * outer


def delay(algorithm) -> int:
    """Rounds between an exchange and the outer step its average makes: 0 for Streaming
    DiLoCo (the outer step at once; workers merge it ``overlap`` inner steps later), 1 for CO2
    (``one_step_late``: the average of round ``k`` steps the outer model at the end of round
    ``k + 1``, from which every worker goes on)."""
    return 1 if getattr(algorithm, "one_step_late", False) else 0


def model_parts(algorithm, spec, params: torch.Tensor) -> list[torch.Tensor]:
    """The flat indices of each fragment of the model ``params`` ``[P]`` for ``algorithm``'s
    ``fragments`` and ``fragment_by``."""
    if algorithm.fragment_by == "size":
        return equal_fragments(spec.numel, algorithm.fragments)
    views = spec.views(params.reshape(1, -1))
    return fragments(layer_sizes(list(views), [v[0].numel() for v in views.values()]),
                     algorithm.fragments)


def outer_apply(algorithm, state, parts: list[torch.Tensor], exchange: int, mean: torch.Tensor):
    """The outer model ``state`` after the average ``mean`` of exchange ``exchange`` (its
    round) steps it, on that exchange's fragment."""
    return algorithm.outer_step(state, parts[synced_fragment(exchange, algorithm.fragments)], mean)


def downlink(uplink, mean: torch.Tensor, seed: int, exchange: int) -> tuple[torch.Tensor, bytes | None, int]:
    """What every worker receives of an exchange's average ``mean`` ``[n]``: the vector it
    decodes, the payload (None: ``mean`` travels as float32) and its bytes on the wire. With
    ``compression.uplink`` the average is re-encoded once, with the key ``DOWNLINK_KEY +
    exchange``."""
    from gossamer import wire

    if uplink is None:
        return mean, None, wire.encoded_size(mean.numel())
    back = uplink.compress(mean.reshape(1, -1), seed=seed,
                           keys=np.array([DOWNLINK_KEY + exchange], dtype=np.int64))
    return uplink.decompress(back)[0], uplink.to_bytes(back, 0), int(wire.HEADER_BYTES + back.nbytes[0])
