"""Prompt-lookup speculative decoding on mlx-lm's batched generator.

A row's draft is what followed the longest earlier occurrence of its last few tokens, in its
prompt or its reply. The drafted tokens are fed to the model with the row's next token in
one pass; each position is processed (penalties, a grammar) and sampled as plain decoding
would, and the draft is kept up to the first position where the sample differs, so the
output is the one decoding without speculation gives. What the model saw past the kept
tokens is cut from the KV cache; layers that cannot be cut (sliding windows, recurrent
state) are held before the pass and, after a miss, put back and fed the kept tokens again.

Speculation runs while one request decodes. With several in the batch each row would need
its own cut (mlx-lm's `BatchKVCache.trim` cuts every row alike; rolling each row's KV to its
own length copies the whole batch's cache every pass), and a pass over four rows of nine
tokens costs twice one over four single tokens here, so the scheduler decodes plainly.
"""

from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import BatchKVCache, CacheList

from .grammar import GrammarProcessor

NGRAM = (3, 5)  # the shortest and longest suffix looked up; shorter matches draft mostly noise
MAX_REST = 32  # the most plain steps between drafts after misses in a row


class PromptLookup:
    """One row's tokens, and the draft its last tokens' earlier occurrences propose."""

    def __init__(self, tokens: list[int], most: int) -> None:
        self.tokens = np.zeros(max(256, 2 * len(tokens)), np.int32)
        self.size = 0
        self.most = most
        self.length = min(4, most)  # adapted to how much of each draft is kept
        self.misses = 0  # passes in a row that kept nothing
        self.resting = 0  # steps to decode plainly before drafting again
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        end = self.size + len(tokens)
        if end > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.zeros(end, np.int32)])
        self.tokens[self.size : end] = tokens
        self.size = end

    def match(self, shortest: int) -> int | None:
        """Where the latest earlier copy of the longest suffix of `shortest` to NGRAM[1] tokens ends, or None."""
        h, n = self.tokens, self.size
        if n <= shortest:
            return None
        ends = np.flatnonzero(h[: n - 1] == h[n - 1])  # where an earlier copy of the last token stands
        matched = np.ones(len(ends), np.int32)
        for back in range(1, NGRAM[1]):
            ok = (ends >= back) & (matched == back)
            ok[ok] = h[ends[ok] - back] == h[n - 1 - back]
            matched += ok
        if not len(ends) or matched.max() < shortest:
            return None
        return int(ends[np.flatnonzero(matched == matched.max())[-1]])

    def draft(self) -> list[int]:
        """What followed the latest earlier copy of the longest suffix of NGRAM[0] tokens or more.

        Where that copy is so recent that what followed it runs into the suffix itself, the
        tokens repeat with the period between the two.
        """
        best = self.match(NGRAM[0])
        if best is None:
            return []
        draft = self.tokens[best + 1 : min(best + 1 + self.length, self.size)].tolist()
        period = self.size - 1 - best  # a match this close is a loop: it goes on as it went
        while len(draft) < self.length:
            draft.append(draft[len(draft) - period])
        return draft

    def kept(self, drafted: int, accepted: int) -> None:
        """Lengthen the next draft after one kept whole, shorten it after a miss, and after misses in a row
        rest for a while (a pass over a rejected draft costs more than a plain step)."""
        if accepted == drafted:
            self.length = min(self.length + 2, self.most)
        else:
            self.length = max(1, accepted + 1)
        self.misses = 0 if accepted else self.misses + 1
        self.resting = min(2**self.misses, MAX_REST) if self.misses > 1 else 0


@dataclass(slots=True)
class Counts:
    """Running totals, named after vLLM's `spec_decode` counters."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class Response(GenerationBatch.Response):
    """mlx-lm's response, saying whether the token came from an accepted draft."""

    drafted: bool = False


@dataclass(slots=True)
class Pass:
    """A verify pass under way: the next token and its draft, what it fed, the layers it may put back."""

    token: int
    draft: list[int]
    inputs: mx.array
    held: list[tuple[Any, dict]]
    logprobs: mx.array
    sampled: mx.array


