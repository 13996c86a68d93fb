"""An honest baseline: a smoothed byte n-gram model (interpolated Kneser-Ney).

Fitted on the train files, scored on the same held-out texts as the PLT models, in bits per
byte. Each file starts with `order - 1` copies of a padding symbol (256), the n-gram analogue of
the model's <bos>; the 256 byte values are the vocabulary.

    P_N(w | h)  = max(c(h w) - D_N, 0) / c(h)  +  D_N * N1+(h .) / c(h) * P_{N-1}(w | h')
    P_k(w | h)  = max(N1+(. h w) - D_k, 0) / N1+(. h .) + D_k * N1+(h .)' / N1+(. h .) * P_{k-1}
    P_1(w)      = max(N1+(. w) - D_1, 0) / N1+(. .) + D_1 * |seen| / N1+(. .) / 256

Lower orders use continuation counts (how many distinct bytes precede h w), the Kneser-Ney
idea; a context never seen hands all its mass to the next order down. Discounts are the
usual D = n1 / (n1 + 2 n2) per order. Everything is counted with numpy on integer keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = 256
BASE = 257  # symbols: 256 bytes + PAD


def _encode(texts: list[str], order: int) -> list[np.ndarray]:
    pad = np.full(order - 1, PAD, dtype=np.int64)
    return [
        np.concatenate([pad, np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)])
        for t in texts
    ]


def _grams(seqs: list[np.ndarray], n: int, order: int) -> np.ndarray:
    """Keys of every n-gram ending at a real byte (positions order-1.. of each padded seq)."""
    keys = []
    for s in seqs:
        m = len(s) - (order - 1)
        if m <= 0:
            continue
        k = np.zeros(m, dtype=np.int64)
        for j in range(n):  # oldest symbol first
            k = k * BASE + s[order - n + j : order - n + j + m]
        keys.append(k)
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)


class _Table:
    """Sorted keys -> counts, with vectorised lookup (0 where absent)."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray):
        order = np.argsort(keys)
        self.keys, self.counts = keys[order], counts[order]

    @classmethod
    def count(cls, keys: np.ndarray) -> _Table:
        k, c = np.unique(keys, return_counts=True)
        return cls(k, c.astype(np.float64))

    def get(self, q: np.ndarray) -> np.ndarray:
        if len(self.keys) == 0:
            return np.zeros(len(q))
        i = np.clip(np.searchsorted(self.keys, q), 0, len(self.keys) - 1)
        return np.where(self.keys[i] == q, self.counts[i], 0.0)


def _discount(counts: np.ndarray) -> float:
    n1, n2 = (counts == 1).sum(), (counts == 2).sum()
    return float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.75


@dataclass
class KneserNey:
    order: int
    levels: list  # per n = 1..order: (gram table, context-total table, context-types table, D)

    @classmethod
    def fit(cls, texts: list[str], order: int = 3) -> KneserNey:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        seqs = _encode(texts, order)
        levels = []
        for n in range(1, order + 1):
            if n == order:  # real counts at the top order
                table = _Table.count(_grams(seqs, n, order))
            else:  # continuation counts: distinct predecessors of each n-gram
                longer = np.unique(_grams(seqs, n + 1, order))
                table = _Table.count(longer % BASE**n)
            ctx = table.keys // BASE  # context of each gram (0 for unigrams)
            uniq, inv = np.unique(ctx, return_inverse=True)
            sums = np.bincount(inv, weights=table.counts)
            types = np.bincount(inv)
            totals = _Table(uniq, sums)
            ntypes = _Table(uniq, types.astype(np.float64))
            levels.append((table, totals, ntypes, _discount(table.counts)))
        return cls(order, levels)

    def probs(self, seq: np.ndarray) -> np.ndarray:
        """P of each real symbol of a padded int sequence (`order - 1` leading context symbols)."""
        m = len(seq) - (self.order - 1)
        p = np.full(max(m, 0), 1.0 / 256)
        if m <= 0:
            return p
        for n in range(1, self.order + 1):
            table, totals, ntypes, D = self.levels[n - 1]
            key = np.zeros(m, dtype=np.int64)
            for j in range(n):
                key = key * BASE + seq[self.order - n + j : self.order - n + j + m]
            ctx = key // BASE
            c, tot, typ = table.get(key), totals.get(ctx), ntypes.get(ctx)
            seen = tot > 0
            safe = np.where(seen, tot, 1.0)
            p = np.where(seen, np.maximum(c - D, 0) / safe + D * typ / safe * p, p)
        return p

    def log2_probs(self, texts: list[str]) -> np.ndarray:
        """-log2 P of every byte of every text, concatenated."""
        out = [-np.log2(self.probs(s)) for s in _encode(texts, self.order)]
        return np.concatenate(out) if out else np.zeros(0)

    def bits_per_byte(self, texts: list[str]) -> float:
        bits = self.log2_probs(texts)
        return float(bits.sum() / max(len(bits), 1))
