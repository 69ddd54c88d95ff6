"""The prefix cache: the longest cached prefix of a prompt is reused instead of prefilled again.

An entry is the state of every cache layer after its tokens, for one sequence, plus
*snapshots*: the state of the layers that cannot be cut (sliding windows that have rotated,
recurrent state) at earlier positions where prompts part ways (see `cache_kinds`). A prompt
resumes at the longest position where every layer can resume: any shared token on a model
of plain KV layers, else the entry's end or one of its snapshots. A hit hands the batch
views of the stored arrays; mlx-lm's batch caches copy what they merge, so stored entries
are never written to.
"""

import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from . import cache_kinds

if TYPE_CHECKING:
    from .disk_cache import DiskCache

MAX_SNAPSHOTS = 8  # per entry; the positions the request asked for come first, then the latest


@dataclass(eq=False, slots=True)
class Entry:
    tokens: np.ndarray
    layers: list
    checkpoint: bool
    last_used: float
    snapshots: dict[int, list] = field(default_factory=dict)
    hits: int = 0
    nbytes: int = field(init=False)
    cuttable: bool = field(init=False)

    def __post_init__(self) -> None:
        self.cuttable = all(cache_kinds.cuttable(layer) for layer in self.layers)
        self.count()

    def count(self) -> None:
        self.nbytes = cache_kinds.nbytes(self.layers + [x for s in self.snapshots.values() for x in s])

    def resumable(self, n: int) -> int:
        """The longest position up to `n` where every layer of this entry can resume."""
        if n >= len(self.tokens) or self.cuttable:
            return min(n, len(self.tokens))
        return max((p for p in self.snapshots if p <= n), default=0)

    def layers_at(self, n: int) -> list:
        """The layers' state after the first `n` tokens (a position `resumable` gave), sharing the stored arrays."""
        if n == len(self.tokens):
            return [layer if not cache_kinds.is_kv(layer) else cache_kinds.cut(layer, n) for layer in self.layers]
        if (kept := self.snapshots.get(n)) is None:
            return [cache_kinds.cut(layer, n) for layer in self.layers]
        return [cache_kinds.resume(end, k, n) for end, k in zip(self.layers, kept, strict=False)]

    def value(self, now: float) -> float:
        """Tokens it is expected to save, discounted by how long it has gone unused."""
        return len(self.tokens) * (1 + self.hits) / (1 + (now - self.last_used) / 60)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def truncate(entry: Entry, n: int, clock: float) -> Entry:
    """A new entry holding `entry` up to `n` tokens (a resumable position), in copies of no more than that."""
    snapshots = {p: s for p, s in entry.snapshots.items() if p < n}
    return Entry(entry.tokens[:n], [cache_kinds.owned(x) for x in entry.layers_at(n)], False, clock, snapshots)


@dataclass(slots=True)
class CacheStats:
    lookups: int = 0
    hits: int = 0
    disk_hits: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evictions: int = 0
    snapshot_hits: int = 0


@dataclass(slots=True)
class Match:
    """A prompt's longest resumable cached prefix: the layers after its first `length` tokens."""

    layers: list | None = None
    length: int = 0
    entry: Entry | None = None


