"""Seeds derived from tuples such as ``("augment", seed, epoch, index)``.

A hash rather than ``seed + epoch`` arithmetic, so that nearby tuples give unrelated streams and
the same tuple gives the same stream in every process, platform and Python version.
"""
import hashlib

import torch


def seed_for(*parts) -> int:
    """A 63-bit seed from ints and strings; stable across processes (unlike ``hash``)."""
    text = repr(tuple(p if isinstance(p, str) else int(p) for p in parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`seed_for`."""
    return torch.Generator().manual_seed(seed_for(*parts))
