"""Randomized range finders on one 4096 x 1536 test matrix (a group of 8 SmolLM2 layers at 4k): time and error.

Run: ``.venv/bin/python benchmarks/prefill/range_finder.py`` (README.md in this folder has its output). Compares
Halko et al.'s one power iteration with a QR after each product (3 QRs) against one QR per power iteration (2 QRs,
what ``xkv.factorization`` does), and a Cholesky-QR variant. Best of 3 wall times, 2 threads.
"""

import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
TOKENS, COLUMNS, RANK = 4096, 1536, 200
WIDTH = RANK + 10
matrix = (torch.randn(TOKENS, COLUMNS) @ torch.randn(COLUMNS, COLUMNS) * torch.logspace(0, -3, COLUMNS)).contiguous()
test = torch.randn(COLUMNS, WIDTH)


def three_qr() -> torch.Tensor:
    basis = torch.linalg.qr(matrix @ test).Q
    basis = torch.linalg.qr(matrix.T @ basis).Q
    return torch.linalg.qr(matrix @ basis).Q


def two_qr() -> torch.Tensor:
    basis = torch.linalg.qr(matrix @ test).Q
    return torch.linalg.qr(matrix @ (matrix.T @ basis)).Q


def cholesky_qr(y: torch.Tensor) -> torch.Tensor:
    factor = torch.linalg.cholesky(y.T.double() @ y.double())
    return torch.linalg.solve_triangular(factor.float(), y.T, upper=False).T


def two_cholesky() -> torch.Tensor:
    basis = cholesky_qr(matrix @ test)
    return cholesky_qr(matrix @ (matrix.T @ basis))


def finish(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u)[:, :RANK], s[:RANK], vh[:RANK]


singular = torch.linalg.svdvals(matrix)
best_error = float((singular[RANK:] ** 2).sum().sqrt() / matrix.norm())
for name, finder in (("three QRs (Halko 4.4)", three_qr), ("two QRs", two_qr), ("two Cholesky-QRs", two_cholesky)):
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        u, s, vh = finish(finder())
        best = min(best, time.perf_counter() - start)
    error = float((matrix - u * s @ vh).norm() / matrix.norm())
    print(f"{name}: {best:.3f} s, relative error {error:.5f} (exact SVD at rank {RANK}: {best_error:.5f})")
