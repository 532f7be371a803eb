"""Deduplication, seeded train/holdout splits and seeded subsamples, and the prompt-set builder.

Every random choice here ranks prompts by ``sha256(f"{seed}:{prompt_hash}")`` within their
category, so a prompt's fate depends on its text, its category and the seed, never on the
order of the list it came in.

Example::

    prompts = build_prompt_set(["donotanswer", "harmbench"], n_per_source=64,
                               holdout_fraction=0.2, seed=0)
    train = [p for p in prompts if p.split == "train"]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import replace

from torsion.data.records import Prompt
from torsion.data.sources import load_source
from torsion.errors import TorsionError


def deduplicate(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Drop repeated prompt texts (same ``prompt_hash``); the first occurrence wins and order is kept."""
    seen: set[str] = set()
    unique = []
    for prompt in prompts:
        if prompt.prompt_hash not in seen:
            seen.add(prompt.prompt_hash)
            unique.append(prompt)
    return unique


def _seeded_rank(prompt: Prompt, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{prompt.prompt_hash}".encode()).hexdigest()


def _ranked_by_category(prompts: Sequence[Prompt], seed: int) -> dict[str, list[int]]:
    """Indices into ``prompts`` per category, each list in seeded-rank order."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.category, []).append(index)
    for indices in groups.values():
        indices.sort(key=lambda i: _seeded_rank(prompts[i], seed))  # stable: equal texts keep list order
    return groups


def assign_split(prompts: Sequence[Prompt], *, holdout_fraction: float = 0.2, seed: int = 0) -> list[Prompt]:
    """The prompts, in order, with ``split`` set: a seeded holdout stratified by category.

    In each category of ``n`` prompts the first ``round(holdout_fraction * n)`` by seeded rank
    are ``"holdout"``, the rest ``"train"``. Deduplicate first, so that one text cannot land
    in both splits.
    """
    if not 0 <= holdout_fraction < 1:
        raise TorsionError(f"holdout fraction must be in [0, 1), got {holdout_fraction}; use e.g. 0.2, or 0 for none")
    held: set[int] = set()
    for ranked in _ranked_by_category(prompts, seed).values():
        held.update(ranked[: round(holdout_fraction * len(ranked))])
    return [replace(p, split="holdout" if i in held else "train") for i, p in enumerate(prompts)]


def sample(prompts: Sequence[Prompt], n: int | None, *, seed: int) -> list[Prompt]:
    """A seeded subsample of exactly ``n`` prompts, stratified by category, in input order.

    All prompts come back when ``n`` is None or at least ``len(prompts)``. Categories share
    ``n`` in proportion to their size (largest remainders first, ties by name); within one, the
    first prompts by seeded rank are kept.
    """
    if n is not None and n < 0:
        raise TorsionError(f"cannot sample {n} prompts; ask for 0 or more")
    if n is None or n >= len(prompts):
        return list(prompts)
    groups = _ranked_by_category(prompts, seed)
    exact = {category: n * len(ranked) / len(prompts) for category, ranked in groups.items()}
    quota = {category: int(share) for category, share in exact.items()}
    by_remainder = sorted(exact, key=lambda c: (quota[c] - exact[c], c))
    for category in by_remainder[: n - sum(quota.values())]:
        quota[category] += 1
    chosen = {i for category, ranked in groups.items() for i in ranked[: quota[category]]}
    return [p for i, p in enumerate(prompts) if i in chosen]


def build_prompt_set(specs: Sequence[str], *, n_per_source: int | None, holdout_fraction: float,
                     seed: int) -> list[Prompt]:
    """Load each source, deduplicate it and :func:`sample` ``n_per_source`` of it, then
    deduplicate across sources (earlier specs win) and :func:`assign_split` the result."""
    prompts = [p for spec in specs for p in sample(deduplicate(load_source(spec)), n_per_source, seed=seed)]
    return assign_split(deduplicate(prompts), holdout_fraction=holdout_fraction, seed=seed)
