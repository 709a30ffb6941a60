"""Attention per sequence inside a packed row, for CPUs (no flash-attn varlen kernel there).

A packed row (``data.padding_free``) holds several sequences back to back, their position ids
restarting at 0. transformers' ``sdpa`` keeps them apart with a block-diagonal ``[T, T]`` mask,
and the CPU kernel then computes the whole square: for a batch of 16 sequences of ~270 tokens,
16 times the attention work of the sequences themselves, plus the mask. ``varlen_sdpa`` instead
splits the row's queries, keys and values at the sequence boundaries and runs torch's causal
sdpa on each sequence (its CPU flash kernel), then joins the outputs; the backward is autograd's
(the split's backward is one concatenation of the pieces' gradients). Everything outside
attention (the linear layers, norms, MLP) still runs over the whole packed row at once: one
weight gradient per weight per step, no padding anywhere.

Any other input (a padding mask, a KV cache, one sequence per row) goes to transformers' own
sdpa function with the mask transformers' sdpa would build, so a model switched to it
(``use_varlen_attention``) computes what it did before on everything but packed rows. Only
architectures whose attention is plain causal softmax attention switch (``FITS``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN = "align_varlen_sdpa"
# model_type values whose attention is causal softmax attention and nothing else (no
# soft-capping, sinks or extra masks) unless a sliding window is configured (see ``_fits``).
FITS = ("llama", "mistral", "qwen2", "qwen3")


# Under torch.compile the per-sequence loop runs eagerly (a graph break): traced, it would be
# specialised to one batch's lengths and recompiled for every batch.
@torch.compiler.disable
def varlen_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[B, H, T, D]``, ``key``/``value``
    ``[B, H_kv, T, D]``; returns ``[B, T, H, D]``. Without a mask, the sequences of each row are
    read from ``cu_seq_lens_q`` (flash-attn's cumulative lengths, one-row batches) when given,
    else from ``position_ids`` (a sequence starts wherever the position does not follow the
    previous one), and each runs as its own causal attention. Rows of one sequence, masks and
    cached keys (queries and keys of different lengths) are sdpa's as usual."""
    rows = None
    if attention_mask is None and query.shape[2] == key.shape[2]:
        rows = _row_lengths(query.shape[0], query.shape[2], kwargs)
    if rows is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for row, lengths in enumerate(rows):
        q, k, v = (t[row : row + 1].split(lengths, dim=2) for t in (query, key, value))
        per_sequence = [
            F.scaled_dot_product_attention(
                q_i, k_i, v_i, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1
            ).transpose(1, 2)
            for q_i, k_i, v_i in zip(q, k, v, strict=True)
        ]
        outputs.append(torch.cat(per_sequence, dim=1))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


def _row_lengths(batch: int, width: int, kwargs: dict[str, Any]) -> list[list[int]] | None:
    """Each row's sequence lengths, in order; None when no row holds more than one sequence."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None and batch == 1:
        lengths = torch.diff(cu_seq_lens).tolist()
        return [lengths] if len(lengths) > 1 else None
    positions = kwargs.get("position_ids")
    if positions is None:
        return None
    positions = positions.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    if int(starts.sum()) == batch:
        return None
    result = []
    for row in starts:
        bounds = [*row.nonzero().flatten().tolist(), width]
        result.append([end - start for start, end in itertools.pairwise(bounds)])
    return result


def varlen_mask(**kwargs: Any) -> Tensor | None:
    """The mask ``varlen_sdpa`` is called with: none for a mask-free batch whose queries are its
    keys (packed or not: the position ids say where sequences start), else sdpa's."""
    plain = kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
    if (
        plain
        and kwargs["q_length"] == kwargs["kv_length"]
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
    ):
        return None
    mask: Tensor | None = sdpa_mask(**kwargs)
    return mask


AttentionInterface.register(VARLEN, varlen_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)


def _fits(config: Any) -> bool:
    """The model's attention is what ``varlen_sdpa`` computes: sdpa chosen, a plain causal
    architecture, no sliding window in use."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "model_type", None) not in FITS:
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None) is None
    return not getattr(config, "use_sliding_window", False)


def use_varlen_attention(model: nn.Module) -> bool:
    """Switch an sdpa model of a fitting architecture to ``varlen_sdpa``; say whether it was.
    The choice lives in the config's private ``_attn_implementation``, which checkpoints do not
    save: a saved model loads with whatever attention its loader asks for."""
    config = getattr(model, "config", None)
    if config is None or not _fits(config):
        return False
    config._attn_implementation = VARLEN
    return True
