"""LoRA adapters on the megatron backend's tensor-parallel linear layers.

``model.lora`` with ``backend.name: megatron`` puts a low-rank adapter beside each targeted
``ColumnParallelLinear`` / ``RowParallelLinear`` of the GPTModel (``W' = W + (alpha / r) B A``,
Hu et al. 2021, eq. 3), sharded like its base layer:

- column-parallel base (``linear_qkv``, ``linear_fc1``; output rows split over TP): ``A``
  (``r x d_in``) whole on every TP rank, ``B`` split by rows exactly as ``W`` is;
- row-parallel base (``linear_proj``, ``linear_fc2``; input columns split): ``A`` split by
  columns exactly as ``W`` is, ``B`` (``d_out x r``) whole on every TP rank.

So ``B @ A`` on a rank is that rank's shard of the whole update, merging is one add per shard,
and the HF conversion's own splitting maps a merged shard (or an adapter matrix) to HF names.

PEFT's own megatron support (``LoraConfig(megatron_config=...)``, ``LoraParallelLinear``) does
not build with peft 0.21.2 and megatron-core 0.16.1: its dispatcher reads a ``fan_in_fan_out``
key the LoRA model never passes (KeyError), and built by hand the layer fails in its
initialisation (``lora_bias`` is never set for it); its forward also treats the (output, bias)
pairs megatron's parallel layers return as tensors. Hence this small wrapper (see
docs/megatron.md#lora).

The adapter sits on its base layer as a child module (``<layer>.lora``) and a forward hook adds
its output, so every megatron name of the base model stays as it was (the conversion, the TP
sharded state and the pipeline's stage names need no change).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import align
from align_megatron.conversion import (
    HF_LAYER,
    LAYER,
    LlamaLayout,
    hf_tensors,
    megatron_shard,
    stage_local_name,
    stage_of,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
# final/ holds the merged HF model; the adapter in PEFT's format goes beside it in this folder
# (not in final/ itself: transformers would then load final/ as an adapter of another model).
ADAPTER_DIR = "adapter"
# Marks an adapter matrix every TP rank holds whole (the backend counts it once in the
# gradient norm and, with sequence parallelism, sums its gradient over the TP group).
REPLICATED = "align_replicated_over_tp"
PEFT_PREFIX = "base_model.model."
# A sequence scorer's head (trained in full beside the adapters), as PEFT's SEQ_CLS adapter
# names it (its ``modules_to_save``).
PEFT_HEAD = f"{PEFT_PREFIX}score.weight"

# The HF module names users target, by the fused megatron layer holding them, in the order the
# layer stacks them.
FUSED: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}
HF_MODULE = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
COLUMN_PARALLEL = ("self_attention.linear_qkv", "mlp.linear_fc1")


def megatron_targets(lora: align.LoraConfig, where: str = "model") -> list[str]:
    """The fused megatron layers (``self_attention.linear_qkv``...) ``lora.target_modules``
    names, in HF names (``q_proj``...) or megatron's (``linear_qkv``...). A fused layer is adapted
    as a whole (one ``A``, one ``B`` over its stacked outputs), so it must be named whole: ``q_proj``
    without ``k_proj`` and ``v_proj`` is a ConfigError (adapting k and v too would train more than
    asked; masking them out of the fused ``B`` is not built)."""
    if lora.modules_to_save:
        raise align.ConfigError(
            f"{where}.lora.modules_to_save: not supported on backend megatron (adapters only)"
        )
    if isinstance(lora.target_modules, str):
        if lora.target_modules != "all-linear":
            raise align.ConfigError(
                f"{where}.lora.target_modules: '{lora.target_modules}': on backend megatron, "
                "'all-linear' or a list of module names (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                "up_proj, down_proj, or megatron's linear_qkv, linear_proj, linear_fc1, linear_fc2)"
            )
        return list(FUSED)
    named = set(lora.target_modules)
    targets = []
    for layer, members in FUSED.items():
        short = layer.rsplit(".", 1)[1]
        wanted = named & {*members, short}
        named -= wanted
        if not wanted:
            continue
        missing = [m for m in members if m not in wanted]
        if short not in wanted and missing:
            raise align.ConfigError(
                f"{where}.lora.target_modules: {', '.join(sorted(wanted))} without {', '.join(missing)}: "
                f"on backend megatron they are one fused layer ({short}), adapted as a whole; "
                f"name all of {', '.join(members)} (or {short})"
            )
        targets.append(layer)
    if named:
        raise align.ConfigError(
            f"{where}.lora.target_modules: {', '.join(sorted(named))}: no such linear layer on backend "
            f"megatron; known: {', '.join(HF_MODULE)} (or {', '.join(f.rsplit('.', 1)[1] for f in FUSED)})"
        )
    return targets


class Adapter(nn.Module):
    """``scale * B @ A`` beside one tensor-parallel linear layer (see the module docstring for
    which matrix is split). Float32 whatever the base weights' dtype (as PEFT keeps them)."""

    def __init__(
        self, base: Any, column: bool, r: int, alpha: int, dropout: float, par: Any, sp: bool
    ) -> None:
        super().__init__()
        out_local, in_local = base.weight.shape
        self.column, self.r, self.scale, self.p = column, r, alpha / r, dropout
        self.tp, self.tp_rank, self.sp = par.tp, par.tp_rank, sp and par.tp > 1
        self.in_features = in_local if column else in_local * par.tp
        device = base.weight.device
        a_cols, b_rows = (self.in_features, out_local) if column else (in_local, out_local)
        self.A = nn.Parameter(torch.zeros(r, a_cols, device=device))
        self.B = nn.Parameter(torch.zeros(b_rows, r, device=device))
        setattr(self.A if column else self.B, REPLICATED, True)
        self.enabled = True

    def delta(self) -> Tensor:
        """This rank's shard of ``scale * B @ A``, in the base weight's layout."""
        return (self.B @ self.A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """The adapter's addition to the base layer's output on ``x`` (the base layer's input)."""
        from megatron.core.tensor_parallel import mappings

        h = self._dropped(x.to(self.A.dtype))
        a = h @ self.A.t()
        if self.column:
            # A's output meets B's row shards: each TP rank's grad of it is partial.
            if self.sp:  # x is this rank's part of the sequence; B reads all of it
                a = mappings.gather_from_sequence_parallel_region(a)
            elif self.tp > 1:
                a = mappings.copy_to_tensor_model_parallel_region(a)
        elif self.sp:  # partial sums over the input columns, then split over the sequence
            a = mappings.reduce_scatter_to_sequence_parallel_region(a)
        elif self.tp > 1:
            a = mappings.reduce_from_tensor_model_parallel_region(a)
        out: Tensor = (a @ self.B.t()) * self.scale
        return out

    def _dropped(self, h: Tensor) -> Tensor:
        """Dropout whose mask does not depend on TP: drawn for the whole input (every rank draws
        the same numbers, as one process at TP=1 does) and cut to this rank's part of it."""
        if not self.training or self.p == 0:
            return h
        shape = list(h.shape)
        if self.column and self.sp:
            shape[0] *= self.tp  # [sequence / TP, rows, hidden]
        elif not self.column:
            shape[-1] *= self.tp  # [sequence, rows, d_in / TP]
        keep = torch.empty(shape, device=h.device).bernoulli_(1 - self.p)
        if self.column and self.sp:
            keep = keep.chunk(self.tp, dim=0)[self.tp_rank]
        elif not self.column:
            keep = keep.chunk(self.tp, dim=-1)[self.tp_rank]
        return h * keep / (1 - self.p)


def _add_adapter(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    adapter: Adapter = module.lora  # type: ignore[assignment]
    if not adapter.enabled:
        return output
    result, bias = output
    return (result + adapter(args[0]).to(result.dtype), bias)


def attach(meg: Any, lora: align.LoraConfig, targets: Sequence[str], par: Any, sp: bool, seed: int) -> None:
    """Freeze ``meg`` (a MegatronModel) and put an adapter on each of its ``targets`` layers
    (every layer of this pipeline stage). ``A`` starts as PEFT's (kaiming-uniform with a=sqrt(5),
    i.e. uniform in +-1/sqrt(d_in)), drawn whole from ``seed`` and cut to this rank's shard, so
    every TP layout starts from the same adapter; ``B`` starts at zero (the model is unchanged)."""
    meg.requires_grad_(False)
    for name, layer in adapted_layers(meg, targets, attached=False):
        layer.add_module(
            "lora", Adapter(layer, name.endswith(COLUMN_PARALLEL), lora.r, lora.alpha, lora.dropout, par, sp)
        )
        layer.register_forward_hook(_add_adapter)
    # Every layer's A is drawn, in the whole model's order, on every pipeline stage (each keeps
    # its own layers'), so that PP > 1 starts from the same adapters as PP = 1.
    held = global_adapter_names(meg, targets)
    widths = {name.split(".", 3)[-1]: adapter_of(meg, name).in_features for name in held}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(meg.layout.num_layers):
            for target in targets:
                bound = 1 / math.sqrt(widths[target])
                a = torch.empty(lora.r, widths[target]).uniform_(-bound, bound, generator=generator)
                name = f"{LAYER}{i}.{target}"
                if name in held:
                    adapter = adapter_of(meg, name)
                    adapter.A.copy_(a if adapter.column else a.chunk(par.tp, dim=1)[par.tp_rank])


def adapted_layers(
    meg: Any, targets: Sequence[str], attached: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """(stage-local name, layer) of each targeted linear layer this stage holds."""
    for name, module in meg.gpt.named_modules():
        if name.startswith(LAYER) and name.split(".", 3)[-1] in targets:
            if attached and not isinstance(getattr(module, "lora", None), Adapter):
                continue
            yield name, module


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, Adapter) for m in model.modules())


def adapters(model: nn.Module) -> list[Adapter]:
    return [m for m in model.modules() if isinstance(m, Adapter)]


def global_adapter_names(meg: Any, targets: Sequence[str]) -> list[str]:
    """The whole-model names (``decoder.layers.{i}.<target>``) of the adapted layers on this
    stage."""
    layout: LlamaLayout = meg.layout
    names = []
    for i in range(layout.num_layers):
        for target in targets:
            name = f"{LAYER}{i}.{target}"
            if stage_of(f"{name}.weight", layout, meg.stages) == meg.stage:
                names.append(name)
    return names


def adapter_of(meg: Any, global_name: str) -> Adapter:
    local = stage_local_name(f"{global_name}.weight", meg.layout, meg.stages).removesuffix(".weight")
    adapter: Adapter = meg.gpt.get_submodule(f"{local}.lora")
    return adapter


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every adapter off and in eval mode (as a frozen reference is): exactly the
    base model. Each module's train/eval mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    found = adapters(model)
    model.eval()
    try:
        for adapter in found:
            adapter.enabled = False
        yield model
    finally:
        for adapter in found:
            adapter.enabled = True
        for module, mode in modes:
            module.training = mode


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` holding merged weights for the length of the block: each adapted layer's weight
    (where its adapter is on) is a new ``W + scale * B @ A`` parameter and its adapter is off;
    the original parameter objects are put back after (no arithmetic on the trained weights)."""
    swapped: list[tuple[nn.Module, nn.Parameter, Adapter]] = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                adapter = getattr(layer, "lora", None)
                if not isinstance(adapter, Adapter) or not adapter.enabled:
                    continue  # (a disabled adapter: a reference view's weights are the base's)
                weight: nn.Parameter = layer.weight  # type: ignore[assignment]
                layer.weight = nn.Parameter(weight + adapter.delta().to(weight.dtype), requires_grad=False)
                adapter.enabled = False
                swapped.append((layer, weight, adapter))
        yield model
    finally:
        for layer, weight, adapter in swapped:
            layer.weight = weight
            adapter.enabled = True


# ---- the adapter in PEFT's format, under HF names ------------------------------------------


def peft_tensors(
    meg: Any, targets: Sequence[str], gather: Any, head: Tensor | None = None
) -> dict[str, Tensor]:
    """The whole adapter as PEFT names it on the HF model (``base_model.model.model.layers.{i}.
    self_attn.q_proj.lora_A.weight``...): a fused layer's ``A`` is every member's ``A``, its
    ``B`` split by the conversion's own rules (q/k/v per query group, gate/up). ``gather(name,
    tensor)`` returns the TP shards of an adapter matrix (from the stage holding it). A
    sequence scorer's whole ``head`` goes with it (``base_model.model.score.weight``)."""
    out: dict[str, Tensor] = {} if head is None else {PEFT_HEAD: head}
    for i in range(meg.layout.num_layers):
        for target in targets:
            name = f"{LAYER}{i}.{target}"
            column = target in COLUMN_PARALLEL
            a_shards, b_shards = gather(name, "A"), gather(name, "B")
            split, whole = (b_shards, a_shards[0]) if column else (a_shards, b_shards[0])
            for hf_name, part in hf_tensors(f"{name}.weight", split, meg.layout):
                module = PEFT_PREFIX + hf_name.removesuffix(".weight")
                a, b = (whole, part) if column else (part, whole)
                # Copies: a fused layer's members each get their own shared matrix's copy.
                out[f"{module}.lora_A.weight"] = a.clone()
                out[f"{module}.lora_B.weight"] = b.clone()
    return out


def load_peft_tensors(
    meg: Any, targets: Sequence[str], saved: dict[str, Tensor], source: Path, par: Any
) -> None:
    """Set this rank's adapter shards from ``peft_tensors``' names. The members of a fused layer
    must share one ``A`` (an adapter trained on HF with separate q/k/v ``A`` cannot be fused).
    A sequence scorer's head is set too (on the last stage, which holds it)."""
    expected = set(peft_tensors_names(meg.layout, targets))
    if set(saved) != expected:
        raise RuntimeError(
            f"adapter {source} does not match the model's LoRA settings: missing "
            f"{sorted(expected - set(saved))[:4]}, unexpected {sorted(set(saved) - expected)[:4]}"
        )
    with torch.no_grad():
        for name in global_adapter_names(meg, targets):
            target = name.split(".", 3)[-1]
            layer = int(name.split(".")[2])
            members = [f"{PEFT_PREFIX}{HF_LAYER}{layer}.{HF_MODULE[m]}" for m in FUSED[target]]
            column = target in COLUMN_PARALLEL
            shared = "lora_A" if column else "lora_B"
            first = saved[f"{members[0]}.{shared}.weight"]
            for member in members[1:]:
                if not torch.equal(saved[f"{member}.{shared}.weight"], first):
                    raise RuntimeError(
                        f"adapter {source}: {member} and {members[0]} have different {shared}: "
                        f"they are one fused layer ({target}) on backend megatron"
                    )
            split = "lora_B" if column else "lora_A"

            def get(hf_name: str, split: str = split) -> Tensor:
                return saved[f"{PEFT_PREFIX}{hf_name.removesuffix('.weight')}.{split}.weight"]

            shard = megatron_shard(f"{name}.weight", get, meg.layout, par.tp_rank, par.tp)
            adapter = adapter_of(meg, name)
            a, b = (first, shard) if column else (shard, first)
            for param, value in ((adapter.A, a), (adapter.B, b)):
                if param.shape != value.shape:
                    raise RuntimeError(
                        f"adapter {source}: {name} {tuple(value.shape)} != {tuple(param.shape)}"
                    )
                param.copy_(value)
        if meg.score is not None:
            head = saved[PEFT_HEAD]
            if head.shape != meg.score.weight.shape:
                raise RuntimeError(
                    f"adapter {source}: score {tuple(head.shape)} != {tuple(meg.score.weight.shape)}"
                )
            meg.score.weight.copy_(head)


def peft_tensors_names(layout: LlamaLayout, targets: Sequence[str]) -> list[str]:
    names = [PEFT_HEAD] if layout.is_scorer else []
    for i in range(layout.num_layers):
        for target in targets:
            for member in FUSED[target]:
                module = f"{PEFT_PREFIX}{HF_LAYER}{i}.{HF_MODULE[member]}"
                names += [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
    return names


def write_peft_adapter(
    path: Path, tensors: dict[str, Tensor], lora: align.LoraConfig, targets: Sequence[str], base: str
) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT writes them, so that
    ``PeftModel.from_pretrained(base_model, path)`` loads the adapter on the HF model: a causal
    LM's (``CAUSAL_LM``), or with the head a sequence classifier's (``SEQ_CLS``, the head in
    ``modules_to_save``, trained in full)."""
    scorer = PEFT_HEAD in tensors
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if scorer else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(m for t in targets for m in FUSED[t]),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": ["score"] if scorer else None,
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_peft_adapter(path: Path) -> dict[str, Tensor]:
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise RuntimeError(f"checkpoint {path} has no {ADAPTER_FILE}: it was not saved by a LoRA run")
    return load_file(file)


# ---- the backend ----------------------------------------------------------------------------


class AdaptersOff(nn.Module):
    """The reference a LoRA run builds instead of a second copy: the policy with its adapters
    off. It holds no parameters of its own (the policy is kept outside the module tree, so that
    nothing counts or moves its weights twice); the backend runs it through ``adapters_off``."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._shared = (policy,)
        self.eval()

    @property
    def policy(self) -> nn.Module:
        return self._shared[0]

    def train(self, mode: bool = True) -> AdaptersOff:
        return super().train(False)  # frozen: always scored as in eval mode


@contextmanager
def runnable(model: nn.Module) -> Iterator[nn.Module]:
    """The module the megatron backend runs for ``model``: a reference view's policy with its
    adapters off, anything else as it is."""
    if isinstance(model, AdaptersOff):
        with adapters_off(model.policy) as base:
            yield base
        return
    yield model


class MegatronLoraBackend:
    """The megatron backend with LoRA adapters on the trained model of every section with
    ``lora`` (``align_megatron.lora``): the policy, a reward model being trained, PPO's critic
    (a sequence scorer's head trains in full, as PEFT's SEQ_CLS does); the policy with its
    adapters off as the reference, adapters (and a scorer's head) alone in checkpoints, and
    merged weights for engines and ``final/``. What it does not define is the wrapped backend's
    (a method given a reference view runs the policy with adapters off)."""

    applies_lora = True

    def __init__(self, inner: Any, run: align.RunConfig) -> None:
        self.inner, self.run = inner, run
        self.tokenizer = inner.tokenizer
        self.is_main = inner.is_main
        # Every model with adapters, by the section it came from, and its adapted layers.
        self._adapted: list[tuple[align.ModelConfig, nn.Module, list[str]]] = []
        self._policies: list[tuple[align.ModelConfig, nn.Module]] = []  # references come from these

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if not args or not isinstance(args[0], nn.Module):
                return attribute(*args, **kwargs)
            with runnable(args[0]) as runs:
                return attribute(runs, *args[1:], **kwargs)

        return call

    # ---- building -----------------------------------------------------------------------
    def build_model(self, role: str, model: align.ModelConfig | None = None) -> nn.Module:
        section = model or self.run.model
        if role == "reference":
            for source, policy in reversed(self._policies):
                if source == section:
                    return AdaptersOff(policy)
            return self.inner.build_model(role, model)
        built = self.inner.build_model(role, model)
        if section.lora is None or role not in ("policy", "critic"):
            return built  # frozen roles (a reward model read, not trained) are never adapted
        self._adapt(built, section)  # (a critic's section is the run's model, or a copy of it)
        if role == "policy":
            self._policies.append((section, built))
        return built

    def build_policy(self) -> nn.Module:
        return self.build_model("policy")

    def build_reference(self) -> nn.Module:
        return self.build_model("reference")

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """The wrapped backend's trainable scorer (a reward model to train), with adapters on its
        trunk when the run's model section has ``lora``; its score head trains in full."""
        built = self.inner.build_scorer(num_labels, label_names)
        if self.run.model.lora is not None:
            self._adapt(built, self.run.model)
        return built

    def _adapt(self, built: Any, section: align.ModelConfig) -> None:
        """Freeze ``built`` and put adapters on its ``section.lora`` targets; a sequence
        scorer's head (on the last stage) stays trainable: it starts untrained, so adapters
        alone could not make it score (PEFT's SEQ_CLS trains it in full too)."""
        assert section.lora is not None
        if built.uses_te:
            raise align.ConfigError(
                "model.lora: backend megatron with TransformerEngine's layer spec fuses the norms "
                "into linear_qkv / linear_fc1, whose adapters would need the norm's output: LoRA "
                "runs with the local spec (no TransformerEngine) only yet"
            )
        targets = megatron_targets(section.lora)
        attach(built, section.lora, targets, self.inner.par, self.inner.cfg.sequence_parallel, self.run.seed)
        if built.score is not None:
            built.score.requires_grad_(True)
        self._adapted.append((section, built, targets))

    @contextmanager
    def reference_view(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The policy as its own reference for the length of a block (adapters off, eval mode)."""
        if not has_adapters(policy):
            raise TypeError(f"reference_view needs a LoRA policy, got {type(policy).__name__}")
        with adapters_off(policy) as base:
            yield base

    # ---- weights out --------------------------------------------------------------------
    def named_weights(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """HF-named full tensors with the adapters merged (what an engine's refit takes)."""
        with runnable(model) as runs, merged(runs) as weights:
            yield from self.inner.named_weights(weights)

    def save_merged(self, model: nn.Module, path: Path) -> None:
        with runnable(model) as runs, merged(runs) as weights:
            self.inner.save_merged(weights, path)

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        """The merged model as an HF folder (``final/``: ``from_pretrained`` and the engines load
        it) and, for a LoRA model, the adapter in PEFT's format in its ``adapter/``."""
        with runnable(model) as runs, merged(runs) as weights:
            self.inner.save_pretrained(weights, path)
        if has_adapters(model):
            self._save_adapter(model, path / ADAPTER_DIR)

    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        """A checkpoint of a LoRA model holds its adapter alone (PEFT's format, HF names, whole
        tensors: any TP/PP reads it back); the frozen base model is rebuilt from ``model.path``."""
        if not has_adapters(model):
            self.inner.save_checkpoint_weights(model, path)
            return
        self._save_adapter(model, path)

    def load_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        if not has_adapters(model):
            self.inner.load_checkpoint_weights(model, path)
            return
        self.load_weights(model, path)

    def save_checkpoint_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path
    ) -> bool:
        """A LoRA model's optimizer state (its adapters') is not sharded into the checkpoint: it
        stays in each rank's trainer state (False), so its resume keeps the TP/PP it was written
        at (``MegatronBackendConfig.resume_may_change``). Other models: the megatron backend's."""
        if has_adapters(model):
            return False
        return bool(self.inner.save_checkpoint_optimizer(model, optimizer, path))

    def load_weights(self, model: nn.Module, path: Path) -> None:
        if not has_adapters(model):
            self.inner.load_weights(model, path)
            return
        if not (path / ADAPTER_FILE).is_file() and (path / ADAPTER_DIR / ADAPTER_FILE).is_file():
            path = path / ADAPTER_DIR  # a final/ folder
        load_peft_tensors(model, self._targets(model), read_peft_adapter(path), path, self.inner.par)

    def _save_adapter(self, model: nn.Module, path: Path) -> None:
        """Every rank takes part (TP gathers, PP broadcasts); the main rank writes."""
        targets = self._targets(model)

        def gather(name: str, which: str) -> list[Tensor]:
            return self._gather(model, name, which)

        tensors = peft_tensors(model, targets, gather, self._head(model))
        if self.is_main:
            section = next(s for s, p, _ in self._adapted if p is model)
            assert section.lora is not None
            write_peft_adapter(path, tensors, section.lora, targets, section.path)

    def _targets(self, model: nn.Module) -> list[str]:
        for _, adapted, targets in self._adapted:
            if adapted is model:
                return targets
        raise TypeError("not a LoRA model this backend built")

    def _head(self, model: Any) -> Tensor | None:
        """A sequence scorer's whole head on every rank (from the last pipeline stage, which
        holds it; every TP rank holds it whole); None for a causal LM."""
        if not model.layout.is_scorer:
            return None
        from align_megatron.backend import _from_stage

        par = self.inner.par
        held = [model.score.weight.detach().contiguous()] * par.tp if par.last_stage else []
        if par.pp > 1:
            held = _from_stage(held, par.pp - 1, par, next(model.gpt.parameters()).dtype)
        head: Tensor = held[0].cpu()
        return head

    def _gather(self, model: Any, name: str, which: str) -> list[Tensor]:
        """The TP shards of adapter matrix ``which`` (A or B) of whole-model layer ``name``, on
        every rank (from the pipeline stage holding it)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from align_megatron.backend import _from_stage

        par = self.inner.par
        stage = stage_of(f"{name}.weight", model.layout, par.pp)
        shards: list[Tensor] = []
        if stage == par.pp_rank:
            adapter = adapter_of(model, name)
            local = getattr(adapter, which).detach().contiguous()
            split = (which == "B") == adapter.column
            shards = [local] * par.tp  # a whole matrix: the same on every TP rank
            if split and par.tp > 1:
                shards = [torch.empty_like(local) for _ in range(par.tp)]
                dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
        if par.pp > 1:
            shards = _from_stage(shards, stage, par, torch.float32)
        return [s.cpu() for s in shards]
