"""``align run --algo ilql``: Implicit Language Q-Learning (Snell et al., 2022) on offline
(prompt, completion, reward) rows; the formulas are in ``align_ilql.objectives``.

The trained module is the policy plus its heads (``ILQLHeads``) in one optimizer: one forward
pass of the language model gives both the log-probs of the completion tokens (the policy term)
and the last hidden states the heads read, and the Q, V and CQL losses train the trunk too, as
in the paper. The target Q heads follow the Q heads by Polyak averaging after every optimizer
step. The heads go into every checkpoint (``save_files``, with the optimizer state of their
parameters in the learner's) and into ``final/`` beside the policy, so ``--resume`` continues
bit-exact and ``align generate --model runs/ilql/final`` steers with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

import align
from align_ilql import objectives as obj
from align_ilql.data import RewardedTokens
from align_ilql.heads import ILQLHeads

if TYPE_CHECKING:
    from align import Learner


class ILQLConfig(align.RunConfig):
    """``align run --algo ilql``: Q and V heads on the policy, learned offline from rewards."""

    algo: Literal["ilql"] = "ilql"
    gamma: float = Field(0.99, ge=0, le=1, description="Discount per token (γ).")
    tau: float = Field(0.7, gt=0, lt=1, description="Expectile of the V loss (τ); 0.5 is the mean.")
    cql_weight: float = Field(0.1, ge=0, description="Weight of the CQL term (α).")
    policy_weight: float = Field(
        1.0, ge=0, description="Weight of the policy term (λ_π); 0 trains only the heads' losses."
    )
    awac_beta: float = Field(
        0.0,
        ge=0,
        description="AWAC weights exp(awac_beta * (Q̄ - V)) on the policy's NLL; 0: plain NLL, as the paper.",
    )
    awac_max_weight: float = Field(20.0, gt=0, description="Upper clip of the AWAC weights.")
    target_update_rate: float = Field(
        0.01, gt=0, le=1, description="Polyak rate of the target Q heads, applied after every optimizer step."
    )
    generation_beta: float = Field(
        4.0,
        ge=0,
        description="β of generation with the heads: logits + β (Q̄ - V). Saved with the heads (ilql.json), "
        "where `align generate` reads it.",
    )


def hidden_states_backend(backend: align.Backend) -> align.HiddenStatesBackend:
    if not isinstance(backend, align.HiddenStatesBackend):
        raise align.ConfigError(
            f"algo ilql needs a backend that returns the policy's last hidden states "
            f"(align.HiddenStatesBackend); {type(backend).__name__} does not: use backend.name=hf"
        )
    return backend


class ILQL(align.Algorithm):
    config: ILQLConfig

    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.backend = hidden_states_backend(ctx.backend)
        self.device = next(ctx.policy.parameters()).device
        self.heads = ILQLHeads(self._hidden_size(), len(ctx.backend.tokenizer)).to(self.device)
        self.trained = nn.ModuleDict({"policy": ctx.policy, "heads": self.heads})
        self.learner: Learner | None = None
        self.synced_step = 0  # the optimizer step the target Q heads have been averaged up to

    def _hidden_size(self) -> int:
        """The width of the policy's hidden states, from a one-token forward pass."""
        token = int(self.ctx.backend.tokenizer.eos_token_id or 0)
        probe = align.lay_out([([token], [token])], token, False)
        with torch.no_grad():
            _, hidden = self.backend.token_hidden_states(self.ctx.policy, probe)
        return int(hidden.shape[-1])

    # ---- the learner's side ------------------------------------------------------------
    def trainable(self) -> nn.Module:
        return self.trained

    def setup(self, learner: Learner) -> None:
        self.learner = learner

    def sync_targets(self) -> None:
        """Average the target Q heads once per optimizer step taken since the last call. Called
        before anything reads them (a step's loss, an evaluation, a checkpoint, ``final/``): the
        result is that of averaging right after each step, and a checkpoint holds it."""
        step = self.learner.step if self.learner is not None else self.synced_step
        for _ in range(step - self.synced_step):
            self.heads.polyak(self.config.target_update_rate)
        self.synced_step = max(self.synced_step, step)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"synced_step": self.synced_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synced_step = int(state.get("synced_step", 0))

    def save_files(self, folder: Path) -> None:
        self.sync_targets()
        self.heads.save(folder, self.config.generation_beta)

    def load_files(self, folder: Path) -> None:
        self.heads.load(folder)

    def final_files(self, folder: Path) -> None:
        """``final/`` holds the heads beside the policy: ``align generate`` steers with them."""
        self.sync_targets()
        self.heads.save(folder, self.config.generation_beta)

    # ---- the loss -------------------------------------------------------------------------
    def terms(self, batch: RewardedTokens) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The total loss, its terms and statistics, and the number of completion tokens."""
        cfg = self.config
        # On the policy's device, the backend's results stay there, where the heads are.
        logps, hidden = self.backend.token_hidden_states(self.ctx.policy, batch.tokens.to(self.device))
        mask, actions = logps.mask, batch.actions.to(self.device)
        if actions.shape != mask.shape:
            raise RuntimeError(
                f"the completion tokens {tuple(actions.shape)} do not line up with the backend's "
                f"scored tokens {tuple(mask.shape)}"
            )
        qs, target_all, values = self.heads(hidden)
        q_taken = [q.gather(-1, actions[..., None]).squeeze(-1) for q in qs]
        target_taken = target_all.gather(-1, actions[..., None]).squeeze(-1)
        advantages = target_taken - values
        targets = obj.td_targets(values, batch.rewards.to(self.device), mask, cfg.gamma)
        weights = obj.awac_weights(advantages, cfg.awac_beta, cfg.awac_max_weight)
        terms = {
            "loss_q": obj.q_loss(q_taken, targets, mask),
            "loss_v": obj.expectile_loss(advantages, mask, cfg.tau),
            "loss_cql": obj.cql_loss(qs, actions, mask),
            "loss_policy": obj.policy_loss(logps.values, weights, mask),
        }
        total = (
            terms["loss_q"]
            + terms["loss_v"]
            + cfg.cql_weight * terms["loss_cql"]
            + cfg.policy_weight * terms["loss_policy"]
        )
        with torch.no_grad():
            stats = {
                "q_mean": obj.masked_mean(torch.stack(q_taken).mean(0), mask),
                "target_q_mean": obj.masked_mean(target_taken, mask),
                "v_mean": obj.masked_mean(values, mask),
                "advantage_mean": obj.masked_mean(advantages, mask),
                "awac_weight_mean": obj.masked_mean(weights, mask),
                "nll": -obj.masked_mean(logps.values, mask),
                "reward_mean": batch.rewards.float().mean(),
            }
        return total, {**terms, **stats}, mask.sum()

    def loss(self, batch: RewardedTokens) -> align.LossOutput:
        if torch.is_grad_enabled():
            self.sync_targets()
        total, metrics, tokens = self.terms(batch)
        return align.LossOutput(total, metrics, weight=tokens)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Every loss term and statistic averaged over the eval split's completion tokens."""
        self.sync_targets()
        return super().evaluate(batches)
