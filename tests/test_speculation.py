"""Prompt-lookup speculative decoding: the output is the one decoding without it gives.

Run in-process on the real scheduler over a tiny random llama (every layer a plain KV
cache), whose greedy replies fall into loops that prompt lookup drafts, and over the demo
model, and over every other cache family (sliding windows, recurrent state, mixes).
"""

import numpy as np
import pytest
from families import FAMILIES, build
from recording import Recording, run

from mlx_tui.engine import cache_kinds, speculation
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.conversations import TOOLS, user
from mlx_tui.engine.events import RawText, Started, TextDelta
from mlx_tui.engine.loader import load
from mlx_tui.engine.prefix_cache import PrefixCache
from mlx_tui.engine.request import Constraint, GenerationRequest, Sampling
from mlx_tui.engine.speculation import PromptLookup

QUESTION = [user("Tell me about the weather in Paris, Rome and Berlin, city by city, in full.")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load(str(build("llama", tmp_path_factory.mktemp("llama"))), lambda *a: None)


def scheduler(loaded, speculate: str = "auto", **settings) -> Recording:
    config = EngineConfig(model="", cache_dir=None, transcripts_dir=None, speculate=speculate, **settings)
    return Recording(loaded, config, PrefixCache(1 << 30, None), cache_kinds.kv_bytes_per_token(loaded.model))


def text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, RawText))


def both(loaded, requests: dict[str, GenerationRequest], **settings) -> tuple[Recording, Recording, dict, dict]:
    """The same requests run without speculation and with it."""
    off, on = scheduler(loaded, "off", **settings), scheduler(loaded, "auto", **settings)
    return off, on, run(off, requests), run(on, requests)


def drafted(events: list) -> int:
    return events[-1].usage.drafted_tokens


def test_greedy_output_is_token_for_token_the_same(llama):
    off, on, plain, fast = both(llama, {"a": GenerationRequest(QUESTION, max_tokens=120)})
    assert on.tokens["a"] == off.tokens["a"]
    assert all(np.allclose(x, y, atol=2e-3) for x, y in zip(on.logprobs["a"], off.logprobs["a"], strict=True))
    assert fast["a"][-1].stop_reason == plain["a"][-1].stop_reason
    counts = on.stats()["speculation"]
    assert counts["drafts"] > 5 and counts["accepted_tokens"] > 20, counts
    assert drafted(fast["a"]) == counts["accepted_tokens"]
    assert off.stats()["speculation"]["drafts"] == 0
    # a pass's kept tokens go out as one piece: a piece of text a pass, not a token
    pieces = [e.text for e in fast["a"] if isinstance(e, TextDelta)]
    assert "".join(pieces) == "".join(e.text for e in plain["a"] if isinstance(e, TextDelta))
    assert len(pieces) <= len(on.tokens["a"]) - drafted(fast["a"]) < len(on.tokens["a"]) - 20


def test_a_seeded_sample_is_the_same_with_speculation_and_in_a_batch(llama):
    seeded = GenerationRequest(QUESTION, max_tokens=100, sampling=Sampling(temperature=0.05, seed=11))
    off, on, plain, fast = both(llama, {"a": seeded})
    assert on.tokens["a"] == off.tokens["a"]
    assert on.stats()["speculation"]["accepted_tokens"] > 10
    beside = scheduler(llama, "auto")
    run(beside, {"a": seeded, "b": GenerationRequest([user("Hello!")], max_tokens=30)})
    assert beside.tokens["a"] == off.tokens["a"]


def test_unseeded_sampling_keeps_only_drafts_the_sampler_drew(llama):
    """Every position of a pass is drawn as plain decoding would draw it (the seeded test shows it draw for
    draw); unseeded, a draft the draw differs from is cut, and the reply runs its full length."""
    warm = GenerationRequest(QUESTION, max_tokens=100, sampling=Sampling(temperature=0.1))
    s = scheduler(llama)
    events = run(s, {"a": warm})
    counts = s.stats()["speculation"]
    assert events["a"][-1].usage.generated_tokens == 100
    assert 0 < counts["accepted_tokens"] < counts["draft_tokens"], counts


