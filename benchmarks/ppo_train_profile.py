"""Where align's PPO train phase goes, against the same work done minimally by hand.

On ppo_time_split.py's workload with the ``local`` critic (32 prompts x 32 tokens, 2 epochs of 2
minibatches of 16: 4 policy steps and 4 critic steps per iteration), every iteration's
``PPO.train_on`` runs under cProfile; right after it, on copies of the same policy and critic
(and fresh AdamW optimizers), the same minibatches (the same token batches, as ``lay_out``
gives them) are trained by hand: one policy forward/backward (log-probs of the completion
tokens, a masked mean) and one value forward/backward (the decoder and the value head at every
token, a masked squared error) per minibatch, then each optimizer's step. The ratio of the two
times, taken back to back under the same load, is align's overhead on the train phase; the
profile's top entries say where it goes. Shares, not timings: run it nice'd on a busy machine.

    nice -n 15 python benchmarks/ppo_train_profile.py --iterations 2 --top 25
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ppo_time_split import LR, MINIBATCH, ppo_config, prepare


def by_hand(policy: Any, critic: Any, batches: list[Any]) -> float:
    """Seconds for the minimal train phase on ``batches`` (copies of the models, fresh AdamW)."""
    policy, critic = copy.deepcopy(policy), copy.deepcopy(critic)
    policy_optim = torch.optim.AdamW(policy.parameters(), lr=LR)
    critic_optim = torch.optim.AdamW(critic.parameters(), lr=LR)
    started = time.perf_counter()
    for batch in batches:
        ids, scored = batch.input_ids, batch.loss_mask[:, 1:]
        logits = policy(input_ids=ids, use_cache=False).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        (-(logps * scored).sum() / scored.sum()).backward()
        policy_optim.step()
        policy_optim.zero_grad(set_to_none=True)
        hidden = critic.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        values = critic.score(hidden)[..., 0]
        ((values**2 * scored).sum() / scored.sum()).backward()
        critic_optim.step()
        critic_optim.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", help="where the models are (default: a temp folder)")
    args = parser.parse_args()

    import align
    from align.loading import validate_run_config
    from align_ppo.algorithm import PPO

    profile = cProfile.Profile()
    times: list[tuple[float, float]] = []
    train_on = PPO.train_on

    def profiled(self: PPO, learner: Any, experience: Any, train_policy: bool = True) -> Any:
        started = time.perf_counter()
        profile.enable()
        try:
            metrics = train_on(self, learner, experience, train_policy)
        finally:
            profile.disable()
        took = time.perf_counter() - started
        generator = torch.Generator().manual_seed(self.config.seed + 7919 * self.iteration)
        batches = []
        for _ in range(self.config.epochs):
            order = torch.randperm(len(experience), generator=generator).tolist()
            for start in range(0, len(order), MINIBATCH):
                batches.append(self.lay_out([experience[i].sample for i in order[start : start + MINIBATCH]]))
        critic_model = self.critic.model  # type: ignore[union-attr]
        times.append((took, by_hand(self.ctx.policy, critic_model, batches)))
        return metrics

    PPO.train_on = profiled  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="ppo-profile-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp) / "work"
        prepare(workdir)
        config = ppo_config("local", workdir, Path(tmp) / "run", args.iterations, args.threads)
        plugins = align.default_plugins()
        align.train(validate_run_config(config, plugins.registry, "ppo"), plugins)
    for i, (align_s, hand_s) in enumerate(times):
        print(
            f"iteration {i + 1}: align train phase {align_s:.2f} s, by hand {hand_s:.2f} s: "
            f"{align_s / hand_s:.2f}x"
        )
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
