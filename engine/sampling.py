"""Samplers and logits processors for one request, built from mlx-lm's, and the repetition guard."""

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from .request import Sampling


def check(s: Sampling, vocab_size: int) -> str | None:
    """Why these settings cannot be used, or None."""
    if not 0 <= s.temperature <= 100:
        return f"temperature must be between 0 and 100, got {s.temperature}"
    if not 0 <= s.top_p <= 1:
        return f"top_p must be between 0 and 1, got {s.top_p}"
    if not 0 <= s.min_p < 1:
        return f"min_p must be at least 0 and below 1, got {s.min_p}"
    if not 0 <= s.top_k < vocab_size:
        return f"top_k must be 0 (off) or below the vocabulary size {vocab_size}, got {s.top_k}"
    if s.seed is not None and not 0 <= s.seed < 2**64:
        return f"seed must be between 0 and 2^64 - 1, got {s.seed}"
    if s.repetition_penalty < 0:
        return f"repetition_penalty must be 0 (off) or more, got {s.repetition_penalty}"
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(s, name) <= 2:
            return f"{name} must be between -2 and 2, got {getattr(s, name)}"
    for token in s.logit_bias or {}:
        if not 0 <= token < vocab_size:
            return f"logit_bias names token {token}, outside the vocabulary of {vocab_size}"
    return None


class SeededSampler:
    """Draws the token of each position with the next key of the seed's chain, so a seeded request repeats
    inside any batch; one call may draw several positions, and `rewind` gives back the keys of those not used.
    """

    def __init__(self, s: Sampling, seed: int) -> None:
        self.s = s
        self.chain = mx.random.key(seed)
        self.spare: list[mx.array] = []  # keys given back, for the next positions
        self.drawn: list[mx.array] = []

    def _key(self) -> mx.array:
        if self.spare:
            return self.spare.pop(0)
        self.chain, key = mx.random.split(self.chain)
        return key

    def __call__(self, logprobs: mx.array) -> mx.array:
        s = self.s
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        if 0 < s.top_p < 1:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0:
            logprobs = apply_min_p(logprobs, s.min_p)
        self.drawn = [self._key() for _ in range(logprobs.shape[0])]
        scaled = logprobs * (1 / s.temperature)
        return mx.concatenate([mx.random.categorical(scaled[j : j + 1], key=k) for j, k in enumerate(self.drawn)])

    def rewind(self, n: int) -> None:
        """The last `n` positions of the last call were not used: their keys go to the next ones."""
        if n:
            self.spare = self.drawn[-n:] + self.spare


def sampler(s: Sampling) -> Callable[[mx.array], mx.array]:
    if s.seed is not None and s.temperature > 0:
        return SeededSampler(s, s.seed)
    return make_sampler(s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)


def logits_processors(s: Sampling, default_repetition_penalty: float) -> list[Callable[[mx.array, mx.array], mx.array]]:
    return make_logits_processors(
        logit_bias=s.logit_bias,
        repetition_penalty=s.repetition_penalty or default_repetition_penalty or None,
        presence_penalty=s.presence_penalty or None,
        frequency_penalty=s.frequency_penalty or None,
    )


class LoopGuard:
    """Ends a generation whose last `window` tokens repeat one span of at most `max_period` tokens."""

    CHECK_EVERY = 16

    def __init__(self, window: int, max_period: int) -> None:
        self.window = window
        self.max_period = max_period
        self.tokens: list[int] = []

    def looping(self, token: int) -> bool:
        self.tokens.append(token)
        n = len(self.tokens)
        if self.window <= 0 or n < self.window or n % self.CHECK_EVERY:
            return False
        tail = np.asarray(self.tokens[-self.window :])
        periods = range(1, min(self.max_period, self.window // 2) + 1)
        return any(np.array_equal(tail[p:], tail[:-p]) for p in periods)