def test_stop_sequence_and_max_tokens_act_inside_an_accepted_draft(llama):
    off = scheduler(llama, "off")
    reply = text(run(off, {"a": GenerationRequest(QUESTION, max_tokens=120)})["a"])
    stop = reply[len(reply) * 2 // 3 :][:6]  # inside the loop, where drafts are accepted
    _, _, plain, fast = both(llama, {"a": GenerationRequest(QUESTION, max_tokens=120, stop=[stop])})
    assert text(fast["a"]) == text(plain["a"]) and fast["a"][-1].stop_reason == "stop_sequence"
    assert drafted(fast["a"]) > 0
    for n in (37, 61):
        _, _, plain, fast = both(llama, {"a": GenerationRequest(QUESTION, max_tokens=n)})
        assert fast["a"][-1].usage.generated_tokens == n == plain["a"][-1].usage.generated_tokens
        assert text(fast["a"]) == text(plain["a"])


def test_the_repetition_guard_stops_at_the_same_token(llama):
    _, _, plain, fast = both(llama, {"a": GenerationRequest(QUESTION, max_tokens=300)}, loop_window=32)
    assert plain["a"][-1].note == "repetition" == fast["a"][-1].note
    assert text(fast["a"]) == text(plain["a"])
    assert drafted(fast["a"]) > 0


def test_a_finished_request_leaves_exactly_its_tokens_in_the_prefix_cache(llama):
    """The tokens a pass fed beyond a request's end are cut before it is kept: a follow-up resumes exactly."""
    on = scheduler(llama)
    first = GenerationRequest(QUESTION, max_tokens=45)
    events = run(on, {"a": first})
    assert drafted(events["a"]) > 0
    follow = GenerationRequest([*QUESTION, {"role": "assistant", "content": text(events["a"])}, user("More?")])
    follow.max_tokens = 20
    warm = run(on, {"b": follow})["b"]
    cold = scheduler(llama, "off")
    run(cold, {"b": follow})
    assert next(e for e in warm if isinstance(e, Started)).cached_tokens > len(on.tokens["a"])
    assert on.tokens["b"] == cold.tokens["b"]
    assert all(np.allclose(x, y, atol=2e-3) for x, y in zip(on.logprobs["b"], cold.logprobs["b"], strict=True))


def test_batches_decode_plainly(llama):
    s = scheduler(llama)
    run(s, {"a": GenerationRequest(QUESTION, max_tokens=60), "b": GenerationRequest(QUESTION, max_tokens=60)})
    assert s.stats()["speculation"]["drafts"] == 0


def test_a_pass_under_way_when_a_request_joins_is_settled_first(llama):
    """The next pass starts as soon as one is settled; a request that joins then waits for it, and both
    replies are the ones each gives alone without speculation."""
    requests = {"a": GenerationRequest(QUESTION, max_tokens=120), "b": GenerationRequest([user("Hi")], max_tokens=30)}
    off = scheduler(llama, "off")
    for rid, request in requests.items():
        run(off, {rid: request})
    on = scheduler(llama)
    events = run_joining(on, requests, lambda: on.generator.speculation.pending is not None)
    assert on.tokens == off.tokens and drafted(events["a"]) > 0
    assert [type(e) for e in events["b"]] == [type(e) for e in run(scheduler(llama, "off"), {"b": requests["b"]})["b"]]


def test_a_pass_under_way_when_its_request_leaves_is_taken_back(llama):
    """A request cancelled (or stopped by its stop sequence or the repetition guard) while its next pass
    computes is kept in the prefix cache as of the tokens it was given, without that pass's."""
    on, request = scheduler(llama), GenerationRequest(QUESTION, max_tokens=120)
    on.submit("a", request)
    while on.generator.speculation.pending is None:
        on.step()
    on.cancel("a")
    [kept] = on.cache.entries
    assert list(kept.tokens) == on.render(request).tokens + on.tokens["a"]
    assert all(layer.offset == len(kept.tokens) for layer in kept.layers)


def run_joining(s: Recording, requests: dict, ready) -> dict:
    """Submit the first request, step until `ready()`, then submit the others; each one's events."""
    first, *others = requests
    events = {rid: [e for _, e in s.submit(rid, requests[rid])] for rid in [first]}
    while not ready():
        assert s.busy
        for rid, e in s.step():
            events[rid].append(e)
    for rid in others:
        events[rid] = [e for _, e in s.submit(rid, requests[rid])]
    while s.busy:
        for rid, e in s.step():
            events[rid].append(e)
    return events


def test_a_grammar_binds_every_token_of_a_kept_draft(llama):
    """A schema whose strings repeat: drafts come from the reply itself, and the grammar masks every position of
    a pass as it would mask plain steps, rolled back past the kept tokens."""
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "string", "enum": ["sunny in Paris", "sunny in Rome", "rain in Paris"]},
            }
        },
        "required": ["items"],
    }
    bound = GenerationRequest(QUESTION, max_tokens=120, constraint=Constraint("json_schema", schema))
    off, on, plain, fast = both(llama, {"a": bound})
    assert on.tokens["a"] == off.tokens["a"]
    assert text(fast["a"]) == text(plain["a"])
    assert on.stats()["speculation"]["accepted_tokens"] > 10, on.stats()["speculation"]
    assert '"sunny in Rome", "sunny in Paris"' in text(fast["a"])  # a draft of Rome cut at Paris


