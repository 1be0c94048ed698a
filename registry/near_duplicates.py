"""Near-duplicate detection: MinHash signatures over word 3-grams, banded for look-up (LSH).

Two texts whose word-3-gram Jaccard similarity is at or above the configured threshold are
near-duplicates. A signature has 128 min-hashes; 32 bands of 4 rows each turn it into 32 bucket
keys, so any pair with similarity 0.8 shares a bucket with probability > 0.9999 and a pair at 0.3
with probability 0.23; candidates are then compared on their full signatures.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

NUM_PERMUTATIONS = 128
BANDS = 32
ROWS_PER_BAND = NUM_PERMUTATIONS // BANDS
SHINGLE_WORDS = 3
_MERSENNE_PRIME = (1 << 31) - 1
_WORD = re.compile(r"\w+", re.UNICODE)
_rng = np.random.default_rng(20261125)
_A = _rng.integers(1, _MERSENNE_PRIME, size=(NUM_PERMUTATIONS, 1), dtype=np.uint64)
_B = _rng.integers(0, _MERSENNE_PRIME, size=(NUM_PERMUTATIONS, 1), dtype=np.uint64)


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the text's lower-cased word 3-grams (the words themselves for shorter texts)."""
    words = _WORD.findall(text.lower())
    span = min(SHINGLE_WORDS, max(len(words), 1))
    grams = {" ".join(words[i : i + span]) for i in range(max(len(words) - span + 1, 1))}
    digests = b"".join(hashlib.blake2b(g.encode(), digest_size=4).digest() for g in sorted(grams))
    return np.frombuffer(digests, dtype="<u4").astype(np.uint64)


def signature(text: str) -> np.ndarray:
    """The MinHash signature (uint32[128]) of a text."""
    values = (_A * shingle_hashes(text)[None, :] + _B) % _MERSENNE_PRIME
    return values.min(axis=1).astype(np.uint32)


def to_bytes(sig: np.ndarray) -> bytes:
    return sig.astype("<u4").tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u4")


def band_keys(sig: np.ndarray) -> list[int]:
    """One positive 63-bit bucket key per band (band number mixed in)."""
    keys = []
    raw = sig.astype("<u4")
    for band in range(BANDS):
        rows = raw[band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND].tobytes()
        digest = hashlib.blake2b(band.to_bytes(2, "little") + rows, digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)
    return keys


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the two texts behind two signatures."""
    return float(np.count_nonzero(a == b)) / NUM_PERMUTATIONS
