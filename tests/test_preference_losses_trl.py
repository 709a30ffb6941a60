"""The preference losses that make align's zoo a superset of TRL's (DiscoPOP, length-normalised
DPO, f-DPO, DPO-Positive, WPO, AOT unpaired; APO-zero unpaired and unpaired BCO on the KTO
side), each against a hand computation on fixed log-probs with ``math``.

The fixed paired batch is the one of test_preference_losses.py:
  chosen    -10, -8   (lengths 5, 4)     ref chosen   -11, -8.5
  rejected  -12, -7   (lengths 6, 2)     ref rejected -11.5, -7.5
so h_w = (1, 0.5), h_l = (-0.5, 0.5), z = h_w - h_l = (1.5, 0).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import align

PAIRED_VARIANTS = ("discopop", "sigmoid_norm", "f_dpo", "dpop", "wpo", "aot_unpaired", "ld_dpo")
UNPAIRED = ("apo_zero_unpaired", "bco")


def s(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_s(x: float) -> float:
    return math.log(s(x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


H_W, H_L = [1.0, 0.5], [-0.5, 0.5]
Z = [w - lo for w, lo in zip(H_W, H_L, strict=True)]


def registry() -> align.Registry:
    return align.load_plugins().registry


def paired(**values: Any) -> align.PreferenceBatch:
    fields: dict[str, Any] = {
        "chosen_logps": [-10.0, -8.0],
        "rejected_logps": [-12.0, -7.0],
        "chosen_lengths": [5, 4],
        "rejected_lengths": [6, 2],
        "ref_chosen_logps": [-11.0, -8.5],
        "ref_rejected_logps": [-11.5, -7.5],
    } | values
    tensors: dict[str, Any] = {k: torch.tensor(v) for k, v in fields.items()}
    for key in ("chosen_logps", "rejected_logps"):
        tensors[key] = tensors[key].requires_grad_()
    return align.PreferenceBatch(**tensors)


def run(name: str, b: Any, **params: Any) -> tuple[float, align.LossOutput]:
    entry = registry().get("loss", name)
    out: align.LossOutput = entry.factory(entry.config(name=name, **params), b)
    return float(out.loss.detach()), out


def discopop_term(rho: float, tau: float) -> float:
    m = s(rho / tau)
    return (1 - m) * -log_s(rho) + m * math.exp(-rho)


PAIRED_CASES = [
    ("discopop", {"beta": 0.5, "tau": 0.05}, mean([discopop_term(0.5 * z, 0.05) for z in Z])),
    ("discopop", {"beta": 0.5, "tau": 1.0}, mean([discopop_term(0.5 * z, 1.0) for z in Z])),
    # -log s(0.5 (h_w/|y_w| - h_l/|y_l|)) = -log s(0.5 (1/5 + 0.5/6)), -log s(0.5 (0.5/4 - 0.5/2))
    ("sigmoid_norm", {"beta": 0.5}, mean([-log_s(0.5 * (0.2 + 0.5 / 6)), -log_s(0.5 * (0.125 - 0.25))])),
    ("f_dpo", {"beta": 0.5}, mean([-log_s(0.5 * z) for z in Z])),
    (
        "f_dpo",
        {"beta": 0.5, "f_divergence_type": "forward_kl"},
        mean([-log_s(0.5 * (math.exp(-lo) - math.exp(-w))) for w, lo in zip(H_W, H_L, strict=True)]),
    ),
    (
        "f_dpo",
        {"beta": 0.5, "f_divergence_type": "js_divergence"},
        mean([-log_s(0.5 * (log_s(w) - log_s(lo))) for w, lo in zip(H_W, H_L, strict=True)]),
    ),
    (
        "f_dpo",
        {"beta": 0.5, "f_divergence_type": "alpha_divergence"},  # alpha 0.5: exp(-h/2) / -0.5
        mean(
            [
                -log_s(0.5 * (math.exp(-w / 2) - math.exp(-lo / 2)) / -0.5)
                for w, lo in zip(H_W, H_L, strict=True)
            ]
        ),
    ),
    # both chosen log-ratios are positive: no penalty, plain DPO
    ("dpop", {"beta": 0.5}, mean([-log_s(0.5 * z) for z in Z])),
    # w = exp(-10/5 - 12/6), exp(-8/4 - 7/2)
    ("wpo", {"beta": 0.5}, mean([math.exp(-4.0) * -log_s(0.75), math.exp(-5.5) * -log_s(0.0)])),
    # sorted h_w (0.5, 1), sorted h_l (-0.5, 0.5): gaps (1, 0.5)
    ("aot_unpaired", {"beta": 0.5}, mean([-log_s(0.5), -log_s(0.25)])),
    (
        "aot_unpaired",
        {"beta": 0.5, "label_smoothing": 0.2},
        mean([-0.8 * log_s(0.5 * g) - 0.2 * log_s(-0.5 * g) for g in (1.0, 0.5)]),
    ),
]


@pytest.mark.parametrize(("name", "params", "expected"), PAIRED_CASES)
def test_paired_variant_matches_hand_computation(name: str, params: dict[str, Any], expected: float) -> None:
    value, out = run(name, paired(), **params)
    assert value == pytest.approx(expected, rel=1e-6)
    assert all(
        torch.as_tensor(v).numel() == 1 and not torch.as_tensor(v).requires_grad for v in out.metrics.values()
    )


def test_dpop_penalises_a_chosen_likelihood_below_the_reference() -> None:
    # ref chosen (-9.5, -7.5): h_w = (-0.5, -0.5), z = (0, -1), penalty 2 * 0.5 on each logit
    b = paired(ref_chosen_logps=[-9.5, -7.5])
    value, out = run("dpop", b, beta=0.5, dpop_lambda=2.0)
    assert value == pytest.approx(mean([-log_s(0.5 * (0 - 1)), -log_s(0.5 * (-1 - 1))]), rel=1e-6)
    assert float(out.metrics["chosen_drop"]) == pytest.approx(0.5)
    (d_chosen,) = torch.autograd.grad(run("dpop", b, beta=0.5, dpop_lambda=2.0)[1].loss, [b.chosen_logps])
    (d_chosen_dpo,) = torch.autograd.grad(run("dpop", b, beta=0.5, dpop_lambda=0.0)[1].loss, [b.chosen_logps])
    assert (d_chosen < d_chosen_dpo).all()  # descent raises the chosen harder


def test_f_dpo_alpha_one_is_reverse_kl_and_alpha_zero_forward_kl() -> None:
    def f_dpo(**params: Any) -> float:
        return run("f_dpo", paired(), beta=0.5, **params)[0]

    assert f_dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0) == pytest.approx(f_dpo())
    assert f_dpo(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0) == pytest.approx(
        f_dpo(f_divergence_type="forward_kl")
    )


def test_discopop_is_logistic_for_wrong_pairs_and_exponential_for_right_ones() -> None:
    # tau -> 0: the mixing weight is a step at rho = 0
    wrong = paired(chosen_logps=[-13.0, -13.0])  # h_w = (-2, -4.5), z < 0
    assert run("discopop", wrong, beta=0.5, tau=1e-3)[0] == pytest.approx(
        mean([-log_s(0.5 * (-2 + 0.5)), -log_s(0.5 * (-4.5 - 0.5))]), rel=1e-6
    )
    right = paired(chosen_logps=[-5.0, -5.0])  # h_w = (6, 3.5)
    assert run("discopop", right, beta=0.5, tau=1e-3)[0] == pytest.approx(
        mean([math.exp(-0.5 * 6.5), math.exp(-0.5 * 3.0)]), rel=1e-6
    )


def test_discopop_slope_at_a_tie() -> None:
    b = paired(chosen_logps=[-11.5, -8.0])  # z = 0 in both pairs
    (d_chosen,) = torch.autograd.grad(run("discopop", b, beta=0.5, tau=0.05)[1].loss, [b.chosen_logps])
    slope = (1 - math.log(2)) / (4 * 0.05) - 0.75  # d loss / d rho at rho = 0
    assert d_chosen.tolist() == pytest.approx([0.5 * slope / 2] * 2, rel=1e-5)


# DiscoPOP is not monotonic near a tie (above); LD-DPO reads per-token log-probs (below)
@pytest.mark.parametrize("name", [n for n in PAIRED_VARIANTS if n not in ("discopop", "ld_dpo")])
def test_descent_raises_chosen_and_lowers_rejected(name: str) -> None:
    b = paired()
    d_chosen, d_rejected = torch.autograd.grad(
        run(name, b, beta=0.5)[1].loss, [b.chosen_logps, b.rejected_logps]
    )
    assert (d_chosen <= 0).all() and (d_chosen < 0).any()
    assert (d_rejected >= 0).all() and (d_rejected > 0).any()


@pytest.mark.parametrize("name", PAIRED_VARIANTS)
def test_paired_variants_need_reference_logps(name: str) -> None:
    b = paired()
    b.ref_chosen_logps = b.ref_rejected_logps = None
    with pytest.raises(ValueError, match="reference"):
        run(name, b)


def test_registered_once_for_the_right_batch() -> None:
    reg = registry()
    assert not reg.broken
    for entry in reg.entries("loss"):
        if entry.name in PAIRED_VARIANTS:
            assert (entry.package, entry.meta["batch"]) == ("align-dpo", align.PreferenceBatch)
            assert entry.meta["needs_reference"] is True
        if entry.name in UNPAIRED:
            assert (entry.package, entry.meta["batch"]) == ("align-kto", align.UnpairedBatch)
            assert entry.meta["needs_reference"] is True
    assert set(PAIRED_VARIANTS + UNPAIRED) <= set(reg.names("loss"))


# ---- LD-DPO: per-token log-probs ------------------------------------------------------------


def with_tokens(b: align.PreferenceBatch) -> align.PreferenceBatch:
    """Per-token log-probs consistent with the fixed batch's sums and lengths (5, 4 | 6, 2)."""
    policy = [[-2.0] * 5, [-1.0, -1.0, -3.0, -3.0], [-1.0, -1.0, -1.0, -3.0, -3.0, -3.0], [-3.0, -4.0]]
    reference = [[-3.0, -2.0, -2.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -2.5], [-2.0] * 5 + [-1.5], [-4.0, -3.5]]

    def table(rows: list[list[float]]) -> align.TokenLogps:
        values = torch.zeros(4, 6)
        mask = torch.zeros(4, 6, dtype=torch.bool)
        for i, row in enumerate(rows):
            values[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        return align.TokenLogps(values.requires_grad_(), mask)

    b.token_logps, b.ref_token_logps = table(policy), table(reference)
    return b


def test_ld_dpo_matches_hand_computation() -> None:
    # shared lengths: min(5, 6) = 5 and min(4, 2) = 2; tokens past them weighted 0.25
    alpha = 0.25
    pair_1 = (-10 - (-11)) - ((-9 - 3 * alpha) - (-10 - 1.5 * alpha))
    pair_2 = ((-2 - 6 * alpha) - (-4 - 4.5 * alpha)) - (-7 - (-7.5))
    value, _ = run("ld_dpo", with_tokens(paired()), beta=0.5, ld_alpha=alpha)
    assert value == pytest.approx(mean([-log_s(0.5 * pair_1), -log_s(0.5 * pair_2)]), rel=1e-6)
    assert run("ld_dpo", with_tokens(paired()), beta=0.5, ld_alpha=1.0)[0] == pytest.approx(
        mean([-log_s(0.5 * z) for z in Z]), rel=1e-6
    )
    with pytest.raises(ValueError, match="per-token"):
        run("ld_dpo", paired())


def test_dpo_algorithm_fills_token_logps_for_ld_dpo(tmp_path: Any) -> None:
    from helpers import dpo_config

    from align.loading import validate_run_config
    from align.trainer import Trainer

    config = dpo_config(tmp_path, loss={"name": "ld_dpo", "beta": 0.5, "ld_alpha": 0.5})
    trainer = Trainer(validate_run_config(config, registry()), align.load_plugins())
    trainer.build()
    algo: Any = trainer.algorithm
    assert algo.live is not None and algo.cached is None  # per-token reference scores are live
    batch = trainer.data_format.collate([trainer.train_data[i] for i in range(4)])
    with torch.no_grad():
        for p in trainer.context.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = algo.preference_batch(batch)
    assert b.token_logps is not None and b.ref_token_logps is not None
    sums = trainer.backend.sequence_logps(trainer.context.policy, batch.tokens).sum
    torch.testing.assert_close(torch.cat([b.chosen_logps, b.rejected_logps]), sums, rtol=1e-4, atol=1e-4)
    assert algo.loss(batch).loss.requires_grad
    assert run("ld_dpo", b, beta=0.5, ld_alpha=1.0)[0] == pytest.approx(run("dpo", b, beta=0.5)[0], rel=1e-5)


# ---- the unpaired side (KTO's batch) ------------------------------------------------------
# r = beta * (logps - ref_logps) = 0.5 * (1, -1, 0.5); labels desirable, undesirable, desirable


def unpaired(running_logratio_mean: float | None = 0.2) -> align.UnpairedBatch:
    return align.UnpairedBatch(
        logps=torch.tensor([-10.0, -12.0, -9.0], requires_grad=True),
        labels=torch.tensor([True, False, True]),
        lengths=torch.tensor([5, 6, 4]),
        ref_logps=torch.tensor([-11.0, -11.0, -9.5]),
        kl_logps=torch.tensor([-20.0, -19.0, -21.0]),
        ref_kl_logps=torch.tensor([-20.6, -19.2, -21.1]),
        running_logratio_mean=None if running_logratio_mean is None else torch.tensor(running_logratio_mean),
    )


def test_apo_zero_unpaired_matches_hand_computation() -> None:
    # desirable: 1 - s(r), undesirable: s(r), weighted 1 and 2
    value, _ = run("apo_zero_unpaired", unpaired(), beta=0.5, undesirable_weight=2.0)
    assert value == pytest.approx(mean([1 - s(0.5), 2 * s(-0.5), 1 - s(0.25)]), rel=1e-6)


def test_bco_matches_hand_computation_around_the_running_shift() -> None:
    # delta = beta * running mean = 0.1: -log s(r - delta) if desirable, -log s(delta - r) if not
    value, out = run("bco", unpaired(0.2), beta=0.5, undesirable_weight=2.0)
    assert value == pytest.approx(mean([-log_s(0.4), -2 * log_s(0.1 + 0.5), -log_s(0.15)]), rel=1e-6)
    assert float(out.metrics["delta"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="running"):
        run("bco", unpaired(None))


def kto_config(tmp_path: Any, loss: dict[str, Any], **trainer: Any) -> align.RunConfig:
    import json

    from align.loading import validate_run_config

    rows = [{"prompt": f"Q{i}: ", "completion": "answer " * (i + 1), "label": i % 2 == 0} for i in range(8)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "algo": "kto",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "data": {"train": str(path), "eval": str(path)},
        "loss": loss,
        "trainer": {"num_threads": 1, "progress": False, "tensorboard": False, **trainer},
    }
    return validate_run_config(config, registry())


def kto_trainer(tmp_path: Any, loss: dict[str, Any]) -> Any:
    from align.trainer import Trainer

    trainer = Trainer(kto_config(tmp_path, loss), align.load_plugins())
    trainer.build()
    return trainer


def test_kto_keeps_the_running_logratio_mean_across_steps_and_checkpoints(tmp_path: Any) -> None:
    torch.manual_seed(0)
    trainer = kto_trainer(tmp_path, {"name": "bco", "beta": 0.5})
    algo, data, collate = trainer.algorithm, trainer.train_data, trainer.data_format.collate
    first, second = collate([data[i] for i in range(4)]), collate([data[i] for i in range(4, 8)])
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all 0
        for p in trainer.context.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    for batch in (first, second):
        b = algo.unpaired_batch(batch)
        seen.append(b.logratios.detach())
        out = algo.loss(batch)
    all_seen = torch.cat(seen).double()
    assert float(all_seen.abs().max()) > 1e-3
    assert algo.logratio_mean.value == pytest.approx(float(all_seen.mean()), rel=1e-6)
    assert float(out.metrics["delta"]) == pytest.approx(0.5 * float(all_seen.mean()), rel=1e-5)
    algo.evaluate([first])  # evaluation reads the shift, never updates it
    assert algo.logratio_mean.count == 8
    state = algo.state_dict()
    assert state["logratio_mean"] == {"total": pytest.approx(float(all_seen.sum())), "count": 8}
    fresh = kto_trainer(tmp_path / "again", {"name": "bco", "beta": 0.5}).algorithm
    fresh.load_state_dict(state)
    assert fresh.logratio_mean.value == algo.logratio_mean.value


@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_losses_learn_to_separate_the_labels(tmp_path: Any, name: str) -> None:
    config = kto_config(tmp_path, {"name": name, "beta": 0.5}, max_steps=15, batch_size=8)
    config.optim.lr = 3e-3
    result = align.train(config, align.load_plugins())
    assert result.eval_before["reward_gap"] == pytest.approx(0.0, abs=1e-6)
    assert result.eval_after["reward_gap"] > 0.5
    assert result.eval_after["reward_accuracy"] > 0.9


@pytest.mark.parametrize("name", PAIRED_VARIANTS)
def test_paired_variant_raises_heldout_reward_accuracy(name: str, tmp_path: Any) -> None:
    from helpers import DATA

    from align.loading import validate_run_config

    config = {
        "algo": "dpo",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "data": {
            "train": str(DATA / "preference_train.jsonl"),
            "eval": str(DATA / "preference_eval.jsonl"),
            "max_length": 128,
        },
        "loss": {"name": name},
        "trainer": {"max_steps": 12, "batch_size": 8, "eval_batch_size": 64, "num_threads": 1}
        | {"progress": False, "tensorboard": False},
        "optim": {"lr": 3e-3},
    }
    result = align.train(validate_run_config(config, registry()))
    before, after = result.eval_before["reward_accuracy"], result.eval_after["reward_accuracy"]
    assert before == pytest.approx(0.5)
    assert after >= before + 0.25, (name, before, after)
