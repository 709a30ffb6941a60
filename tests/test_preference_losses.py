"""Each preference loss against a hand computation on fixed log-probs, and its gradient where the
direction is the point. Expected numbers come from the papers' formulas evaluated with ``math``.

The fixed batch (two pairs; log-probs are sums over completion tokens):
  chosen    -10, -8   (lengths 5, 4)     ref chosen   -11, -8.5
  rejected  -12, -7   (lengths 6, 2)     ref rejected -11.5, -7.5
so h_w = (1, 0.5), h_l = (-0.5, 0.5), z = h_w - h_l = (1.5, 0); reward gap g = (1, 0.5).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import PAIRED_LOSSES, REFERENCE_FREE_LOSSES

import align
from align.loading import validate_run_config

PAIRED = list(PAIRED_LOSSES)
REFERENCE_FREE = list(REFERENCE_FREE_LOSSES)


def registry() -> align.Registry:
    return align.load_plugins().registry


def batch(**values: Any) -> align.PreferenceBatch:
    """The fixed batch above, any field replaced; policy log-probs require grad."""
    fields: dict[str, Any] = {
        "chosen_logps": [-10.0, -8.0],
        "rejected_logps": [-12.0, -7.0],
        "chosen_lengths": [5, 4],
        "rejected_lengths": [6, 2],
        "ref_chosen_logps": [-11.0, -8.5],
        "ref_rejected_logps": [-11.5, -7.5],
        "reward_gap": [1.0, 0.5],
    } | values
    tensors = {k: None if v is None else torch.tensor(v) for k, v in fields.items()}
    for key in ("chosen_logps", "rejected_logps"):
        tensors[key] = tensors[key].requires_grad_()
    return align.PreferenceBatch(**tensors)


def run(name: str, b: align.PreferenceBatch | None = None, **params: Any) -> tuple[float, align.LossOutput]:
    entry = registry().get("loss", name)
    out: align.LossOutput = entry.factory(entry.config(name=name, **params), b or batch())
    return float(out.loss.detach()), out


def grads(name: str, b: align.PreferenceBatch, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d chosen_logps and d loss / d rejected_logps."""
    _, out = run(name, b, **params)
    d_chosen, d_rejected = torch.autograd.grad(
        out.loss, [b.chosen_logps, b.rejected_logps], allow_unused=True, materialize_grads=True
    )
    return d_chosen, d_rejected


# name, params, expected loss on the fixed batch (beta 0.5 unless said)
CASES = [
    # mean -log s(0.5 z)
    ("dpo", {"beta": 0.5}, 0.5400090933374226),
    # mean -(0.8) log s(0.5 z) - 0.2 log s(-0.5 z) = dpo + 0.2 * mean(0.5 z)
    ("cdpo", {"beta": 0.5, "label_smoothing": 0.2}, 0.6150090933374226),
    # mean [-(0.8) log s(0.5 z) + 0.2 log s(-0.5 z)] / 0.6
    ("robust", {"beta": 0.5, "label_smoothing": 0.2}, 0.41500909333742264),
    # mean (z - 1)^2 = ((0.5)^2 + 1) / 2
    ("ipo", {"beta": 0.5}, 0.625),
    # mean max(0, 1 - 0.5 z) = (0.25 + 1) / 2
    ("hinge", {"beta": 0.5}, 0.625),
    # mean s(0.5z)[log s(0.5z) - log 0.99] + s(-0.5z)[log s(-0.5z) - log 0.01]
    ("exo_pair", {"beta": 0.5, "label_smoothing": 0.01}, 1.2356193811230747),
    # mean -log s(r_w) - log s(-r_w)/2 - log s(-r_l)/2, r = 0.5 h
    ("nca_pair", {"beta": 0.5}, 1.3254820129836347),
    # delta = mean(0.5, 0.25, -0.25, 0.25) = 0.1875; mean -log s(r_w - delta) - log s(delta - r_l)
    ("bco_pair", {"beta": 0.5}, 1.2172300872502972),
    # mean (h_w - 1)^2 + (h_l + 1)^2 = ((0 + 0.25) + (0.25 + 2.25)) / 2
    ("sppo_hard", {"beta": 0.5}, 1.375),
    # mean s(r_l) - s(r_w)
    ("apo_zero", {"beta": 0.5}, -0.09231791604382633),
    # mean s(r_w) - s(r_w - r_l)
    ("apo_down", {"beta": 0.5}, 0.002728566456129844),
    # mean (0.5 z - 2 g)^2 = ((0.75 - 2)^2 + (0 - 1)^2) / 2
    ("rpo_sq", {"beta": 0.5, "eta": 2.0}, 1.28125),
    # mean KL(Bern(s(2g)) || Bern(s(0.5z)))
    ("rpo_bwd_kl", {"beta": 0.5, "eta": 2.0}, 0.11094170710800386),
    # mean KL(Bern(s(0.5z)) || Bern(s(2g)))
    ("rpo_fwd_kl", {"beta": 0.5, "eta": 2.0}, 0.13059906895855453),
    # mean -log s(0.5 (logp_w - logp_l)) + 0.5 * 18/9
    ("cpo", {"beta": 0.5, "alpha": 0.5}, 1.6436693358491647),
    # 18/9 + 0.25 * mean -log s(log odds(-2) - log odds(m_l)), m_l = (-2, -3.5)
    ("orpo", {"beta": 0.25}, 2.1093231529575194),
    # -(-10 - 8) / (5 + 4)
    ("sft", {}, 2.0),
]


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=[c[0] for c in CASES])
def test_loss_matches_hand_computation(name: str, params: dict[str, Any], expected: float) -> None:
    value, out = run(name, **params)
    assert value == pytest.approx(expected, rel=1e-5)
    assert all(
        torch.as_tensor(v).numel() == 1 and not torch.as_tensor(v).requires_grad for v in out.metrics.values()
    )


