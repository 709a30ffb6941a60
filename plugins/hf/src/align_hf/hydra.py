"""Hydra heads (trlX's ``num_layers_unfrozen``): policy, reference and critic share one frozen
trunk.

With ``backend.num_layers_unfrozen: k`` only the policy's top ``k`` transformer blocks, its final
norm and its output head train (a head tied to the input embeddings stays frozen with them). The
rest, the *trunk* (input embeddings and the lower blocks), never changes, so every other model
of the run can run on the policy's own trunk tensors instead of a copy of them:

- the **reference** is the trunk plus a frozen copy of the top ``k`` blocks, norm and head as
  they were at the start (``HydraReference``);
- a **critic** built from the policy's model section is the trunk plus its own trainable copy of
  the top ``k`` blocks and norm and a scalar value head (``HydraCritic``), not a second model.

Both run through the policy's own decoder with their branch swapped in for the length of one
forward pass (``swapped``): whatever the backend's fast paths do with a policy (decoder then
head on the scored positions, CPU row chunks, packed sequences) they do with these unchanged.
Saving, loading and the weights an engine is refit with are the policy's, full, as without
Hydra: the final output is an ordinary HF checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align import ConfigError, ModelConfig, RunConfig, model_sections
from align_hf.backend import HFBackend

# Names transformers gives a decoder's final norm, across architectures (Llama, Qwen, Mistral,
# Gemma: norm; GPT-2: ln_f; OPT: final_layer_norm; GPT-NeoX, Phi: final_layer_norm/final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class Anatomy:
    """Where a causal LM's (or sequence scorer's) parts are: its stack of transformer blocks, the
    final norm after them, the input embeddings, and the output head (``lm_head``, or a
    scorer's ``score``) with the module holding it."""

    blocks: nn.ModuleList
    norm_owner: nn.Module
    norm_name: str
    embeddings: nn.Module
    head_owner: nn.Module | None
    head_name: str | None

    @property
    def norm(self) -> nn.Module:
        module: nn.Module = getattr(self.norm_owner, self.norm_name)
        return module

    @property
    def head(self) -> nn.Module | None:
        if self.head_owner is None or self.head_name is None:
            return None
        module: nn.Module = getattr(self.head_owner, self.head_name)
        return module

    def head_is_tied(self) -> bool:
        """The head's weight is the input embeddings' (tied embeddings): part of the trunk."""
        head = self.head
        shared = {id(p) for p in self.embeddings.parameters()}
        return head is not None and any(id(p) in shared for p in head.parameters())


def anatomy(model: nn.Module) -> Anatomy:
    """Find the parts of ``model``; a ``ConfigError`` names what could not be found."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    kind = type(model).__name__
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not count or not lists:
        raise ConfigError(
            f"backend.num_layers_unfrozen: cannot find the transformer blocks of {kind} (a module list "
            f"of config.num_hidden_layers={count} layers)"
        )
    blocks_name, blocks = lists[0]
    owner = model.get_submodule(blocks_name.rpartition(".")[0])
    norm_name = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(owner, n, None), nn.Module)), None)
    if norm_name is None:
        raise ConfigError(
            f"backend.num_layers_unfrozen: {kind} has no final norm next to its blocks (looked for "
            f"{', '.join(FINAL_NORM_NAMES)} on {blocks_name.rpartition('.')[0] or 'the model'})"
        )
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if not isinstance(embeddings, nn.Module):
        raise ConfigError(f"backend.num_layers_unfrozen: {kind} has no input embeddings")
    head_owner, head_name = _head_of(model)
    return Anatomy(blocks, owner, norm_name, embeddings, head_owner, head_name)


def _head_of(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        head = getattr(model, "score", None)  # a sequence scorer's head
    if not isinstance(head, nn.Module):
        return None, None
    for name, module in model.named_modules():
        if module is head:
            owner_name, _, child = name.rpartition(".")
            return model.get_submodule(owner_name), child
    return None, None


def check_depth(parts: Anatomy, k: int, kind: str) -> None:
    if k > len(parts.blocks):
        raise ConfigError(
            f"backend.num_layers_unfrozen ({k}) is more than the {len(parts.blocks)} transformer blocks "
            f"of the model ({kind})"
        )


def freeze_trunk(model: nn.Module, k: int) -> Anatomy:
    """Freeze everything of ``model`` but its top ``k`` blocks, final norm and head (a head
    tied to the input embeddings is frozen with them)."""
    parts = anatomy(model)
    check_depth(parts, k, type(model).__name__)
    model.requires_grad_(False)
    trained: list[nn.Module] = [*parts.blocks[len(parts.blocks) - k :], parts.norm]
    if parts.head is not None and not parts.head_is_tied():
        trained.append(parts.head)
    for module in trained:
        module.requires_grad_(True)
    return parts


class Branch(nn.Module):
    """The top of a model that a hydra head owns: ``k`` transformer blocks, the final norm and,
    for a reference with an untied head, the output head."""

    def __init__(self, blocks: Sequence[nn.Module], norm: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head


def copy_branch(parts: Anatomy, k: int, with_head: bool) -> Branch:
    """Copies (new tensors) of the top ``k`` blocks and the norm of ``parts`` (and of its head
    unless it is tied: a tied head is the trunk's and is never copied)."""
    blocks = parts.blocks[len(parts.blocks) - k :]
    head = parts.head if with_head and not parts.head_is_tied() else None
    with torch.no_grad():
        return Branch(
            [copy.deepcopy(b) for b in blocks],
            copy.deepcopy(parts.norm),
            None if head is None else copy.deepcopy(head),
        )


@contextmanager
def swapped(policy: nn.Module, parts: Anatomy, branch: Branch, training: bool) -> Iterator[None]:
    """The policy (whose parts are ``parts``) with ``branch`` in place of its own top blocks,
    norm (and head when the branch has one), every module in train mode ``training``, for the
    length of the block; the policy's own modules and modes are put back afterwards (also on an
    error)."""
    first = len(parts.blocks) - len(branch.blocks)
    originals = [parts.blocks[first + i] for i in range(len(branch.blocks))]
    norm, head = parts.norm, parts.head
    modes = [(module, module.training) for module in (*policy.modules(), *branch.modules())]
    try:
        for i, block in enumerate(branch.blocks):
            parts.blocks[first + i] = block
        setattr(parts.norm_owner, parts.norm_name, branch.norm)
        if branch.head is not None and parts.head_owner is not None and parts.head_name is not None:
            setattr(parts.head_owner, parts.head_name, branch.head)
        for module, _ in modes:
            module.training = training
        yield
    finally:
        for i, block in enumerate(originals):
            parts.blocks[first + i] = block
        setattr(parts.norm_owner, parts.norm_name, norm)
        if head is not None and parts.head_owner is not None and parts.head_name is not None:
            setattr(parts.head_owner, parts.head_name, head)
        for module, mode in modes:
            module.training = mode


def decoder_of(model: nn.Module) -> nn.Module:
    """The model's decoder (its hidden states, before any head): ``model.model`` for Llama."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(decoder, nn.Module):
        raise ConfigError(
            f"backend.num_layers_unfrozen: {type(model).__name__} has no decoder to branch from"
        )
    return decoder


class _Shared:
    """Holds the policy outside the module tree: a hydra head's ``parameters()`` and
    ``state_dict()`` are its branch alone, so nothing counts, saves or optimizes the trunk twice."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.parts = anatomy(policy)
        self.decoder = decoder_of(policy)


class BranchedDecoder(nn.Module):
    """The policy's decoder run with ``branch`` swapped in: the hidden states of a hydra head."""

    def __init__(self, policy: nn.Module, branch: Branch) -> None:
        super().__init__()
        self._shared = _Shared(policy)
        self.branch = branch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shared = self._shared
        with swapped(shared.policy, shared.parts, self.branch, self.training):
            return shared.decoder(*args, **kwargs)


class HydraReference(nn.Module):
    """The reference: the policy's frozen trunk plus a frozen copy of its initial top ``k``
    blocks, norm and (untied) head. It looks like a causal LM to the backend (``model`` is its
    decoder, ``get_output_embeddings`` its head, ``forward`` returns logits) and always runs in
    eval mode."""

    def __init__(self, policy: nn.Module, branch: Branch) -> None:
        super().__init__()
        branch.requires_grad_(False)
        self.model = BranchedDecoder(policy, branch)
        self.eval()

    @property
    def policy(self) -> nn.Module:
        return self.model._shared.policy

    @property
    def branch(self) -> Branch:
        return self.model.branch

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module | None:
        if self.branch.head is not None:
            return self.branch.head
        get_output = getattr(self.policy, "get_output_embeddings", None)
        head: nn.Module | None = get_output() if callable(get_output) else None
        return head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shared = self.model._shared
        with swapped(shared.policy, shared.parts, self.branch, False):
            return shared.policy(*args, **kwargs)

    def train(self, mode: bool = True) -> HydraReference:
        return super().train(False)  # frozen: always scored as in eval mode


class HydraCritic(nn.Module):
    """A value model branching from the policy's trunk: its own trainable copy of the initial top
    ``k`` blocks and norm, and a scalar ``score`` head read at every token. It looks like a one-head
    sequence scorer to the backend (``base_model_prefix``/``model`` its decoder, ``score`` its
    head); its state dict is its branch and head alone."""

    base_model_prefix = "model"

    def __init__(self, policy: nn.Module, branch: Branch) -> None:
        super().__init__()
        branch.requires_grad_(True)
        self.model = BranchedDecoder(policy, branch)
        config: Any = policy.config
        first = next(policy.parameters())
        self.score = nn.Linear(int(config.hidden_size), 1, bias=False, device=first.device, dtype=first.dtype)
        # transformers' initialisation of a fresh sequence-classifier head.
        nn.init.normal_(self.score.weight, std=float(getattr(config, "initializer_range", 0.02)))

    @property
    def config(self) -> Any:
        return self.model._shared.policy.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self.model(*args, **kwargs).last_hidden_state
        return self.score(hidden)


@dataclass
class _BuiltPolicy:
    section: ModelConfig
    policy: nn.Module
    parts: Anatomy
    versions: list[tuple[torch.Tensor, int]]  # the branch's tensors and their version at build

    def unchanged(self) -> bool:
        """No in-place write (an optimizer step, a checkpoint load) reached the policy's top
        since it was built: a copy of it now is a copy of the initial weights."""
        return all(tensor._version == version for tensor, version in self.versions)


class HydraBackend(HFBackend):
    """The ``hf`` backend with ``num_layers_unfrozen`` (see the module docstring)."""

    def __init__(self, run: RunConfig) -> None:
        super().__init__(run)
        with_lora = [where for where, section in model_sections(run) if section.lora is not None]
        if with_lora:
            raise ConfigError(
                f"backend.num_layers_unfrozen and {with_lora[0]}.lora are two ways to train part of "
                "the model: use one of them"
            )
        self.num_layers_unfrozen: int = int(self.cfg.num_layers_unfrozen or 0)
        self._policies: list[_BuiltPolicy] = []

    def build_model(self, role: str, model: ModelConfig | None = None) -> nn.Module:
        """A ``policy`` with its trunk frozen; a ``reference`` (or, with ``hydra_critic``, a
        ``critic``) of a hydra policy's model section as a head on that policy's trunk; anything
        else as the ``hf`` backend builds it."""
        section = model or self.run.model
        if role == "policy":
            policy = super().build_model(role, model)
            parts = freeze_trunk(policy, self.num_layers_unfrozen)
            self._policies.append(
                _BuiltPolicy(section, policy, parts, _versions(parts, self.num_layers_unfrozen))
            )
            return policy
        built = next((p for p in reversed(self._policies) if p.section == section), None)
        if built is not None and role == "reference":
            return HydraReference(built.policy, self._initial_branch(built, with_head=True))
        if built is not None and role == "critic" and self.cfg.hydra_critic:
            return HydraCritic(built.policy, self._initial_branch(built, with_head=False))
        return super().build_model(role, model)

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """A reward model to train, with the same top ``k`` blocks, norm and score head trained."""
        scorer = super().build_scorer(num_labels, label_names)
        freeze_trunk(scorer, self.num_layers_unfrozen)
        return scorer

    def _initial_branch(self, built: _BuiltPolicy, with_head: bool) -> Branch:
        """A copy of the policy's top as it was built: copied from the policy while no update
        has reached it, else from a fresh build of its model section (a resumed run)."""
        k = self.num_layers_unfrozen
        if built.unchanged():
            return copy_branch(built.parts, k, with_head)
        fresh = super().build_model("reference", built.section)
        return copy_branch(anatomy(fresh), k, with_head)


def _versions(parts: Anatomy, k: int) -> list[tuple[torch.Tensor, int]]:
    modules = [*parts.blocks[len(parts.blocks) - k :], parts.norm]
    if parts.head is not None:
        modules.append(parts.head)
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return [(t, t._version) for t in tensors]


def build_hf_backend(run: RunConfig) -> HFBackend:
    """The ``hf`` backend's factory: ``HydraBackend`` when ``num_layers_unfrozen`` is set."""
    if getattr(run.backend, "num_layers_unfrozen", None):
        return HydraBackend(run)
    return HFBackend(run)
