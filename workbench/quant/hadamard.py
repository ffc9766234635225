"""Hadamard matrices of the widths a model has, and the random-signed orthogonal rotations built from them.

A Hadamard matrix H of order n has entries ±1 and H @ H.T = n I, so H / sqrt(n) is orthogonal. Orders are 1, 2
or multiples of 4; this file builds them as Kronecker products of

    Sylvester (Walsh–Hadamard) matrices of order 2^k:  H_{2n} = [[H, H], [H, -H]]
    Paley I matrices of order q + 1 for a prime q ≡ 3 (mod 4): 4, 8, 12, 20, 24, 32, 44, 48, 60, 68 ...
        (R. Paley, "On orthogonal matrices", J. Math. Phys. 1933)

The widths of the default model: 576 = 12 x 12 x 4 (Paley 12 ⊗ Paley 12 ⊗ Sylvester 4), 1536 = 12 x 128
(Paley 12 ⊗ Sylvester 128); stories260K: 64 = Sylvester 64, 172 = 4 x 43 has none (43 Sylvester-4 blocks).
A width with no such factorization gets a block-diagonal matrix of the largest Hadamard block that divides
it (still orthogonal, but it only mixes channels within a block);
`hadamard_construction` says which one a width gets.

A random-signed rotation (QuaRot, https://arxiv.org/abs/2404.00456) is Q = diag(s) H / sqrt(n) with s ∈ {±1}^n
drawn from a seed: x @ Q flips signs, then mixes every channel with every other one.
"""

from __future__ import annotations

import functools

import torch

_MAX_PALEY_Q = 1000


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix [n, n] (float64, ±1) for n a power of two."""
    assert n >= 1 and n & (n - 1) == 0, f"Sylvester order must be a power of two, got {n}"
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def paley(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix [q+1, q+1] (float64, ±1) for a prime q ≡ 3 (mod 4).

    Jacobsthal matrix Qj[i, j] = χ(j - i) (χ: quadratic character mod q); H = I + [[0, 1ᵀ], [-1, Qj]].
    """
    assert _is_prime(q) and q % 4 == 3, f"Paley I needs a prime q ≡ 3 mod 4, got {q}"
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = -1.0
    C[1:, 1:] = chi[idx]
    return C + torch.eye(q + 1, dtype=torch.float64)


def _factor(n: int) -> list[tuple[str, int]] | None:
    """Kronecker factors [(kind, order)] of a Hadamard matrix of order n, or None (Sylvester x Paley ...)."""
    if n == 1:
        return []
    if n & (n - 1) == 0:
        return [("sylvester", n)]
    for m in range(12, n + 1, 4):
        q = m - 1
        if n % m == 0 and m & (m - 1) and q <= _MAX_PALEY_Q and _is_prime(q) and q % 4 == 3:
            rest = _factor(n // m)
            if rest is not None:
                return [("paley", m)] + rest
    return None


def hadamard_construction(n: int) -> str:
    """How `hadamard(n)` is built, e.g. 'paley 12 ⊗ paley 48' or 'block-diagonal 4 x sylvester 8'."""
    factors = _factor(n)
    if factors is not None:
        return " ⊗ ".join(f"{kind} {m}" for kind, m in factors) or "1"
    b = _largest_block(n)
    return f"block-diagonal {n // b} x ({hadamard_construction(b)})"


def _largest_block(n: int) -> int:
    return max(m for m in range(1, n + 1) if n % m == 0 and _factor(m) is not None)


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    factors = _factor(n)
    if factors is None:
        b = _largest_block(n)
        return torch.block_diag(*[_hadamard(b)] * (n // b))
    H = torch.ones(1, 1, dtype=torch.float64)
    for kind, m in factors:
        H = torch.kron(H, sylvester(m) if kind == "sylvester" else paley(m - 1))
    return H


def hadamard(n: int) -> torch.Tensor:
    """A ±1 matrix H [n, n] (float64) with H Hᵀ = n I; block-diagonal (H Hᵀ = block I, zeros outside the
    blocks) when n has no factorization (`hadamard_construction`)."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    return _hadamard(n).clone()


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal rotation Q = diag(s) H / sqrt(n) [n, n] (float64), s ∈ {±1}^n drawn from `seed`.

    Q Qᵀ = I; x @ Q rotates a row vector x [..., n]. Every entry of Q has magnitude 1/sqrt(n) (or, for a
    block-diagonal H, 1/sqrt(block) inside the blocks).
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    H = hadamard(n)
    norm = H.abs().sum(1, keepdim=True).sqrt()  # sqrt of the block size each row mixes
    return s[:, None] * H / norm
