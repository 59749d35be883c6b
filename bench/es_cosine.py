"""How well the ES direction points along the true gradient, against the sqrt(N/d) law.

For antithetic ES with raw ('none') fitness shaping, the update direction at theta is
d = (1/N) sum_k (f(theta + sigma eps_k) - f(theta - sigma eps_k)) eps_k over N' = N/2
pairs. To first order in sigma, d / sigma = (1/N') sum_k eps_k eps_k^T g: the gradient g
plus noise of covariance (|g|^2 I + g g^T) / N', hence

    cos(d, g) ~= sqrt(N' / (N' + dim + 1))

(exact in expectation to second order for a quadratic). Objectives: a quadratic
-0.5 |theta - target|^2 in 200 dims, and the log-likelihood of a softmax classifier
(24 features -> 10 classes, 250 parameters in two tensors) on fixed random data. Noise,
fitness shaping and the update are the real ones (lowmem_es.noise / lowmem_es.es); only
the member evaluation is vectorised here. Gradients come from autograd.

    python bench/es_cosine.py [--seeds 6] [--pairs 16 64 256 1024 2048]

Prints a markdown table: measured is the mean (and sd) of the cosine over ``--seeds``
iterations, each with fresh noise.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads

import torch

from lowmem_es.es import es_update, member_schedule, shape_fitness
from lowmem_es.noise import member_key, tensor_id
from lowmem_es.noise_batch import noise

RUN_SEED = 1234


def predicted_cosine(num_pairs: int, dim: int) -> float:
    """Leading-order expected cosine of antithetic ES with N' pairs in ``dim`` dimensions."""
    return math.sqrt(num_pairs / (num_pairs + dim + 1))


def es_direction(theta, ids, objective, num_pairs, sigma, iteration):
    """ES direction at ``theta`` (name -> fp32 tensor) with raw fitness, via es_update."""
    schedule = member_schedule(2 * num_pairs, antithetic=True)
    signs = torch.tensor([sign for _, sign in schedule], dtype=torch.float64)
    pairs = torch.tensor([pair for pair, _ in schedule])
    members = {}
    for name, value in theta.items():
        pair_noise = torch.stack([noise(member_key(RUN_SEED, iteration, k, ids[name]),
                                        value.shape) for k in range(num_pairs)]).double()
        members[name] = (value.double()
                         + sigma * signs.view(-1, *([1] * value.dim())) * pair_noise[pairs])
    fitness = shape_fitness(objective(members), "none")
    direction = {name: torch.zeros_like(value) for name, value in theta.items()}
    es_update(direction, ids, run_seed=RUN_SEED, iteration=iteration, shaped_fitness=fitness,
              schedule=schedule, learning_rate=1.0)
    return direction


def cosine(first: dict, second: dict) -> float:
    a = torch.cat([first[n].double().flatten() for n in sorted(first)])
    b = torch.cat([second[n].double().flatten() for n in sorted(first)])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def quadratic(dim: int = 200):
    """theta, tensor ids, objective (members -> rewards), autograd-free exact gradient."""
    g = torch.Generator().manual_seed(11)
    theta = {"theta": torch.randn(dim, generator=g)}
    target = torch.randn(dim, generator=g, dtype=torch.float64)

    def objective(members):  # (N, dim) -> (N,)
        return -0.5 * ((members["theta"] - target) ** 2).sum(-1)

    gradient = {"theta": target - theta["theta"].double()}
    return theta, {"theta": tensor_id("quadratic", "A")}, objective, gradient, dim


def classifier(features: int = 24, classes: int = 10, samples: int = 64):
    """Softmax regression log-likelihood; labels from a random teacher."""
    g = torch.Generator().manual_seed(12)
    inputs = torch.randn(samples, features, generator=g, dtype=torch.float64)
    teacher = torch.randn(classes, features, generator=g, dtype=torch.float64)
    labels = (inputs @ teacher.T).argmax(-1)
    theta = {"weight": 0.1 * torch.randn(classes, features, generator=g),
             "bias": 0.1 * torch.randn(classes, generator=g)}
    ids = {"weight": tensor_id("head", "A"), "bias": tensor_id("head", "B")}

    def objective(members):  # weight (N, C, F), bias (N, C) -> (N,)
        logits = torch.einsum("ncf,bf->nbc", members["weight"], inputs)
        log_probs = (logits + members["bias"][:, None, :]).log_softmax(-1)
        index = labels.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
        return log_probs.gather(-1, index).sum((1, 2))

    leaves = {name: value.double().requires_grad_() for name, value in theta.items()}
    objective({name: value[None] for name, value in leaves.items()}).sum().backward()
    gradient = {name: value.grad for name, value in leaves.items()}
    return theta, ids, objective, gradient, features * classes + classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="iterations averaged per row")
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 64, 256, 1024, 2048],
                        help="antithetic pairs N' (population N = 2 N')")
    args = parser.parse_args()
    print(f"`{shlex.join(['python', *sys.argv])}` (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| objective | dim | N | N' | predicted cos | measured cos | sd | seeds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    for label, build, sigma in (("quadratic", quadratic, 1e-2),
                                ("softmax classifier", classifier, 1e-3)):
        theta, ids, objective, gradient, dim = build()
        for num_pairs in args.pairs:
            cosines = [cosine(es_direction(theta, ids, objective, num_pairs, sigma, it),
                              gradient) for it in range(args.seeds)]
            spread = statistics.stdev(cosines) if len(cosines) > 1 else float("nan")
            print(f"| {label} | {dim} | {2 * num_pairs} | {num_pairs} | "
                  f"{predicted_cosine(num_pairs, dim):.4f} | {statistics.fmean(cosines):.4f} | "
                  f"{spread:.4f} | {args.seeds} |", flush=True)
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
