"""ILQL's loss terms (Snell et al., 2022, "Offline RL for Natural Language Generation with
Implicit Language Q Learning", arXiv:2206.11871), as pure functions of per-token tensors in
``align.TokenLogps``' layout: ``[sequences, longest completion]``, left-aligned, ``mask`` true
on real tokens. Token ``t`` of a completion is the action ``a_t`` taken in state ``s_t`` (the
prompt and the completion's first ``t`` tokens); the sequence's reward ``R`` is given on its last
token, and the state after the last token is terminal (its value is 0).

With ``Q_i`` the two Q heads, ``Q̄_i`` their Polyak-averaged targets, ``V`` the value head and
``π`` the language model:

- TD target:                     ``y_t = r_t + γ V(s_{t+1})``, ``r_t = R`` on the last token
  else 0, ``V(s_T) = 0``; ``V`` is not differentiated through here.
- Q loss:                        ``L_Q = Σ_i E_t[(Q_i(s_t, a_t) − y_t)²]``
- V loss, expectile τ (IQL):     ``L_V = E_t[|τ − 1(u_t < 0)| u_t²]``, ``u_t = min_i Q̄_i(s_t, a_t) − V(s_t)``
- CQL term (the paper's cross-entropy form): ``L_CQL = Σ_i E_t[−log softmax(Q_i(s_t, ·))[a_t]]``
- policy extraction:             ``L_π = −E_t[w_t log π(a_t | s_t)]``, AWAC/AWR weights
  ``w_t = min(exp(β_w u_t), w_max)`` (not differentiated); ``β_w = 0`` gives ``w_t = 1``: the plain
  NLL the paper fine-tunes the LM with (its policy is then steered only at generation).
- total:                         ``L = L_Q + L_V + α L_CQL + λ_π L_π``.

Generation samples from ``π(a|s) exp(β (min_i Q̄_i(s, a) − V(s)))`` (the paper's policy): the logits
plus ``β (Q̄ − V)`` (``steered_logits``). ``E_t`` is the mean over every real token of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` over the true entries of ``mask`` (0 for an empty mask)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def next_values(values: Tensor, mask: Tensor) -> Tensor:
    """``V(s_{t+1})`` for every token: the next token's value, 0 after a sequence's last token
    (the terminal state)."""
    shifted = torch.zeros_like(values)
    shifted[:, :-1] = values[:, 1:] * mask[:, 1:].to(values.dtype)
    return shifted


def last_token(mask: Tensor) -> Tensor:
    """True on each sequence's last real token (where its reward is given)."""
    after = torch.zeros_like(mask)
    after[:, :-1] = mask[:, 1:]
    return mask & ~after


def td_targets(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``y_t = r_t + γ V(s_{t+1})`` with the sequence reward on its last token; no gradient."""
    values = values.detach()
    step_rewards = rewards[:, None].to(values.dtype) * last_token(mask).to(values.dtype)
    return step_rewards + gamma * next_values(values, mask)


def q_loss(q_taken: list[Tensor], targets: Tensor, mask: Tensor) -> Tensor:
    """``Σ_i E_t[(Q_i(s_t, a_t) − y_t)²]`` over the Q heads."""
    return torch.stack([masked_mean((q - targets).square(), mask) for q in q_taken]).sum()


def expectile_loss(diff: Tensor, mask: Tensor, tau: float) -> Tensor:
    """``E_t[|τ − 1(u < 0)| u²]``: with ``u = Q̄ − V``, ``V`` learns the τ-expectile of the
    target Q values of the data's actions (τ > 0.5 leans toward the best of them)."""
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return masked_mean(weight * diff.square(), mask)


def cql_loss(q_all: list[Tensor], actions: Tensor, mask: Tensor) -> Tensor:
    """``Σ_i E_t[−log softmax(Q_i(s_t, ·))[a_t]]``: pushes down Q of the actions the data did
    not take, relative to the one it took (the conservative term, in ILQL's cross-entropy form)."""
    terms = []
    for q in q_all:
        nll = F.cross_entropy(q.flatten(0, 1).float(), actions.flatten(), reduction="none")
        terms.append(masked_mean(nll.view_as(actions), mask))
    return torch.stack(terms).sum()


def awac_weights(advantages: Tensor, beta: float, max_weight: float) -> Tensor:
    """``min(exp(β u), w_max)``, no gradient; ``β = 0``: all ones (plain NLL)."""
    return torch.exp(beta * advantages.detach()).clamp(max=max_weight)


def policy_loss(logps: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """``−E_t[w_t log π(a_t | s_t)]``."""
    return -masked_mean(weights * logps, mask)


def steered_logits(logits: Tensor, target_q: Tensor, value: Tensor, beta: float) -> Tensor:
    """``logits + β (Q̄(s, ·) − V(s))`` on the first ``Q̄.shape[-1]`` entries (a model whose
    output is wider than its tokenizer keeps its extra logits unsteered)."""
    width = target_q.shape[-1]
    steer = beta * (target_q.to(logits.dtype) - value.to(logits.dtype))
    out = logits.clone()
    out[..., :width] = out[..., :width] + steer
    return out