def test_the_demo_model_replies_the_same(tmp_path):
    demo = load(str(MODEL_DIR), lambda *a: None)
    weather = GenerationRequest([user("What is the weather in Paris?")], tools=TOOLS, max_tokens=60)
    _, _, plain, fast = both(demo, {"a": weather, "b": GenerationRequest([user("Who are you?")], max_tokens=60)})
    for rid in "ab":
        assert text(fast[rid]) == text(plain[rid])
    _, _, plain, fast = both(demo, {"a": weather})
    assert text(fast["a"]) == text(plain["a"])


@pytest.fixture(scope="module", params=["llama", *FAMILIES])
def family(request, tmp_path_factory):
    return load(str(build(request.param, tmp_path_factory.mktemp(request.param))), lambda *a: None)


class Oracle(PromptLookup):
    """Drafts the reply plain decoding gave (`known`), every other draft with its last token wrong.

    Random models of these families seldom repeat themselves, so prompt lookup would hardly
    draft; this drafter makes every pass carry a draft, half kept whole and half cut short.
    """

    known: list[int] = []

    def match(self, shortest: int) -> int | None:
        return 0

    def draft(self) -> list[int]:
        draft = self.known[self.size : self.size + 4]
        self.misses += 1  # counts the drafts here; kept() is not told
        if self.misses % 2 and draft:
            draft[-1] = (draft[-1] + 1) % 400
        return draft

    def kept(self, drafted: int, accepted: int) -> None:
        pass


def test_every_cache_family_gives_the_same_output(family, monkeypatch):
    """Sliding-window and recurrent layers cannot be cut: after a miss they are put back and the kept tokens fed
    again, so the reply and its logits are those of plain decoding, with an end inside a kept draft too."""
    request = GenerationRequest(QUESTION, max_tokens=41)
    off = scheduler(family, "off")
    run(off, {"a": request})
    Oracle.known = off.render(request).tokens + off.tokens["a"]
    monkeypatch.setattr(speculation, "PromptLookup", Oracle)
    on = scheduler(family)
    events = run(on, {"a": request})
    assert on.tokens["a"] == off.tokens["a"]
    assert all(np.allclose(x, y, atol=2e-3) for x, y in zip(on.logprobs["a"], off.logprobs["a"], strict=True))
    counts = on.stats()["speculation"]
    assert counts["drafts"] >= len(off.tokens["a"]) // 5 and 0 < counts["accepted_tokens"] < counts["draft_tokens"], (
        counts
    )
    follow = [*QUESTION, {"role": "assistant", "content": text(events["a"])}, user("More?")]
    resumed = GenerationRequest(follow, max_tokens=12)
    run(on, {"b": resumed})
    run(off, {"b": resumed})
    assert on.tokens["b"] == off.tokens["b"]
    assert all(np.allclose(x, y, atol=2e-3) for x, y in zip(on.logprobs["b"], off.logprobs["b"], strict=True))


def test_prompt_lookup_drafts_what_followed_the_longest_match():
    look = PromptLookup([1, 2, 3, 4, 5, 6, 9, 9, 2, 3, 4, 5, 7, 8, 1, 2, 3, 4], most=8)
    look.length = 3
    assert look.draft() == [5, 6, 9]  # the longest match, though a shorter one is later
    latest = PromptLookup([1, 2, 3, 8, 1, 2, 3, 9, 4, 1, 2, 3], most=8)
    latest.length = 2
    assert latest.draft() == [9, 4]  # of equal matches, the latest
    loop = PromptLookup([7, 1, 2, 3, 1, 2, 3, 1, 2], most=8)
    loop.length = 5
    assert loop.draft() == [3, 1, 2, 3, 1]  # a loop goes on past the end of what is known
    assert PromptLookup([5, 6, 7, 8, 9], most=8).draft() == []
    look.kept(3, 3)
    assert look.length == 5
    look.kept(5, 1)
    assert look.length == 2 and look.resting == 0
    look.kept(2, 0)
    look.kept(1, 0)
    assert look.length == 1 and look.resting == 4  # misses in a row: decode plainly for a while
    look.kept(1, 1)
    assert look.resting == 0
