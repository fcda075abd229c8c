"""NOAH's evolutionary search over subnets of a trained supernet (ZhangYuanhan-AI/NOAH e9c55f3, `evolution.py`).

A candidate is one tuple of 3·L per-block widths: the prompt lengths, the LoRA ranks and the adapter widths of
blocks 0..L-1, each list non-zero in its first `depth` blocks and zero after (the code's tuple also carries L and
the prefix widths, which NOAH's VTAB runs fix at 0). The search, as `EvolutionSearcher.search`:

1. `population` random legal candidates (per module a depth from `depths`, then a width from `dims` per block);
2. each generation: rank every candidate evaluated so far into the top `select`; `mutation_num` mutants, then
   `crossover_num` children of the top `select`; random ones fill the population up; next generation;
3. legal: not seen before, its parameter count (`count`) within [min_limit, limit]; each legal candidate is scored
   once (`fitness`) and remembered.

Mutation (the code's): per module, with probability `m_prob` its depth is redrawn with probability `s_prob` (else
kept); a deeper module gets random widths in its new blocks, a shallower one is cut; the widths of the blocks it
keeps never change. Crossover: per module, the whole width list of one of two parents drawn from the top
`select`. A mutation or crossover round gives up after 10 times its count of draws, as the code does; the random
fill gives up after 100 times (the code loops forever; here a space smaller than the population ends the round).

The choice: the code prints the top 50 at the start of each generation and leaves the pick to its user; here the
last generation is ranked too and the best candidate evaluated is chosen (ties: the one ranked first, Python's
stable sort over the order of evaluation).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Candidate = tuple[int, ...]


def split(cand: Candidate, blocks: int) -> list[list[int]]:
    """The candidate's three width lists: prompts, LoRA, adapter."""
    return [list(cand[i * blocks : (i + 1) * blocks]) for i in range(3)]


def depth_of(widths: list[int]) -> int:
    """Blocks before the first zero width (the code's `cur_depth`)."""
    return next((i for i, w in enumerate(widths) if w == 0), len(widths))


@dataclass
class Evolution:
    """One search; `run()` returns the chosen candidate and the search's trace.

    Attributes:
        blocks: L.
        dims / depths: the search space (the same for the three modules, as NOAH's yaml files give it).
        count: a candidate's parameter count (what the limit is compared with).
        fitness: a candidate's accuracy with the supernet's weights.
    """

    blocks: int
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    count: Callable[[Candidate], int]
    fitness: Callable[[Candidate], float]
    limit: float
    min_limit: float = 0.0
    population: int = 50
    generations: int = 20
    select: int = 10
    mutation_num: int = 25
    crossover_num: int = 25
    m_prob: float = 0.2
    s_prob: float = 0.4
    seed: int = 0
    scores: dict[Candidate, float] = field(default_factory=dict)
    trace: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.top: list[Candidate] = []

    def widths(self, depth: int) -> list[int]:
        return [self.rng.choice(self.dims) for _ in range(depth)] + [0] * (self.blocks - depth)

    def random_candidate(self) -> Candidate:
        depths = [self.rng.choice(self.depths) for _ in range(3)]  # prompt, LoRA, adapter, as the code draws them
        return tuple(w for d in depths for w in self.widths(d))

    def legal(self, cand: Candidate) -> bool:
        """Not seen before and within the limits; scored (once) when legal."""
        if cand in self.scores:
            return False
        params = self.count(cand)
        if not self.min_limit <= params <= self.limit:
            return False
        self.scores[cand] = self.fitness(cand)
        return True

    def collect(self, make: Callable[[], Candidate], want: int, tries: int, into: list[Candidate]) -> None:
        while len(into) < want and tries > 0:
            tries -= 1
            cand = make()
            if self.legal(cand):
                into.append(cand)

    def rank(self, cands: list[Candidate]) -> None:
        merged = self.top + [c for c in cands if c not in self.top]
        merged.sort(key=lambda c: self.scores[c], reverse=True)  # stable: earlier evaluated first among equals
        self.top = merged[: self.select]

    def mutant(self) -> Candidate:
        lists = split(self.rng.choice(self.top), self.blocks)
        for m, widths in enumerate(lists):
            if self.rng.random() < self.m_prob:
                current = depth_of(widths)
                new = self.rng.choice(self.depths) if self.rng.random() < self.s_prob else current
                if new > current:
                    widths = widths[:current] + [self.rng.choice(self.dims) for _ in range(new - current)]
                widths = widths[:new] + [0] * (self.blocks - new)
                lists[m] = widths
        return tuple(w for widths in lists for w in widths)

    def child(self) -> Candidate:
        a, b = (split(self.rng.choice(self.top), self.blocks) for _ in range(2))
        return tuple(w for pa, pb in zip(a, b, strict=True) for w in self.rng.choice([pa, pb]))

    def run(self) -> tuple[Candidate, float]:
        cands: list[Candidate] = []
        self.collect(self.random_candidate, self.population, 100 * self.population, cands)
        if not cands:
            raise ValueError(f"no subnet within the parameter limit {self.limit:g} was found")
        for _ in range(self.generations):
            self.rank(cands)
            self.trace.append(self.scores[self.top[0]])
            cands = []
            self.collect(self.mutant, self.mutation_num, 10 * self.mutation_num, cands)
            crossed: list[Candidate] = []
            self.collect(self.child, self.crossover_num, 10 * self.crossover_num, crossed)
            cands += crossed
            self.collect(self.random_candidate, self.population, 100 * self.population, cands)
        self.rank(cands)
        return self.top[0], self.scores[self.top[0]]