class SpeculativeBatch(GenerationBatch):
    """mlx-lm's generation batch, with a verify pass for a lone row that has a draft.

    Where the row has no logits processors and draws no seeded keys, the next pass is
    started as soon as a pass is settled, so that it computes while the tokens kept are
    turned into events, as mlx-lm's own steps overlap; a change to the batch first settles
    it (a row joins) or takes it back (the row leaves).
    """

    Response = Response
    most: int = 0
    counts: Counts
    lookups: dict[int, PromptLookup]
    pending: Pass | None = None
    settled: list  # responses of a pass settled when a row joined, given with the next step's

    def filter(self, keep: list[int]) -> None:
        if 0 not in keep:
            self._take_back()
        super().filter(keep)
        self.lookups = {uid: look for uid, look in self.lookups.items() if uid in self.uids}

    def extend(self, batch: GenerationBatch) -> None:
        if self.pending:
            self.settled = self._settle(self.pending, then=False)
        super().extend(batch)

    def extract_cache(self, idx: int) -> list:
        self._take_back()
        return super().extract_cache(idx)

    def next(self) -> list:
        settled, self.settled = self.settled, []
        if self.pending:
            return settled + self._settle(self.pending)
        if len(self.uids) != 1 or not self.most:
            return settled + super().next()
        uid = self.uids[0]
        look = self.lookups.get(uid)
        if look is None:
            look = self.lookups[uid] = PromptLookup(self.tokens[0], self.most)
        look.extend(self.tokens[0][look.size :])
        if not may_draft(look):  # no token could complete a match: stay pipelined
            look.resting = max(0, look.resting - 1)
            return settled + super().next()
        mx.eval(self._next_tokens)
        token = cast(int, self._next_tokens.item())
        draft = self._draft(look, token)
        if not draft:
            return settled + super().next()
        return settled + self._settle(self._launch(token, draft))

    def _draft(self, look: PromptLookup, token: int) -> list[int]:
        look.extend([token])
        draft = look.draft()
        look.size -= 1  # the token is not in the cache until a pass feeds it
        return draft

    def _launch(self, token: int, draft: list[int]) -> Pass:
        """Start a pass that feeds the next token and the draft, each position processed and sampled."""
        inputs = mx.array([[token, *draft]], dtype=mx.uint32)
        held = [(layer, hold(layer)) for layer in layers(self.prompt_cache) if not isinstance(layer, BatchKVCache)]
        logits = self.model(inputs, cache=self.prompt_cache)[0]
        grammars, plain = self._processors()
        if plain:
            context = self._token_context[0].update_and_fetch(inputs[0, :1])
            rows = []
            for j in range(len(draft) + 1):  # position j is only used when the draft is kept up to it
                row, seen = logits[j : j + 1], mx.concatenate([context, inputs[0, 1 : j + 1]])
                for processor in plain:
                    row = processor(seen, row)
                rows.append(row)
            logits = mx.concatenate(rows)
        for grammar in grammars:
            logits = grammar.verify([token, *draft], logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self._sampler(logprobs)
        mx.async_eval(sampled, logprobs)
        return Pass(token, draft, inputs, held, logprobs, sampled)

    @property
    def _sampler(self) -> Any:
        return self.samplers[0] if self.samplers else self.fallback_sampler

    def _processors(self) -> tuple[list[GrammarProcessor], list]:
        """The row's grammars, and its other processors (penalties: they see each position's context)."""
        processors = (self.logits_processors or [[]])[0]
        grammars = [p for p in processors if isinstance(p, GrammarProcessor)]
        return grammars, [p for p in processors if not isinstance(p, GrammarProcessor)]

    def _settle(self, p: Pass, then: bool = True) -> list:
        """Keep the pass's draft up to its first miss; `then` start the next pass where it may overlap."""
        self.pending = None
        sampled = cast(list[int], p.sampled.tolist())
        draft = p.draft
        accepted = 0
        while accepted < len(draft) and sampled[accepted] == draft[accepted]:
            accepted += 1
        if rewind := getattr(self._sampler, "rewind", None):
            rewind(len(draft) - accepted)  # draws past the first miss were never used
        grammars, plain = self._processors()
        if plain and accepted:
            self._token_context[0].update_and_fetch(mx.array(draft[:accepted]))
        for grammar in grammars:
            grammar.kept(accepted)
        look = self.lookups[self.uids[0]]
        look.kept(len(draft), accepted)
        kept = [p.token, *draft[:accepted]]
        reasons = self._ends(kept)
        self._rewind(p.inputs, len(reasons), p.held)
        self.counts.drafts += 1
        self.counts.draft_tokens += len(draft)
        self.counts.accepted_tokens += len(reasons) - 1  # those past the row's end are not the reply
        steps = [self._next_logprobs[0], *p.logprobs[:accepted]]
        token = sampled[accepted]
        self._next_tokens = mx.array([token])
        self._next_logprobs = [p.logprobs[accepted]]
        responses = self._respond(kept, steps, reasons)
        if then and not reasons[-1] and self._may_overlap():
            look.extend(self.tokens[0][look.size :])
            if may_draft(look) and (draft := self._draft(look, token)):
                self.pending = self._launch(token, draft)
        return responses

    def _may_overlap(self) -> bool:
        """Whether a pass may start before the last one's tokens are taken: nothing it feeds is hard to take back."""
        return self._processors() == ([], []) and not hasattr(self._sampler, "rewind")

    def _take_back(self) -> None:
        """Undo the pass under way, if any: the cache holds the tokens kept so far (the row is leaving)."""
        if self.pending:
            self._rewind(self.pending.inputs, 0, self.pending.held)
            self.pending = None

    def _ends(self, kept: list[int]) -> list[str | None]:
        """Each kept token's finish reason, up to the first that ends the row (as mlx-lm's `next` decides it)."""
        reasons: list[str | None] = []
        for token in kept:
            self._num_tokens[0] += 1
            reason = "length" if self._num_tokens[0] >= self.max_tokens[0] else None
            if self._matchers[0].advance(token):
                reason = "stop"
            reasons.append(reason)
            if reason:
                break
        return reasons

    def _rewind(self, inputs: mx.array, used: int, held: list[tuple[Any, dict]]) -> None:
        """Leave the cache holding the pass's first `used` tokens: cut the rest, or, where a layer cannot be
        cut, put every such layer back as it was before the pass and feed those tokens again."""
        fed = inputs.shape[1]
        if used == fed:
            return
        if not held:
            for c in self.prompt_cache:
                c.trim(fed - used)
            return
        for layer, state in held:
            restore(layer, state)
        for layer in layers(self.prompt_cache):
            if isinstance(layer, BatchKVCache):
                layer.trim(fed)
        if used:
            self.model(inputs[:, :used], cache=self.prompt_cache)

    def _respond(self, kept: list[int], steps: list[mx.array], reasons: list[str | None]) -> list:
        """Responses for the kept tokens up to the row's end, which takes the row out of the batch."""
        uid, responses = self.uids[0], []
        for i, reason in enumerate(reasons):
            self.tokens[0].append(kept[i])
            cache, tokens = (self.extract_cache(0), self.tokens[0]) if reason else (None, None)
            responses.append(Response(uid, kept[i], steps[i], reason, cache, tokens, drafted=i > 0))
        if reasons[-1]:
            self.filter([])
        return responses


def may_draft(look: PromptLookup) -> bool:
    """Whether the row may draft at its next token: not resting, and some token could complete a match."""
    return not look.resting and look.match(NGRAM[0] - 1) is not None


def layers(cache: list) -> list:
    """The cache's layers, those of a CacheList each on its own."""
    return [x for c in cache for x in (layers(c.caches) if isinstance(c, CacheList) else [c])]


def hold(layer: Any) -> dict:
    """What restores the layer as it is now: its attributes, arrays held as they stand."""
    return {name: held(value) for name, value in vars(layer).items()}


def held(value: Any) -> Any:
    if isinstance(value, mx.array):
        return mx.array(value)  # a new array object: writes into the layer's own do not reach it
    if isinstance(value, list):
        return [held(v) for v in value]
    return value


def restore(layer: Any, state: dict) -> None:
    for name, value in state.items():
        setattr(layer, name, held(value))


class SpeculativeGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose generation batch drafts up to `most` tokens a pass, counted in `counts`."""

    def __init__(self, *args: Any, most: int, counts: Counts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        batch = SpeculativeBatch.empty(self.model, self.sampler)
        batch.most, batch.counts, batch.lookups, batch.settled = most, counts, {}, []
        self._generation_batch = self.speculation = batch