class PrefixCache:
    """Entries bounded by `budget` bytes, evicted by value: tokens saved, hits and recency.

    With a `disk` tier, each new entry is also written there, and a prompt that disk
    holds a longer prefix of than RAM is served from disk. With `bytes_per_token`, entries
    count against the budget as that many bytes a token, and `bytes_per_snapshot` a snapshot,
    rather than as the bytes they hold (in a group, where each rank holds a different share,
    so that all evict alike).
    """

    def __init__(
        self,
        budget: int,
        disk: "DiskCache | None" = None,
        clock: Callable[[], float] = time.monotonic,
        bytes_per_token: int = 0,
        bytes_per_snapshot: int = 0,
    ) -> None:
        self.budget = budget
        self.disk = disk
        self.clock = clock
        self.bytes_per_token = bytes_per_token
        self.bytes_per_snapshot = bytes_per_snapshot
        self.entries: list[Entry] = []
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def snapshot_count(self) -> int:
        return sum(len(e.snapshots) for e in self.entries)

    @property
    def snapshot_nbytes(self) -> int:
        return sum(cache_kinds.nbytes([x for s in e.snapshots.values() for x in s]) for e in self.entries)

    def longest(self, tokens: np.ndarray, limit: int) -> tuple[Entry | None, int]:
        """The entry that can resume furthest into `tokens`, at most `limit` tokens in."""
        best, best_len = None, 0
        for entry in self.entries:
            n = entry.resumable(min(common_prefix(entry.tokens, tokens), limit))
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def match(self, tokens: list[int]) -> Match:
        """The longest resumable cached prefix of `tokens` (at most all but the last)."""
        prompt = np.asarray(tokens, dtype=np.int64)
        limit = len(tokens) - 1
        entry, n = self.longest(prompt, limit)
        if self.disk and (loaded := self.disk.fetch(prompt, n, self.clock())):
            self.add(loaded)
            entry, n = loaded, loaded.resumable(min(common_prefix(loaded.tokens, prompt), limit))
            self.stats.disk_hits += 1
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(tokens)
        if entry is None or n <= 0:
            return Match()
        entry.hits += 1
        entry.last_used = self.clock()
        self.stats.hits += 1
        self.stats.snapshot_hits += n in entry.snapshots
        self.stats.reused_tokens += n
        return Match(entry.layers_at(n), n, entry)

    def store(
        self,
        tokens: list[int],
        layers: list,
        checkpoint: bool = False,
        snapshots: dict[int, list] | None = None,
        keep: Set[int] = frozenset(),
    ) -> Entry | None:
        """Keep `layers` as the state after `tokens`, with `snapshots` of earlier positions; returns the entry unless
        it cannot fit.

        Snapshots of entries that share a prefix with the new one are shared into it, and an
        entry the new one extends is dropped (its end state becomes one of the new one's
        snapshots); past `MAX_SNAPSHOTS`, those at positions in `keep` are kept first.
        """
        if not tokens or not all(isinstance(layer, cache_kinds.BATCHABLE) for layer in layers):
            return None
        now = self.clock()
        asked = dict(snapshots or {})
        # mlx-lm hands a row's recurrent state back as views of the whole batch's arrays: keep copies
        layers = [layer if cache_kinds.is_kv(layer) else cache_kinds.owned(layer) for layer in layers]
        mx.eval([cache_kinds.arrays(layer) for layer in layers])
        entry = Entry(np.asarray(tokens, dtype=np.int64), layers, checkpoint, now, asked)
        for old in self.entries:
            if len(old.tokens) == len(entry.tokens) and common_prefix(old.tokens, entry.tokens) == len(entry.tokens):
                old.last_used = now
                return old
        if not entry.cuttable:
            self._inherit(entry, keep=set(asked) | set(keep))
        if self._cost(entry) > self.budget:
            return None
        self.entries = [e for e in self.entries if e.checkpoint or not self._covers(entry, e)]
        self.entries.append(entry)
        self._evict(now, keep=entry)
        if self.disk:
            self.disk.save(entry)
        return entry

    def _inherit(self, entry: Entry, keep: set[int]) -> None:
        """Share into `entry` the snapshots (and ends) of other entries at positions inside its prefix."""
        found = dict(entry.snapshots)
        for old in self.entries:
            shared = common_prefix(old.tokens, entry.tokens)
            found |= {p: s for p, s in old.snapshots.items() if p <= shared and p not in found}
            if shared == len(old.tokens) < len(entry.tokens) and shared not in found:
                found[shared] = [cache_kinds.snapshot(layer) for layer in old.layers]
        latest = sorted((p for p in found if p not in keep), reverse=True)[: max(0, MAX_SNAPSHOTS - len(keep))]
        entry.snapshots = {p: found[p] for p in sorted(found) if p in keep or p in latest}
        entry.count()

    def add(self, entry: Entry) -> None:
        """Take in an entry loaded from elsewhere (the disk tier), making room for it."""
        entry.last_used = self.clock()
        self.entries.append(entry)
        self._evict(entry.last_used, keep=entry)

    @staticmethod
    def _covers(new: Entry, old: Entry) -> bool:
        """`new` holds all of `old` and more, so `old` can never give a longer match."""
        return len(old.tokens) < len(new.tokens) and common_prefix(old.tokens, new.tokens) == len(old.tokens)

    def _cost(self, entry: Entry) -> int:
        if not self.bytes_per_token:
            return entry.nbytes
        return len(entry.tokens) * self.bytes_per_token + len(entry.snapshots) * self.bytes_per_snapshot

    def _evict(self, now: float, keep: Entry) -> None:
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

    def __init__(self, decode: Callable[[list[int]], str], size: int = 8) -> None:
        self.decode = decode
        self.size = size
        self.turns: list[Turn] = []

    def remember(self, text: str, tokens: list[int], reply: list[int]) -> None:
        """Keep a finished request's prompt and reply where its ids decode to exactly its text.

        The reply is kept up to the first id that decodes to a replacement character (a
        byte that is not a whole character): text cannot stand for it.
        """
        if self.decode(tokens) != text:
            return
        kept = longest(len(reply), lambda n: "\ufffd" not in self.decode(reply[:n]))
        turn = Turn(text, list(tokens), reply[:kept])
        self.turns = [t for t in self.turns if t.text != text][-(self.size - 1) :] + [turn]

    def encode(self, text: str, encode: Callable[[str], list[int]]) -> list[int]:
        """`text` as token ids: a remembered turn's ids for the longest part it covers, `encode` for the rest."""
        best_ids, best_chars = None, 0
        for turn in self.turns:
            if not text.startswith(turn.text):
                continue
            rest = text[len(turn.text) :]
            # longest() calls the lambda within this iteration, so it sees this turn's `rest` and `turn`
            kept = longest(len(turn.reply), lambda n: rest.startswith(self.decode(turn.reply[:n])))  # noqa: B023
            chars = len(turn.text) + len(self.decode(turn.reply[:kept]))
            if best_ids is None or chars > best_chars:
                best_ids, best_chars = turn.tokens + turn.reply[:kept], chars
        if best_ids is None:
            return encode(text)
        return best_ids + (encode(text[best_chars:]) if best_chars < len(text) else [])


def longest(n: int, fits: Callable[[int], bool]) -> int:
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
