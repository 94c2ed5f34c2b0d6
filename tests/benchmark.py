"""Speed of the updates, next to this machine's float32 matmul rate (a script, not a test).

    python tests/benchmark.py   # HalfCheetah shapes: obs 17, actions 6, 256-256, batch 256, M = 10

Prints ms per update (CQL pretraining for N = 1 and 5; the full fine-tuning step for N = 1 and 5:
SAC ensemble + density ratio + sum-tree sampling and priority write-back at 2M capacity) and the
achieved GFLOP/s, counting the matmul FLOPs of every layer from its shape (forward, and the weight-
and input-gradient products of the backward pass where they are computed). Elementwise work is
not counted, so the percentage is a lower bound on how busy the matrix units are. The matmul rate
is measured in rounds interleaved with each row's timing, and a row's percentage is the median
over its rounds, so that a drift in the shared machine's speed affects both sides alike. Then the
sum tree's share, the online env-step cost, and the whole fine-tuning loop's env steps per second.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cql_pretrain  # noqa: E402
import off2on_finetune as ft  # noqa: E402


def matmul_rate(seconds=2.0, device="cpu") -> float:
    """Best float32 GFLOP/s over a few shapes like the ones a 256-wide MLP uses."""
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (4096, 256, 256), (256, 256, 256)):
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for _ in range(10):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            count += 10
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def mlp_flops(rows, sizes, backward=None) -> int:
    """Matmul FLOPs of an MLP with layer sizes `sizes` on `rows` inputs. backward: None,
    "weights" (train the weights; no gradient for the input) or "inputs" (frozen weights,
    gradient w.r.t. the input, as the critic in the actor loss)."""
    total = 0
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = 2 * rows * n_in * n_out
        total += layer
        if backward == "weights":
            total += layer + (layer if i > 0 else 0)
        elif backward == "inputs":
            total += layer
    return total


def cql_update_flops(N, B, M, obs_dim, action_dim, hidden) -> int:
    critic, actor = [obs_dim + action_dim, *hidden, 1], [obs_dim, *hidden, 2 * action_dim]
    per_agent = (
        # both critics at s: data action + 3M proposals
        mlp_flops(2 * (1 + 3 * M) * B, critic, "weights")
        + mlp_flops(2 * B, critic)  # target critics at s'
        + mlp_flops(B, actor)  # pi(.|s')
        + mlp_flops(B, actor, "weights")  # pi(.|s), trained
        + mlp_flops(2 * B, critic, "inputs")  # critics in the actor loss
    )
    return N * per_agent


def finetune_step_flops(N, B, obs_dim, action_dim, hidden) -> int:
    critic, actor, ratio = (
        [obs_dim + action_dim, *hidden, 1],
        [obs_dim, *hidden, 2 * action_dim],
        [obs_dim + action_dim, 256, 256, 1],
    )
    per_member = (
        mlp_flops(2 * B, critic, "weights")  # both critics at (s, a)
        + mlp_flops(2 * B, critic)  # target critics at s'
        + mlp_flops(B, actor)  # pi_i(.|s')
        + mlp_flops(B, actor, "weights")  # pi_i(.|s), trained through pi_E
        + mlp_flops(2 * B, critic, "inputs")  # critics in the actor loss
    )
    # density ratio: RL batch, online and offline batches
    return N * per_member + mlp_flops(3 * B, ratio, "weights")


def median_seconds(fn, repeats, device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_finetune_step(
    N, B, obs_dim, action_dim, hidden, device, n_offline=1_750_000, n_online=250_000
):
    """One fine-tuning gradient step as off2on_finetune.py runs it, on a 2M-transition buffer."""
    import gymnasium as gym
    import numpy as np

    rng = np.random.default_rng(0)
    data = ft.OfflineData(
        rng.standard_normal((n_offline, obs_dim), dtype=np.float32),
        rng.uniform(-1, 1, (n_offline, action_dim)).astype(np.float32),
        rng.standard_normal(n_offline, dtype=np.float32),
        rng.standard_normal((n_offline, obs_dim), dtype=np.float32),
        np.zeros(n_offline, np.float32),
        gym.spec("HalfCheetah-v5"),
        "benchmark",
        None,
        "none",
    )
    replay = ft.BalancedReplay(data, n_online, "balanced", device=device)
    for name in ft.FIELDS:  # fill the online part at once
        replay.storage[name][n_offline:] = torch.randn_like(replay.storage[name][n_offline:])
    replay.n_online = n_online
    replay.tree.update(
        np.arange(n_offline, n_offline + n_online), np.full(n_online, replay.max_priority)
    )
    agents = ft.Off2OnEnsemble(obs_dim, action_dim, hidden, N, device=device)
    density_ratio = ft.DensityRatio(obs_dim, action_dim).to(device)
    optimizer = torch.optim.Adam(density_ratio.parameters(), lr=3e-4, fused=True)

    def step():
        idx = replay.sample_indices(B)
        batch = replay.get(idx)
        ratio_idx = np.concatenate([idx, *replay.density_ratio_indices(B)])
        w_batch, w_online, w_offline = density_ratio(*replay.get(ratio_idx, ft.FIELDS[:2])).split(B)
        with torch.no_grad():
            replay.update_priorities(idx, ft.priority(w_batch, w_offline, 5.0).cpu().numpy())
        loss = ft.density_ratio_loss(w_online, w_offline)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        agents.update(batch)

    def tree_only():
        idx = replay.tree.sample(B, replay.rng)
        replay.tree.update(idx, rng.uniform(0.5, 2, B))

    return step, tree_only, agents


def time_env_step(agents, device, steps=1000) -> float:
    """One online step: the merged policy's action, then a HalfCheetah-v5 step."""
    import gymnasium as gym

    env = ft.make_env(gym.spec("HalfCheetah-v5"))
    obs, _ = env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad():
            x = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            mean, log_std = agents.policy(x)
            action = ft.tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0]
        obs, _, terminated, truncated, _ = env.step(action[0].cpu().numpy())
        if terminated or truncated:
            obs, _ = env.reset()
    return (time.perf_counter() - start) / steps