def test_aot_matches_sorted_quantiles_not_pairs() -> None:
    # policy rho = logp_w - logp_l = (3, 0), reference (0, 2): pair by pair the second pair is
    # a violation (gap -2), but sorted the quantiles (0, 3) dominate (0, 2): gaps (0, 1).
    b = batch(
        chosen_logps=[0.0, 0.0],
        rejected_logps=[-3.0, 0.0],
        ref_chosen_logps=[0.0, 0.0],
        ref_rejected_logps=[0.0, -2.0],
    )
    value, out = run("aot", b, beta=0.5)
    assert value == pytest.approx((math.log(2) - math.log(1 / (1 + math.exp(-0.5)))) / 2, rel=1e-6)
    assert value == pytest.approx(0.5836120823700259, rel=1e-6)
    assert float(out.metrics["dominance_violation"]) == 0.0
    assert run("aot", batch(), beta=0.5)[0] == pytest.approx(0.5400090933374226, rel=1e-5)


def test_bco_reports_the_batch_reward_shift() -> None:
    _, out = run("bco_pair", beta=0.5)
    assert float(out.metrics["delta"]) == pytest.approx(0.1875)


def test_robust_without_noise_is_dpo() -> None:
    assert run("robust", beta=0.5, label_smoothing=0.0)[0] == pytest.approx(run("dpo", beta=0.5)[0])


# APO-down lowers the chosen by design; SFT ignores the rejected (both tested below)
@pytest.mark.parametrize("name", [n for n in PAIRED + REFERENCE_FREE if n not in ("apo_down", "sft")])
def test_descent_raises_chosen_and_lowers_rejected(name: str) -> None:
    # at z = 0 with a positive reward gap, every loss wants the chosen up and the rejected down
    b = batch(
        chosen_logps=[-10.0, -8.0],
        rejected_logps=[-10.5, -8.5],
        ref_chosen_logps=[-10.0, -8.0],
        ref_rejected_logps=[-10.5, -8.5],
    )
    d_chosen, d_rejected = grads(name, b)
    assert (d_chosen < 0).all() and (d_rejected > 0).all()


def test_sft_only_raises_chosen() -> None:
    d_chosen, d_rejected = grads("sft", batch())
    assert torch.allclose(d_chosen, torch.tensor(-1 / 9)) and (d_rejected == 0).all()


def test_bounded_targets_push_back_past_their_margin() -> None:
    # far past the target margin (z = 110 nats, beta 0.1), these lower the chosen likelihood again
    far = {
        "chosen_logps": [60.0],
        "rejected_logps": [-50.0],
        "ref_chosen_logps": [0.0],
        "ref_rejected_logps": [0.0],
        "chosen_lengths": [1],
        "rejected_lengths": [1],
        "reward_gap": [1.0],
    }
    for name in ("ipo", "cdpo", "exo_pair", "sppo_hard", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):
        d_chosen, _ = grads(name, batch(**far))
        assert (d_chosen > 0).all(), name
    d_chosen, _ = grads("dpo", batch(**far))
    assert (d_chosen < 0).all()  # DPO never stops pushing


