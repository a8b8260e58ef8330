"""The randomized SVD's settings on real KV groups: time of the factorization and its relative error.

Run: ``.venv/bin/python benchmarks/prefill/range_finder.py --lengths 4k,7k`` (``README.md`` in this folder has its
output). The matrices are the groups the default ``XKVCache`` factors while it prefills a needle prompt of SmolLM2-
135M (keys before RoPE and values, 4 groups of up to 8 layers, at the ranks the default configuration resolves).
Each group is factored by ``xkv.factorization.cross_layer_svd`` with the exact SVD, its Gram route and the
randomized SVD at several ``svd_niter``, and, for comparison, by one power iteration with a QR of the token side
after each power step (what ``cross_layer_svd`` did before 2026-11-30) and with a QR after every product (Halko et
al.'s algorithm 4.4). Times are the best of 3, summed over the groups; the error is the mean over the groups.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import xkv.cache
from xkv.cache import XKVCache
from xkv.compat import cache_kwargs
from xkv.evaluation.runner import parse_lengths
from xkv.factorization import LowRankFactors, cross_layer_svd, relative_error
from xkv.models import load
from xkv.prompts import needle_sample

Factorizer = Callable[[list[torch.Tensor], int], LowRankFactors]


def captured_groups(length: int) -> list[tuple[list[torch.Tensor], int]]:
    """The ``(layers, rank)`` the default cache factors while it prefills a ``length``-token needle prompt."""
    model, tokenizer = load()
    groups: list[tuple[list[torch.Tensor], int]] = []
    factor = xkv.cache.side.cross_layer_svd

    def grab(layers: list[torch.Tensor], rank: int, **kwargs: object) -> LowRankFactors:
        groups.append(([layer.clone() for layer in layers], rank))
        return factor(layers, rank, **kwargs)  # type: ignore[arg-type]

    xkv.cache.side.cross_layer_svd = grab  # type: ignore[assignment]
    try:
        ids = torch.tensor([needle_sample(tokenizer, length, seed=3).context_ids])
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(XKVCache(model)))
    finally:
        xkv.cache.side.cross_layer_svd = factor
    return groups


def one_iteration(layers: list[torch.Tensor], rank: int, qr_every_product: bool) -> LowRankFactors:
    """One power iteration with the token side orthonormalized after each power step (what ``cross_layer_svd`` did
    before 2026-11-30), and with ``qr_every_product`` the feature side too (Halko et al. 2011, algorithm 4.4)."""
    matrix = torch.cat(layers, dim=-1)
    batch, _, cols = matrix.shape
    test = torch.randn(batch, cols, rank + 10, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(matrix @ test).Q
    side = matrix.mT @ basis
    if qr_every_product:
        side = torch.linalg.qr(side).Q
    basis = torch.linalg.qr(matrix @ side).Q
    u, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    root = s[..., :rank].sqrt()
    dim = layers[0].shape[-1]
    recon = (root.unsqueeze(-1) * vh[..., :rank, :]).reshape(batch, rank, len(layers), dim).transpose(1, 2)
    return LowRankFactors((basis @ u[..., :rank]) * root.unsqueeze(-2), recon)


def settings() -> dict[str, Factorizer]:
    """Name -> factorizer of a group's layers at a rank."""
    chosen: dict[str, Factorizer] = {
        "exact SVD": lambda layers, rank: cross_layer_svd(layers, rank),
        "Gram eigendecomposition (svd: gram)": lambda layers, rank: cross_layer_svd(layers, rank, method="gram"),
    }
    for niter in (0, 0.5, 1, 1.5):
        chosen[f"randomized, svd_niter {niter}"] = lambda layers, rank, n=niter: cross_layer_svd(
            layers, rank, method="randomized", niter=n
        )
    chosen["1 iteration, token-side QRs (before 2026-11-30)"] = lambda layers, rank: one_iteration(layers, rank, False)
    chosen["1 iteration, a QR after every product (Halko 4.4)"] = lambda layers, rank: one_iteration(
        layers, rank, True
    )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4k,7k", help="prompt lengths")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| context | setting | passes over the matrix | seconds (4 groups, keys and values) | relative error |")
    print("|---|---|---|---|---|")
    passes = {"exact SVD": "-", "Gram eigendecomposition (svd: gram)": "2"}
    for length in parse_lengths(args.lengths):
        groups = captured_groups(length)
        for name, factorize in settings().items():
            seconds, errors = 0.0, []
            for layers, rank in groups:
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    factors = factorize(layers, rank)
                    best = min(best, time.perf_counter() - start)
                seconds += best
                errors.append(relative_error(layers, factors))
            count = passes.get(name) or (
                str(int(2 * float(name.rsplit(" ", 1)[1]) + 2)) if "svd_niter" in name else "4"
            )
            error = sum(errors) / len(errors)
            print(f"| {length} | {name} | {count} | {seconds:.2f} | {error:.4f} (mean of {len(errors)}) |")


if __name__ == "__main__":
    main()
