"""The ``hf`` backend: transformers models, safetensors checkpoints in HF layout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from align import (
    DEVICE_CHOICES,
    BackendConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    SequenceLogps,
    TokenBatch,
    TokenLogps,
    build_hf_model,
    build_hf_scorer,
    last_token_positions,
    load_hf_tokenizer,
    model_sections,
    module_device,
    resolve_device,
)
from align_hf.varlen import use_varlen_attention

FROZEN_ROLES = ("reference", "reward")


class HFBackendConfig(BackendConfig):
    name: Literal["hf"] = "hf"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    num_layers_unfrozen: int | None = Field(
        None,
        gt=0,
        description="Hydra (trlX's num_layers_unfrozen): only the top k transformer blocks, the final "
        "norm and the (untied) output head train; the reference is the policy's frozen trunk (same "
        "tensors) plus a frozen copy of that top, and a local critic branches from the trunk. null: "
        "every weight trains (docs/hydra.md).",
    )
    hydra_critic: bool = Field(
        True,
        description="With num_layers_unfrozen: a critic built from the policy's model section is the "
        "shared trunk plus its own k blocks and a value head, not a second model; false: a full one.",
    )
    chunk_tokens: int | None = Field(
        1024,
        gt=0,
        description="On CPU, run a padded batch as length-sorted chunks of rows (at most this many "
        "token slots each, trimmed to their longest row): less padding and cache-sized activations, "
        "same math. null: one pass. Accelerators always take one pass.",
    )
    device: str = Field(
        "auto",
        description=f"Where every model of the run lives and computes ({DEVICE_CHOICES}); auto: the "
        "GPU when torch sees one, else the CPU. The hf rollout engine follows it unless its own "
        "device is set.",
    )
    compile: bool = Field(
        False,
        description="Compile each decoder layer of the policy with torch.compile(dynamic=True): a "
        "one-off compile in the first step (~20 s on 2 CPU cores; needs a C++ compiler on CPU) "
        "for ~5% shorter steps on packed CPU rows (data.padding_free). Reference, reward models and "
        "critics run as built; checkpoints keep their names. Not with num_layers_unfrozen or "
        "model.lora (docs/performance.md).",
    )

    @model_validator(mode="after")
    def _compile_fits(self) -> HFBackendConfig:
        # Hydra copies the policy's top blocks for the reference and swaps branches into its
        # decoder per forward pass: compiled layers were not tried there.
        if self.compile and self.num_layers_unfrozen:
            raise ValueError(
                "backend.compile does not combine with backend.num_layers_unfrozen: set one of them"
            )
        return self


class HFBackend:
    is_main = True  # one process: it writes every output

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.cfg: HFBackendConfig = run.backend  # type: ignore[assignment]
        self.device = resolve_device(self.cfg.device, "backend.device")
        if self.cfg.compile:
            _check_compilable(run, self.device)
        self.tokenizer = load_hf_tokenizer(run.model)
        self._tokenizers: dict[str, Any] = {_tokenizer_source(run.model): self.tokenizer}

    def tokenizer_for(self, model: ModelConfig | None = None) -> Any:
        """The tokenizer of a model section (the run's own tokenizer when they share one)."""
        cfg = model or self.run.model
        source = _tokenizer_source(cfg)
        if source not in self._tokenizers:
            self._tokenizers[source] = load_hf_tokenizer(cfg)
        return self._tokenizers[source]

    def build_model(self, role: str, model: ModelConfig | None = None) -> nn.Module:
        """Causal LMs for ``policy``/``reference``, one-head sequence classifiers for
        ``reward``/``critic``; ``reference`` and ``reward`` are frozen and in eval mode. Each is
        built afresh from its model section (never copied from the policy, which may hold a
        resumed checkpoint's weights)."""
        cfg = model or self.run.model
        built: Any = build_hf_model(role, cfg, self.tokenizer_for(cfg), self.cfg.attn_implementation)
        built.to(self.device)
        self._packed_attention(built)
        if role in FROZEN_ROLES:
            built.eval()
            built.requires_grad_(False)
        elif self.cfg.gradient_checkpointing:
            built.gradient_checkpointing_enable()
        if role == "policy" and self.cfg.compile:
            compile_decoder_layers(built)
        return built

    def build_policy(self) -> nn.Module:
        return self.build_model("policy")

    def build_reference(self) -> nn.Module:
        return self.build_model("reference")

    def token_hidden_states(self, model: nn.Module, batch: TokenBatch) -> tuple[TokenLogps, Tensor]:
        """``align.HiddenStatesBackend``: see ``token_hidden_states``; computed on the model's
        device, returned on the batch's."""
        device, home = module_device(model), batch.input_ids.device
        logps, hidden = token_hidden_states(model, batch.to(device))
        return TokenLogps(logps.values.to(home), logps.mask.to(home)), hidden.to(home)

    def named_weights(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """The state dict as ``save_pretrained`` writes it: tied weights once (under the name
        transformers keeps), keys ignored on save dropped, transformers' load-time renames undone.
        The tensors are the model's own storage, detached: no copy is made."""
        for name, tensor in saved_state_dict(model).items():
            yield name, tensor.detach()

    # The learner/backend boundary: token batches arrive on the CPU (collators build them
    # there) and go to the model's device for the forward pass; what comes back is moved to
    # where the batch came from (differentiably), so losses, metrics, rewards and advantages
    # meet on one device. On the CPU both moves are no-ops.
    def sequence_logps(self, model: nn.Module, batch: TokenBatch) -> SequenceLogps:
        device, home = module_device(model), batch.input_ids.device
        out = sequence_logps(model, batch.to(device), self.cfg.chunk_tokens)
        return SequenceLogps(out.sum.to(home), out.count.to(home))

    def token_logps(self, model: nn.Module, batch: TokenBatch, *, with_entropy: bool = False) -> TokenLogps:
        device, home = module_device(model), batch.input_ids.device
        out = token_logps(model, batch.to(device), self.cfg.chunk_tokens, with_entropy=with_entropy)
        return _token_logps_to(out, home)

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """A sequence classifier (``AutoModelForSequenceClassification``) for reward models."""
        model: Any = build_hf_scorer(
            self.run.model, self.tokenizer, num_labels, label_names, self.cfg.attn_implementation
        )
        model.to(self.device)
        self._packed_attention(model)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def _packed_attention(self, model: nn.Module) -> None:
        """Packed rows on the CPU: attention per sequence (``align_hf.varlen``) instead of sdpa
        over the whole row with a block-diagonal mask. GPUs keep transformers' attention."""
        if self.device.type == "cpu" and getattr(getattr(self.run, "data", None), "padding_free", False):
            use_varlen_attention(model)

    def sequence_scores(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        return sequence_scores(model, batch.to(module_device(model))).to(batch.input_ids.device)

    def token_scores(self, model: nn.Module, batch: TokenBatch) -> TokenLogps:
        return _token_logps_to(token_scores(model, batch.to(module_device(model))), batch.input_ids.device)

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        # transformers writes nothing on a rank other than 0 of a process group. The learner
        # already has only the main rank write a run's outputs, and each data-parallel rank writes
        # the folder its own rollout engine starts from, so every call here writes.
        model.__dict__["should_save_on_this_rank"] = _every_rank_saves
        try:
            model.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
        finally:
            model.__dict__.pop("should_save_on_this_rank", None)
        self.tokenizer.save_pretrained(path)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        # Read on the CPU whatever device wrote the files; load_state_dict copies into the
        # model's own (possibly GPU) parameters.
        state: dict[str, Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            state |= load_file(file, device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
            )


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer of ``model`` in place (``nn.Module.compile``), with
    dynamic shapes: a packed row has a different length every batch, and one graph per layer
    serves them all. In place, not ``torch.compile(model)``: that wraps the model and prefixes every
    parameter name with ``_orig_mod.``; these layers keep their parameters and names, so state
    dicts, checkpoints and refits are unchanged. Per layer rather than the whole model: the
    embedding, LM head and log-prob code around them stay eager, as does attention on packed CPU
    rows (``varlen_sdpa`` breaks the graph on purpose)."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"backend.compile: cannot find the decoder layers of {type(model).__name__} (a "
            "`layers` list on its base model); remove backend.compile"
        )
    for layer in layers:
        layer.compile(dynamic=True)


def _check_compilable(run: RunConfig, device: torch.device) -> None:
    """``backend.compile``'s limits that the backend section alone does not show: LoRA adapters
    (not tried: peft replaces the layers' linear modules after the layers are compiled, and a
    LoRA reference is the policy with its adapters off) and, on the CPU, no C++ compiler for
    inductor's kernels (it would fail in the first step, deep in torch)."""
    lora = [name for name, section in model_sections(run) if section.lora is not None]
    if lora:
        raise ConfigError(f"backend.compile does not combine with {lora[0]}.lora: set one of them")
    compilers = [os.environ.get("CXX") or "g++", "c++", "clang++"]
    if device.type == "cpu" and not any(shutil.which(name) for name in compilers):
        raise ConfigError(
            "backend.compile: torch.compile needs a C++ compiler on the CPU and none was found "
            "(g++, c++, clang++ or $CXX); install one or remove backend.compile"
        )


def _every_rank_saves(is_main_process: bool) -> bool:
    return is_main_process


def _tokenizer_source(cfg: ModelConfig) -> str:
    return cfg.tokenizer or cfg.path


def _token_logps_to(out: TokenLogps, device: torch.device) -> TokenLogps:
    entropy = out.entropy.to(device) if out.entropy is not None else None
    return TokenLogps(out.values.to(device), out.mask.to(device), entropy)


def saved_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with the keys and deduplication of ``save_pretrained``'s files."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers before 5: dedupe shared storage ourselves
        return _without_shared_storage(state)
    if not isinstance(model, PreTrainedModel):
        return _without_shared_storage(state)
    state = remove_tied_weights_from_state_dict(state, model)
    converted: dict[str, Tensor] = revert_weight_conversion(model, state)
    return converted


def _without_shared_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    seen: set[tuple[int, int]] = set()
    kept: dict[str, Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def sequence_logps(model: nn.Module, batch: TokenBatch, chunk_tokens: int | None = None) -> SequenceLogps:
    """Log-probs summed per sequence over ``loss_mask``. Logits are computed only at the
    positions that are scored (completion tokens): the LM head never runs on prompts or pads.

    With ``chunk_tokens`` (CPU, one right-padded sequence per row), rows run longest first in
    chunks of at most ``chunk_tokens`` token slots, each chunk trimmed to its own longest row.
    Every row's result is the same computation; the chunks only skip most padding and keep each
    operation's tensors small enough to stay in the CPU caches (elementwise ops on activations
    larger than the caches run several times slower). The autograd graph spans all chunks, so
    any loss over the whole batch backpropagates as usual."""
    pieces = list(_pieces(batch, chunk_tokens))
    parts = _decoder_and_head(model)
    # A decoder that does not expose its embedding (hydra's branched one) runs chunk by chunk.
    if len(pieces) > 1 and parts is not None and callable(getattr(parts[0], "get_input_embeddings", None)):
        return _chunked_sequence_logps(*parts, pieces)
    sums = counts = None
    for piece in pieces:
        part = _logps(model, piece)
        sums = part.sum if sums is None else sums + part.sum
        counts = part.count if counts is None else counts + part.count
    assert sums is not None and counts is not None
    return SequenceLogps(sums, counts)


def _chunked_sequence_logps(decoder: nn.Module, head: nn.Module, pieces: list[TokenBatch]) -> SequenceLogps:
    """``sequence_logps`` over row chunks with the embedding lookup and the LM head run once for
    all chunks, only the decoder per chunk. Same math; what it saves is in the backward: a
    per-chunk lookup writes a zeroed vocabulary-sized gradient for the embedding every chunk and
    a per-chunk head a vocabulary-sized weight gradient, each then added into the next
    (docs/performance.md, "Where the time goes"); one head matmul over all scored tokens is
    also a larger, faster one."""
    ids = torch.cat([piece.input_ids.reshape(-1) for piece in pieces])
    embedding: Any = getattr(decoder, "get_input_embeddings", None)  # checked by the caller
    embeds = embedding()(ids).split([piece.input_ids.numel() for piece in pieces])
    hidden, targets, owners = [], [], []
    for piece, embedded in zip(pieces, embeds, strict=True):
        out = decoder(
            inputs_embeds=embedded.view(*piece.input_ids.shape, -1),
            attention_mask=None if piece.packed or _right_padded(piece) else piece.attention_mask,
            position_ids=piece.position_ids,
            use_cache=False,  # see _scored_logps
        )
        scored = piece.loss_mask[:, 1:]
        hidden.append(out.last_hidden_state[:, :-1][scored])
        targets.append(piece.input_ids[:, 1:][scored])
        owners.append(piece.sequence_ids[:, 1:][scored])
    logps = head_token_logps(head, torch.cat(hidden), torch.cat(targets))
    owner = torch.cat(owners)
    num_sequences = pieces[0].num_sequences
    counts = torch.zeros(num_sequences, dtype=torch.long, device=owner.device).index_add(
        0, owner, torch.ones_like(owner)
    )
    sums = logps.new_zeros(num_sequences).index_add(0, owner, logps)
    return SequenceLogps(sums, counts)


def token_logps(
    model: nn.Module, batch: TokenBatch, chunk_tokens: int | None = None, *, with_entropy: bool = False
) -> TokenLogps:
    """The log-prob of every scored token (under ``loss_mask``), one row per sequence, left-aligned:
    ``values[s, j]`` belongs to sequence ``s``'s ``j``-th scored token, ``mask`` marks the real
    ones (a padded sequence ends in zeros). The same forward passes as ``sequence_logps`` (chunks
    included), so ``values.sum(1)`` equals its sums. ``with_entropy`` adds the entropy of the
    next-token distribution at each scored position, differentiable (an entropy bonus)."""
    scored = batch.loss_mask[:, 1:]
    counts = torch.bincount(batch.sequence_ids[:, 1:][scored], minlength=batch.num_sequences)
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    parts = [_scored_logps(model, piece, with_entropy) for piece in _pieces(batch, chunk_tokens)]
    owners = torch.cat([owner for _, owner, _ in parts])
    positions = torch.cat([_positions_in_sequence(owner, batch.num_sequences) for _, owner, _ in parts])

    def laid_out(flat: list[Tensor]) -> Tensor:
        values = torch.cat(flat)
        return values.new_zeros(batch.num_sequences, width).index_put((owners, positions), values)

    entropy = laid_out([e for _, _, e in parts if e is not None]) if with_entropy else None
    return TokenLogps(laid_out([v for v, _, _ in parts]), mask, entropy)


def _positions_in_sequence(owners: Tensor, num_sequences: int) -> Tensor:
    """Each scored token's index within its sequence. A sequence's tokens are contiguous in the
    flat (row-major) order of one piece, so the index is the distance to its first token."""
    order = torch.arange(owners.numel(), device=owners.device)
    first = torch.full((num_sequences,), owners.numel(), dtype=order.dtype, device=owners.device)
    first = first.scatter_reduce(0, owners, order, reduce="amin")
    return order - first[owners]


def _pieces(batch: TokenBatch, chunk_tokens: int | None) -> Iterable[TokenBatch]:
    """The batch as the forward passes take it: length-sorted row chunks on CPU (see
    ``sequence_logps``), else whole."""
    if chunk_tokens and batch.input_ids.device.type == "cpu" and _right_padded(batch):
        return _length_sorted_chunks(batch, chunk_tokens)
    return [batch]


def _length_sorted_chunks(batch: TokenBatch, chunk_tokens: int) -> Iterator[TokenBatch]:
    lengths = batch.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])
        rows = torch.tensor(order[start : start + max(1, chunk_tokens // max(1, width))])
        start += len(rows)
        yield TokenBatch(
            input_ids=batch.input_ids[rows, :width],
            attention_mask=batch.attention_mask[rows, :width],
            loss_mask=batch.loss_mask[rows, :width],
            sequence_ids=batch.sequence_ids[rows, :width],
            num_sequences=batch.num_sequences,
        )


def _logps(model: nn.Module, batch: TokenBatch) -> SequenceLogps:
    """One forward pass over the whole batch, summed per sequence."""
    token_logps, owners, _ = _scored_logps(model, batch)
    counts = torch.zeros(batch.num_sequences, dtype=torch.long, device=owners.device).index_add(
        0, owners, torch.ones_like(owners)
    )
    if token_logps.device.type == "cpu":
        sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(
            0, owners, token_logps
        )
        return SequenceLogps(sums, counts)
    # On a GPU index_add adds atomically, in no fixed order: the same batch could give sums a
    # rounding apart (an untrained policy and its reference would differ). One row per sequence,
    # summed along the row, is reproducible.
    width = int(counts.max()) if counts.numel() else 0
    positions = _positions_in_sequence(owners, batch.num_sequences)
    rows = token_logps.new_zeros(batch.num_sequences, width).index_put((owners, positions), token_logps)
    return SequenceLogps(rows.sum(dim=1), counts)


def _scored_logps(
    model: nn.Module, batch: TokenBatch, with_entropy: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward pass: the log-prob of each scored token (flat, row-major), the sequence each
    belongs to, and (``with_entropy``) the entropy of the distribution it was drawn from."""
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed or _right_padded(batch) else batch.attention_mask,
        "position_ids": batch.position_ids,
        # No KV cache: with one, transformers skips detecting packed sequences from position_ids
        # and packed sequences would attend to each other.
        "use_cache": False,
    }
    scored = batch.loss_mask[:, 1:]
    targets = batch.input_ids[:, 1:][scored]
    owners = batch.sequence_ids[:, 1:][scored]
    parts = _decoder_and_head(model)
    if parts is not None and not with_entropy:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1][scored]
        return head_token_logps(head, hidden, targets), owners, None
    if parts is not None and not torch.is_grad_enabled():
        # Without autograd the head runs in row chunks: the [tokens, vocab] logits never exist.
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1][scored]
        vocab = int(getattr(head, "out_features", 0)) or head(hidden[:1]).shape[-1]
        logps, entropies = [], []
        for rows in _row_chunks(hidden.shape[0], vocab):
            logits = head(hidden[rows])
            logps.append(token_logps_of(logits, targets[rows]))
            entropies.append(entropy_of(logits))
        return torch.cat(logps), owners, torch.cat(entropies)
    if parts is not None:
        decoder, head = parts
        logits = head(decoder(**inputs).last_hidden_state[:, :-1][scored])
    else:
        logits = model(**inputs).logits[:, :-1][scored]
    entropy = entropy_of(logits) if with_entropy else None
    return token_logps_of(logits, targets), owners, entropy


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy (nats, float32 at least) of each row's softmax over ``[tokens, vocab]`` logits."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    rows = [torch.log_softmax(logits[r].to(wide), dim=-1) for r in _row_chunks(*logits.shape)]
    return torch.cat([-(log_probs.exp() * log_probs).sum(-1) for log_probs in rows])


def _right_padded(batch: TokenBatch) -> bool:
    """Every row is one sequence from position 0 followed only by padding. Then no mask is
    needed: causal attention never reaches the pads after a sequence, so its tokens see exactly
    what they would with the mask (and sdpa takes its faster causal kernel); what the pad
    positions compute is never scored."""
    mask = batch.attention_mask
    if batch.position_ids is not None or mask.shape[1] == 0:
        return False
    ids = batch.sequence_ids
    one_per_row = bool((ids.max(dim=1).values == ids[:, 0]).all())
    return one_per_row and bool((mask[:, 0] == 1).all()) and bool((mask[:, :-1] >= mask[:, 1:]).all())


# Rows of logits handled at once in float32 (~16 MB per chunk for any vocabulary size).
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [slice(start, start + step) for start in range(0, max(1, rows), step)]


class _TokenLogps(torch.autograd.Function):
    """``log_softmax(logits)[target]`` per row, in float32 (at least) whatever the logits' dtype.
    Works in row chunks with PyTorch's fused (log_)softmax kernels and keeps only the logits for
    the backward, which writes ``grad * (onehot - softmax)`` into a single buffer: no float32
    copy of all logits, none of the (tokens x vocab) temporaries of log_softmax + gather."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(logits.shape[0], dtype=wide, device=logits.device)
        for rows in _row_chunks(*logits.shape):
            log_probs = torch.log_softmax(logits[rows].to(wide), dim=-1)
            out[rows] = log_probs.gather(-1, targets[rows, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        for rows in _row_chunks(*logits.shape):
            probs = torch.softmax(logits[rows].to(grad.dtype), dim=-1)
            out[rows] = probs.mul_(-grad[rows, None])
        out.scatter_add_(-1, targets[:, None], grad[:, None].to(out.dtype))
        return out, None


def token_logps_of(logits: Tensor, targets: Tensor) -> Tensor:
    """Float32 log-prob of each row's target token, from ``[tokens, vocab]`` logits."""
    result: Tensor = _TokenLogps.apply(logits, targets)
    return result


def head_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Log-probs of ``targets`` under ``head(hidden)``. Without autograd (the reference, eval)
    the head runs in row chunks, so the full ``[tokens, vocab]`` logits never exist."""
    if torch.is_grad_enabled():
        return token_logps_of(head(hidden), targets)
    vocab = int(getattr(head, "out_features", 0)) or head(hidden[:1]).shape[-1]
    return torch.cat(
        [token_logps_of(head(hidden[rows]), targets[rows]) for rows in _row_chunks(hidden.shape[0], vocab)]
    )


def sequence_scores(model: nn.Module, batch: TokenBatch) -> Tensor:
    """``[num_sequences, num_labels]`` scores of a sequence classifier: the score head applied to
    the hidden state of each sequence's last non-pad token (the head runs on those rows only)."""
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed else batch.attention_mask,
        "position_ids": batch.position_ids,
        # No KV cache: with one, transformers skips detecting packed sequences from position_ids
        # and packed sequences would attend to each other.
        "use_cache": False,
    }
    pad_id = getattr(model.config, "pad_token_id", None)
    head = getattr(model, "score", None)
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(head, nn.Module) and isinstance(decoder, nn.Module):
        hidden = decoder(**inputs).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])[last_token_positions(batch, pad_id)]
        return head(rows).float()
    if batch.packed:
        raise ValueError(
            f"{type(model).__name__} has no `score` head to read packed sequences with; set "
            "data.padding_free: false"
        )
    return model(**inputs).logits.float()


def token_scores(model: nn.Module, batch: TokenBatch) -> TokenLogps:
    """A one-head sequence classifier's score head applied at every scored position (a critic's
    per-token values), in ``token_logps``'s layout: ``values[s, j]`` is read at the position
    before sequence ``s``'s ``j``-th scored token (the state that token was chosen in),
    left-aligned, zero past the sequence's count, float32, differentiable."""
    head = getattr(model, "score", None)
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not (isinstance(head, nn.Module) and isinstance(decoder, nn.Module)):
        raise ValueError(f"{type(model).__name__} has no `score` head to read per-token values with")
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed or _right_padded(batch) else batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,  # see sequence_scores: packed sequences must not attend to each other
    }
    scored = batch.loss_mask[:, 1:]
    owners = batch.sequence_ids[:, 1:][scored]
    hidden = decoder(**inputs).last_hidden_state[:, :-1][scored]
    scores = head(hidden)[:, 0].float()
    counts = torch.bincount(owners, minlength=batch.num_sequences)
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    positions = _positions_in_sequence(owners, batch.num_sequences)
    values = scores.new_zeros(batch.num_sequences, width).index_put((owners, positions), scores)
    return TokenLogps(values, mask)


def token_hidden_states(model: nn.Module, batch: TokenBatch) -> tuple[TokenLogps, Tensor]:
    """One forward pass of a causal LM (no row chunks): the log-prob of each scored token, in
    ``token_logps``' layout, and the last hidden state the LM head read to predict it (the
    position before it), ``[num_sequences, longest, hidden_size]`` in the same layout; both
    differentiable. What heads on the policy's trunk read (ILQL's Q and V)."""
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed or _right_padded(batch) else batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,  # see sequence_scores: packed sequences must not attend to each other
    }
    scored = batch.loss_mask[:, 1:]
    targets = batch.input_ids[:, 1:][scored]
    owners = batch.sequence_ids[:, 1:][scored]
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1][scored]
        logps = head_token_logps(head, hidden, targets)
    else:  # a model whose logits are more than its head's output (soft-capped): the full pass
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1][scored]
        logps = token_logps_of(out.logits[:, :-1][scored], targets)
    counts = torch.bincount(owners, minlength=batch.num_sequences)
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
    positions = _positions_in_sequence(owners, batch.num_sequences)
    values = logps.new_zeros(batch.num_sequences, width).index_put((owners, positions), logps)
    states = hidden.new_zeros(batch.num_sequences, width, hidden.shape[-1])
    return TokenLogps(values, mask), states.index_put((owners, positions), hidden)