def test_apo_down_lowers_the_chosen_once_the_pair_is_separated() -> None:
    # r_w = 2, r_l = -20: APO-down pushes the chosen likelihood down, APO-zero up
    b = {
        "chosen_logps": [2.0],
        "rejected_logps": [-20.0],
        "ref_chosen_logps": [0.0],
        "ref_rejected_logps": [0.0],
        "chosen_lengths": [1],
        "rejected_lengths": [1],
    }
    d_chosen, d_rejected = grads("apo_down", batch(**b), beta=1.0)
    assert (d_chosen > 0).all() and (d_rejected >= 0).all()
    d_chosen, _ = grads("apo_zero", batch(**b), beta=1.0)
    assert (d_chosen < 0).all()


def test_nca_raises_the_chosen_even_when_the_pair_is_separated() -> None:
    # DPO's gradient on the chosen vanishes when z is large; NCA's anchors r_w itself
    b = dict(
        chosen_logps=[-1.0],
        rejected_logps=[-100.0],
        ref_chosen_logps=[-1.0],
        ref_rejected_logps=[-50.0],
        chosen_lengths=[1],
        rejected_lengths=[1],
    )
    nca_chosen, _ = grads("nca_pair", batch(**b), beta=0.5)
    dpo_chosen, _ = grads("dpo", batch(**b), beta=0.5)
    assert float(nca_chosen) < -0.1 and abs(float(dpo_chosen)) < 1e-6


@pytest.mark.parametrize("name", ["rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_rpo_without_reward_scores_is_a_clear_error(name: str) -> None:
    with pytest.raises(align.ConfigError, match=r"chosen_reward.*rejected_reward"):
        run(name, batch(reward_gap=None))


@pytest.mark.parametrize("name", PAIRED)
def test_reference_losses_need_reference_logps(name: str) -> None:
    with pytest.raises(ValueError, match="reference"):
        run(name, batch(ref_chosen_logps=None, ref_rejected_logps=None))


def test_every_loss_registered_once_with_its_reference_need() -> None:
    reg = registry()
    assert not reg.broken
    names = reg.names("loss")
    assert len(names) == len(set(names))
    assert set(PAIRED + REFERENCE_FREE) <= set(names)
    for entry in reg.entries("loss"):
        if entry.name in PAIRED + REFERENCE_FREE:
            assert entry.package == "align-dpo"
            assert entry.meta["needs_reference"] is (entry.name in PAIRED)
            assert entry.meta["batch"] is align.PreferenceBatch
    assert "simpo" not in [e.name for e in reg.entries("loss") if e.package == "align-dpo"]


def test_registering_the_family_twice_is_an_error_but_simpo_fits_beside_it() -> None:
    from align.registry import DuplicateRegistration, Registry
    from align_dpo.losses import register_losses

    reg = Registry()
    register_losses(reg.register_callable("loss", "align-dpo", "0"))
    with pytest.raises(DuplicateRegistration, match="align-dpo"):
        register_losses(reg.register_callable("loss", "again", "0"))

    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples/plugins/align-simpo/src/align_simpo/__init__.py"
    spec = importlib.util.spec_from_file_location("align_simpo_example", path)
    assert spec is not None and spec.loader is not None
    simpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simpo)
    fresh = Registry()
    register_losses(fresh.register_callable("loss", "align-dpo", "0"))
    simpo.register_losses(fresh.register_callable("loss", "align-simpo", "0"))
    assert "simpo" in fresh.names("loss")


def test_weighted_list_is_the_weighted_sum() -> None:
    reg = registry()
    cfg = validate_run_config(
        {
            "algo": "dpo",
            "data": {"train": "unused.jsonl"},
            "loss": [{"name": "dpo", "weight": 1}, {"name": "sft", "weight": 0.2}],
        },
        reg,
    )
    losses = align.resolve_losses(cfg.loss, reg)  # type: ignore[attr-defined]
    assert [(t.config.name, t.config.weight, t.needs_reference) for t in losses] == [
        ("dpo", 1.0, True),
        ("sft", 0.2, False),
    ]
    out = align.combine_losses(losses, batch())
    dpo_value = sum(-math.log(1 / (1 + math.exp(-0.1 * z))) for z in (1.5, 0.0)) / 2  # beta 0.1
    assert float(out.loss.detach()) == pytest.approx(dpo_value + 0.2 * 2.0, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(1.0570521141747387, rel=1e-6)
    assert float(out.metrics["dpo/loss"]) == pytest.approx(dpo_value, rel=1e-6)
    assert float(out.metrics["sft/loss"]) == pytest.approx(2.0)
