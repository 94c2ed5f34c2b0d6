"""Speed of the CQL ensemble update, next to this machine's float32 matmul rate (a script, not a test).

    python tests/benchmark.py            # HalfCheetah shapes: obs 17, actions 6, 256-256, batch 256, M = 10

Prints ms per update for N = 1 and N = 5, and the achieved GFLOP/s, counting the matmul FLOPs of
every layer from its shape (forward, and the weight- and input-gradient products of the backward
pass where they are computed). Elementwise work is not counted, so the percentage is a lower bound
on how busy the matrix units are.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cql_pretrain  # noqa: E402


def matmul_rate(seconds=2.0) -> float:
    """Best float32 GFLOP/s over a few shapes like the ones a 256-wide MLP uses."""
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (4096, 256, 256), (256, 256, 256)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
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
        mlp_flops(2 * (1 + 3 * M) * B, critic, "weights")  # both critics at s: data action + 3M proposals
        + mlp_flops(2 * B, critic)  # target critics at s'
        + mlp_flops(B, actor)  # pi(.|s')
        + mlp_flops(B, actor, "weights")  # pi(.|s), trained
        + mlp_flops(2 * B, critic, "inputs")  # critics in the actor loss
    )
    return N * per_agent


def time_update(N, B, M, obs_dim, action_dim, hidden, repeats, device) -> float:
    torch.manual_seed(0)
    agents = cql_pretrain.CQLEnsemble(obs_dim, action_dim, hidden, N, cql_n_actions=M, device=device)
    batch = [torch.randn(N, B, obs_dim, device=device), torch.rand(N, B, action_dim, device=device) * 2 - 1,
             torch.randn(N, B, device=device), torch.randn(N, B, obs_dim, device=device), torch.zeros(N, B, device=device)]
    for _ in range(3):
        agents.update(batch)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        agents.update(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    obs_dim, action_dim, hidden, B, M = 17, 6, (256, 256), 256, 10

    rate = matmul_rate()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"float32 matmul rate: {rate:.0f} GFLOP/s\n")
    print("| update | N | ms / update | GFLOP / update | GFLOP/s | % of matmul rate |")
    print("|---|---|---|---|---|---|")
    rows = [("CQL, vectorized", N, None) for N in (1, 5)]
    if args.device == "cpu":
        rows.append(("CQL, vectorized, no per-agent chunking", 5, float("inf")))
    for name, N, chunk_rows in rows:
        default = cql_pretrain.Critic.cpu_chunk_rows
        cql_pretrain.Critic.cpu_chunk_rows = chunk_rows or default
        seconds = time_update(N, B, M, obs_dim, action_dim, hidden, args.repeats, args.device)
        cql_pretrain.Critic.cpu_chunk_rows = default
        flops = cql_update_flops(N, B, M, obs_dim, action_dim, hidden)
        print(f"| {name} | {N} | {seconds * 1e3:.0f} | {flops / 1e9:.1f} | {flops / seconds / 1e9:.0f} | {100 * flops / seconds / 1e9 / rate:.0f}% |")
