"""What flows between data formats, models and losses.

Token level (``TokenBatch``) is what a data format's collator yields and a model reads.
Log-prob level (``PreferenceBatch``, ``UnpairedBatch``...) is what a loss plugin reads: no tokens, no models,
so a loss is a pure function that is easy to write and to test against hand computations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """Sequences laid out in rows, padded or packed.

    ``sequence_ids[r, t]`` says which output sequence token ``t`` of row ``r`` belongs to
    (``-1`` for padding), so one code path serves padded and padding-free (packed) layouts.
    ``loss_mask[r, t]`` is true where token ``t`` is predicted and counted (completion tokens).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    sequence_ids: Tensor
    num_sequences: int
    position_ids: Tensor | None = None
    packed: bool = False

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens, for throughput."""
        return int(self.attention_mask.sum())

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.num_tokens / max(1, self.input_ids.numel())

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


@dataclass
class TokenLogps:
    """Per-token log-probs of each sequence's scored tokens (those under ``loss_mask``), one row
    per sequence, left-aligned: ``values[s, j]`` is the log-prob of sequence ``s``'s ``j``-th
    scored token, ``mask[s, j]`` whether that token exists (rows of shorter sequences end in
    zeros). ``entropy`` (same layout, when asked for) is the entropy of the model's next-token
    distribution at each of those positions."""

    values: Tensor
    mask: Tensor
    entropy: Tensor | None = None


@dataclass
class SequenceLogps:
    """Per-sequence sums of token log-probs over the loss mask, and the token counts."""

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count.clamp(min=1)

    def split(self, n: int) -> tuple[SequenceLogps, SequenceLogps]:
        """First ``n`` sequences and the rest (chosen and rejected of a paired batch)."""
        return (
            SequenceLogps(self.sum[:n], self.count[:n]),
            SequenceLogps(self.sum[n:], self.count[n:]),
        )


@dataclass
class PairedTokens:
    """Chosen and rejected completions of ``num_pairs`` prompts in one ``TokenBatch``:
    sequences ``0..n-1`` are chosen, ``n..2n-1`` rejected, so one forward pass serves both."""

    tokens: TokenBatch
    num_pairs: int
    example_ids: Tensor
    reward_gap: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@dataclass
class SFTTokens:
    """Prompt + completion sequences with the loss on completion tokens."""

    tokens: TokenBatch
    example_ids: Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


@dataclass
class PreferenceBatch:
    """Log-probs of a batch of preference pairs: what a preference loss reads.

    ``*_logps`` are sums over completion tokens; ``ref_*`` are the reference model's (``None``
    for reference-free losses); ``reward_gap`` is a reward model's score of chosen minus
    rejected when the data has one (the RPO losses need it). ``token_logps`` and
    ``ref_token_logps`` are the per-token log-probs of the chosen (rows ``0..n-1``) and rejected
    (rows ``n..2n-1``) completions, filled only for a loss registered with
    ``needs_token_logps=True`` (they cost the reference's per-token scores on every batch).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    reward_gap: Tensor | None = None
    token_logps: TokenLogps | None = None
    ref_token_logps: TokenLogps | None = None

    @property
    def chosen_logps_mean(self) -> Tensor:
        return self.chosen_logps / self.chosen_lengths.clamp(min=1)

    @property
    def rejected_logps_mean(self) -> Tensor:
        return self.rejected_logps / self.rejected_lengths.clamp(min=1)

    @property
    def chosen_logratios(self) -> Tensor:
        """log pi(y_w|x) - log pi_ref(y_w|x)."""
        return self.chosen_logps - _required(self.ref_chosen_logps)

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - _required(self.ref_rejected_logps)

    @property
    def logits(self) -> Tensor:
        """The DPO logit: (chosen log-ratio) - (rejected log-ratio)."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass
class UnpairedBatch:
    """Log-probs of a batch of unpaired examples, each labelled desirable or not: what a
    KTO-like loss reads.

    ``logps`` are sums over completion tokens of (prompt_i, completion_i); ``kl_logps`` the same
    for mismatched pairs (prompt_i, completion_j), the sample a KL(pi || pi_ref) estimate is
    taken from; ``ref_*`` are the reference model's (``None`` for reference-free losses).
    ``running_logratio_mean`` (a detached scalar, with a reference only) is the mean of
    ``logratios`` over every example trained on so far, this batch included: state across steps
    that a stateless loss cannot keep (BCO's running reward shift is ``beta`` times it). The
    algorithm keeps it in its checkpoints; evaluation reads it without updating it.
    """

    logps: Tensor
    labels: Tensor
    lengths: Tensor
    ref_logps: Tensor | None = None
    kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    running_logratio_mean: Tensor | None = None

    @property
    def logratios(self) -> Tensor:
        """log pi(y|x) - log pi_ref(y|x), per example."""
        return self.logps - _required(self.ref_logps)

    @property
    def kl_logratios(self) -> Tensor:
        """log pi(y'|x) - log pi_ref(y'|x) over the mismatched pairs."""
        return _required(self.kl_logps) - _required(self.ref_kl_logps)

    @property
    def desirable(self) -> Tensor:
        return self.labels.bool()


def _required(ref: Tensor | None) -> Tensor:
    if ref is None:
        raise ValueError("this loss needs reference log-probs; register it with needs_reference=True")
    return ref


@dataclass
class LossOutput:
    """A scalar loss to minimise and metrics to log (tensors are detached by the learner, so a
    metric computed from the graph needs no ``.detach()``).

    ``weight`` is how much this batch counts when the default ``Algorithm.evaluate`` averages
    the loss and metrics over a split: the mean's denominator (the token count of a token-mean
    loss), so the result is the mean over every token of the split, not a mean of batch means.
    ``None`` counts the batch once. Training is unaffected: each micro-batch's loss is divided
    by the number of micro-batches, as in TRL and torchtune's defaults. With data-parallel
    ranks, a rank's summed ``weight`` (else its token count) weighs its metrics, all but those
    named ``...loss``, when the ranks' metrics are combined (``align.distributed.reduce_metrics``).
    """

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    weight: Tensor | float | None = None


def as_number(value: Any) -> float:
    """A metric as a float; a tensor is detached first (one computed from the graph, such as a
    margin, still requires grad, and ``float`` of it warns)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)