def make_cql_update(N, B, M, obs_dim, action_dim, hidden, device):
    """One CQL pretraining update of N agents on a fixed random batch."""
    torch.manual_seed(0)
    agents = cql_pretrain.CQLEnsemble(
        obs_dim, action_dim, hidden, N, cql_n_actions=M, device=device
    )
    batch = [
        torch.randn(N, B, obs_dim, device=device),
        torch.rand(N, B, action_dim, device=device) * 2 - 1,
        torch.randn(N, B, device=device),
        torch.randn(N, B, obs_dim, device=device),
        torch.zeros(N, B, device=device),
    ]
    return lambda: agents.update(batch)


def time_against_matmul(fn, flops, repeats, device, rounds=5):
    """Median ms per call, GFLOP/s and fraction of the matmul rate over `rounds` rounds, each
    timing `repeats` calls right after a short measurement of the matmul rate."""
    ms, rates, fractions = [], [], []
    for _ in range(rounds):
        rate = matmul_rate(seconds=0.6, device=device)
        seconds = median_seconds(fn, repeats, device)
        ms.append(seconds * 1e3)
        rates.append(rate)
        fractions.append(flops / seconds / 1e9 / rate)
    return (
        statistics.median(ms),
        flops / statistics.median(ms) / 1e6,
        statistics.median(fractions),
        rates,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    obs_dim, action_dim, hidden, B, M = 17, 6, (256, 256), 256, 10

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("| update | N | ms / update | GFLOP / update | GFLOP/s | % of matmul rate |")
    print("|---|---|---|---|---|---|")
    all_rates = []

    def report(name, N, fn, flops, repeats):
        ms, gflops, fraction, rates = time_against_matmul(fn, flops, repeats, args.device)
        all_rates.extend(rates)
        print(
            f"| {name} | {N} | {ms:.1f} | {flops / 1e9:.2f} | {gflops:.0f} "
            f"| {100 * fraction:.0f}% |",
            flush=True,
        )
        return ms / 1e3

    rows = [("CQL, vectorized", N, None) for N in (1, 5)]
    if args.device == "cpu":
        rows.append(("CQL, vectorized, no per-agent chunking", 5, float("inf")))
    for name, N, chunk_rows in rows:
        default = cql_pretrain.Critic.cpu_chunk_rows
        cql_pretrain.Critic.cpu_chunk_rows = chunk_rows or default
        report(
            name,
            N,
            make_cql_update(N, B, M, obs_dim, action_dim, hidden, args.device),
            cql_update_flops(N, B, M, obs_dim, action_dim, hidden),
            max(3, args.repeats // 4),
        )
        cql_pretrain.Critic.cpu_chunk_rows = default

    for N in (1, 5):
        step, tree_only, agents = make_finetune_step(N, B, obs_dim, action_dim, hidden, args.device)
        seconds = report(
            "fine-tuning step (SAC ensemble + density ratio + sum tree, 2M buffer)",
            N,
            step,
            finetune_step_flops(N, B, obs_dim, action_dim, hidden),
            args.repeats,
        )
    tree_seconds = median_seconds(tree_only, 200, "cpu")

    env_seconds = time_env_step(agents, args.device)
    print(
        f"\nfloat32 matmul rate over all rounds: median {statistics.median(all_rates):.0f} GFLOP/s "
        f"(range {min(all_rates):.0f}-{max(all_rates):.0f})"
    )
    print(
        f"sum tree, 2M capacity, sample {B} + update {B} priorities: {tree_seconds * 1e3:.2f} ms = "
        f"{100 * tree_seconds / seconds:.1f}% of the N=5 fine-tuning step"
    )
    print(f"online env step (HalfCheetah-v5, N=5 merged policy): {env_seconds * 1e3:.2f} ms")
    print(
        "fine-tuning loop, N=5, 1 update per env step: "
        f"{1 / (seconds + env_seconds):.1f} env steps/s "
        f"({1000 * (seconds + env_seconds) / 60:.1f} min per 1000-step epoch)"
    )
