"""The prefix KV cache: the longest cached prefix of a prompt is reused instead of prefilled again.

Entries are mlx-lm `KVCache` layers of one sequence together with the tokens they hold.
A hit hands the batch a view of an entry cut to the shared prefix; `BatchKVCache.merge`
copies what it reads, so stored entries are never written to.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mlx_lm.models.cache import KVCache

if TYPE_CHECKING:
    from .disk_cache import DiskCache


@dataclass(eq=False, slots=True)
class Entry:
    tokens: np.ndarray
    layers: list
    checkpoint: bool
    last_used: float
    hits: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(layer.nbytes for layer in self.layers)

    def value(self, now: float) -> float:
        """Tokens it is expected to save, discounted by how long it has gone unused."""
        return len(self.tokens) * (1 + self.hits) / (1 + (now - self.last_used) / 60)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def view(layers: list, length: int) -> list:
    """The layers cut to their first `length` tokens, sharing the stored arrays."""
    out = []
    for layer in layers:
        cut = KVCache()
        cut.keys, cut.values, cut.offset = layer.keys, layer.values, length
        out.append(cut)
    return out


def reusable(layers: list) -> bool:
    """Only plain KV caches can be cut at any token; other kinds are not cached."""
    return bool(layers) and all(type(layer) is KVCache for layer in layers)


@dataclass(slots=True)
class CacheStats:
    lookups: int = 0
    hits: int = 0
    disk_hits: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """Entries bounded by `budget` bytes, evicted by value: tokens saved, hits and recency.

    With a `disk` tier, each new entry is also written there, and a prompt that disk
    holds a longer prefix of than RAM is served from disk. With `bytes_per_token`, entries
    count against the budget as that many bytes a token rather than as the bytes they hold
    (in a group, where each rank holds a different share, so that all evict alike).
    """

    def __init__(self, budget: int, disk: "DiskCache | None" = None, clock=time.monotonic, bytes_per_token: int = 0):
        self.budget = budget
        self.disk = disk
        self.clock = clock
        self.bytes_per_token = bytes_per_token
        self.entries: list[Entry] = []
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def longest(self, tokens: np.ndarray) -> tuple[Entry | None, int]:
        best, best_len = None, 0
        for entry in self.entries:
            n = common_prefix(entry.tokens, tokens)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def match(self, tokens: list[int]) -> tuple[list | None, int]:
        """Layers holding the longest cached prefix of `tokens` (at most all but the last), and its length."""
        prompt = np.asarray(tokens, dtype=np.int64)
        entry, n = self.longest(prompt)
        if self.disk and (loaded := self.disk.fetch(prompt, n, self.clock())):
            self.add(loaded)
            entry, n = loaded, common_prefix(loaded.tokens, prompt)
            self.stats.disk_hits += 1
        n = min(n, len(tokens) - 1)
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(tokens)
        if entry is None or n <= 0:
            return None, 0
        entry.hits += 1
        entry.last_used = self.clock()
        self.stats.hits += 1
        self.stats.reused_tokens += n
        return view(entry.layers, n), n

    def store(self, tokens: list[int], layers: list, checkpoint: bool = False) -> Entry | None:
        """Keep `layers` as the state after `tokens`; returns the entry unless it cannot fit."""
        if not tokens or not reusable(layers):
            return None
        now = self.clock()
        entry = Entry(np.asarray(tokens, dtype=np.int64), layers, checkpoint, now)
        if self._cost(entry) > self.budget:
            return None
        for old in self.entries:
            if len(old.tokens) == len(entry.tokens) and common_prefix(old.tokens, entry.tokens) == len(entry.tokens):
                old.last_used = now
                return old
        self.entries = [e for e in self.entries if e.checkpoint or not self._covers(entry, e)]
        self.entries.append(entry)
        self._evict(now, keep=entry)
        if self.disk:
            self.disk.save(entry)
        return entry

    def add(self, entry: Entry):
        """Take in an entry loaded from elsewhere (the disk tier), making room for it."""
        entry.last_used = self.clock()
        self.entries.append(entry)
        self._evict(entry.last_used, keep=entry)

    @staticmethod
    def _covers(new: Entry, old: Entry) -> bool:
        """`new` holds all of `old` and more, so `old` can never give a longer match."""
        return len(old.tokens) < len(new.tokens) and common_prefix(old.tokens, new.tokens) == len(old.tokens)

    def _cost(self, entry: Entry) -> int:
        return len(entry.tokens) * self.bytes_per_token if self.bytes_per_token else entry.nbytes

    def _evict(self, now: float, keep: Entry):
        total = sum(self._cost(e) for e in self.entries)
        for victim in sorted((e for e in self.entries if e is not keep), key=lambda e: e.value(now)):
            if total <= self.budget:
                break
            self.entries.remove(victim)
            total -= self._cost(victim)
            self.stats.evictions += 1


@dataclass(slots=True)
class Turn:
    """A prompt's text and ids, and the ids generated after it."""

    text: str
    tokens: list[int]
    reply: list[int]


class TurnMemory:
    """Recent prompts with their replies, so that the next turn starts with exactly their token ids.

    A chat template renders the next turn as text, and encoding that text again can give
    other ids for the reply than the ones generated (a BPE merges differently), which would
    end the prefix cache's match there. A prompt whose text starts with a remembered prompt's
    text keeps its ids, then the generated ids as far as their text matches, and only the
    rest is encoded.
    """

    def __init__(self, decode, size: int = 8):
        self.decode = decode
        self.size = size
        self.turns: list[Turn] = []

    def remember(self, text: str, tokens: list[int], reply: list[int]):
        """Keep a finished request's prompt and reply where its ids decode to exactly its text.

        The reply is kept up to the first id that decodes to a replacement character (a
        byte that is not a whole character): text cannot stand for it.
        """
        if self.decode(tokens) != text:
            return
        kept = longest(len(reply), lambda n: "\ufffd" not in self.decode(reply[:n]))
        turn = Turn(text, list(tokens), reply[:kept])
        self.turns = [t for t in self.turns if t.text != text][-(self.size - 1) :] + [turn]

    def encode(self, text: str, encode) -> list[int]:
        """`text` as token ids: a remembered turn's ids for the longest part it covers, `encode` for the rest."""
        best_ids, best_chars = None, 0
        for turn in self.turns:
            if not text.startswith(turn.text):
                continue
            rest = text[len(turn.text) :]
            kept = longest(len(turn.reply), lambda n: rest.startswith(self.decode(turn.reply[:n])))
            chars = len(turn.text) + len(self.decode(turn.reply[:kept]))
            if best_ids is None or chars > best_chars:
                best_ids, best_chars = turn.tokens + turn.reply[:kept], chars
        if best_ids is None:
            return encode(text)
        return best_ids + (encode(text[best_chars:]) if best_chars < len(text) else [])


def longest(n: int, fits) -> int:
    """The largest k ≤ n with `fits(k)`, for a `fits` that holds up to some k and not after (and for 0)."""
    if fits(n):
        return n
    low, high = 0, n
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
