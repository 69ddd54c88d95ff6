"""The prefix cache on every cache family mlx-lm runs: sliding windows, recurrent state, and mixes.

Run in-process on the real scheduler (mlx-lm's BatchGenerator, our PrefixCache and disk
tier) over tiny random models of each family. A resumed request must give the logits of a
cold run, not only the same greedy tokens: a random model resumed from a wrong state can
still pick the same tokens.
"""

from pathlib import Path

import numpy as np
import pytest
from families import FAMILIES, build
from recording import Recording, run

from mlx_tui.engine import cache_kinds
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo.conversations import TOOLS, user
from mlx_tui.engine.disk_cache import DiskCache
from mlx_tui.engine.events import Started
from mlx_tui.engine.loader import load
from mlx_tui.engine.prefix_cache import PrefixCache
from mlx_tui.engine.request import GenerationRequest

SYSTEM = {"role": "system", "content": "You are a careful assistant who checks the weather. " * 6}
TOLERANCE = 2e-3


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = build(request.param, tmp_path_factory.mktemp(request.param))
    return load(str(path), lambda *a: None)


def scheduler(loaded, disk: Path | None = None) -> Recording:
    config = EngineConfig(model="", cache_dir=None, transcripts_dir=None, max_concurrency=4, prefill_step=64)
    tier = DiskCache(disk, 1 << 30, "test") if disk else None
    return Recording(loaded, config, PrefixCache(1 << 30, tier), cache_kinds.kv_bytes_per_token(loaded.model))


def cached(events: list) -> int:
    return next(e for e in events if isinstance(e, Started)).cached_tokens


def same_logits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.allclose(x, y, atol=TOLERANCE) for x, y in zip(a, b, strict=False))


def ask(messages: list, **changes) -> GenerationRequest:
    return GenerationRequest(**{"messages": messages, "tools": TOOLS, "max_tokens": 6} | changes)


FIRST = [SYSTEM, user("What is the weather in Paris?")]
# the same conversation further on, and two that part from it at message boundaries
FOLLOW_UPS = {
    "next_turn": FIRST + [{"role": "assistant", "content": "It is sunny."}, user("And in Rome?")],
    "edited_question": [SYSTEM, user("What is the weather in Berlin today?")],
    "other_reply": FIRST + [{"role": "assistant", "content": "I do not know."}, user("Why not?")],
}


def cold(loaded, request: GenerationRequest) -> list:
    s = scheduler(loaded)
    events = run(s, {0: request})
    assert cached(events[0]) == 0
    return s.logprobs[0]


@pytest.mark.parametrize("follow_up", list(FOLLOW_UPS))
def test_a_resumed_request_gives_the_logits_of_a_cold_run(family, follow_up):
    warm = scheduler(family)
    run(warm, {0: ask(FIRST)})
    request = ask(FOLLOW_UPS[follow_up])
    events = run(warm, {1: request})
    assert cached(events[1]) > len(family.tokenizer.encode(SYSTEM["content"])) // 2
    assert same_logits(warm.logprobs[1], cold(family, request))


def test_a_state_one_token_off_is_caught(family):
    """The comparison above fails on a resume from the state one token before the position it claims."""
    warm = scheduler(family)
    run(warm, {0: ask(FIRST)})
    request = ask(FOLLOW_UPS["edited_question"])
    for entry in warm.cache.entries:
        entry.snapshots = {p + 1: s for p, s in entry.snapshots.items()}
        entry.cuttable = False
    events = run(warm, {1: request})
    assert cached(events[1]) > 0
    assert not same_logits(warm.logprobs[1], cold(family, request))


def test_the_disk_tier_holds_snapshots(family, tmp_path):
    first = scheduler(family, tmp_path)
    run(first, {0: ask(FIRST)})
    first.cache.disk.flush()
    restarted = scheduler(family, tmp_path)
    request = ask(FOLLOW_UPS["other_reply"])
    events = run(restarted, {1: request})
    assert restarted.cache.stats.disk_hits == 1 and cached(events[1]) > 0
    assert same_logits(restarted.logprobs[1], cold(family, request))


def test_resumed_and_cold_requests_share_a_batch(family):
    warm = scheduler(family)
    run(warm, {0: ask(FIRST)})
    requests = {
        1: ask(FOLLOW_UPS["next_turn"], max_tokens=40),
        2: ask([user("Tell me a story about a fox.")], max_tokens=40),
        3: ask(FOLLOW_UPS["edited_question"], max_tokens=40),
    }
    events = run(warm, requests)
    assert cached(events[1]) > 0 and cached(events[3]) > 0 and cached(events[2]) == 0
    assert max(warm.batch_sizes) >= 3
    for rid, request in requests.items():
        assert same_logits(warm.logprobs[rid], cold(family, request)), rid


def test_snapshots_count_against_the_budget_and_only_growing_layers_count_per_token(family):
    s = scheduler(family)
    run(s, {0: ask(FIRST)})
    entry = max(s.cache.entries, key=lambda e: len(e.tokens))
    assert entry.snapshots, "a model whose layers cannot be cut keeps snapshots"
    assert s.cache.snapshot_nbytes > 0 and s.cache.nbytes >= s.cache.snapshot_nbytes
    kv_layers = sum(kind.split("+").count("KVCache") for kind in cache_kinds.kinds(family.model))
    assert s.kv_bytes_per_token == kv_layers * 2 * 2 * 16 * 4  # KV layers × (keys, values) × heads × dim × float32
    largest = max(cache_kinds.nbytes(layers) for e in s.cache.entries for layers in e.snapshots.values())
    bound = cache_kinds.snapshot_bytes(family.model, s.config.prefill_step)
    assert largest <= bound and (largest == bound or "RotatingKVCache" in str(cache_kinds.kinds(family.model)))


def test_a_group_counts_snapshots_against_the_budget_alike(family):
    """In a group each rank counts an entry as the whole model's bytes: its tokens' KV and its snapshots."""
    s = scheduler(family)
    run(s, {0: ask(FIRST)})
    entry = max(s.cache.entries, key=lambda e: len(e.tokens))
    assert entry.snapshots
    per_token, per_snapshot = s.kv_bytes_per_token, cache_kinds.snapshot_bytes(family.model, s.config.prefill_step)
    room = len(entry.tokens) * per_token + len(entry.snapshots) * per_snapshot
    for budget, kept in ((room, True), (room - per_snapshot // 2, False)):
        group = PrefixCache(budget, bytes_per_token=per_token, bytes_per_snapshot=per_snapshot)
        tokens = list(entry.tokens)
        group.store(tokens, entry.layers, snapshots=entry.snapshots)
        assert bool(group.match(tokens).length) is kept


# The engine as a user runs it (worker process, disk tier), on a hybrid and a sliding-window model.
ENGINE_FAMILIES = ["qwen3_5", "gpt_oss"]
LONG_SYSTEM = {"role": "system", "content": "You are a coding agent. Follow the repository's conventions. " * 60}


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def family_dir(request, tmp_path_factory) -> str:
    return str(build(request.param, tmp_path_factory.mktemp(request.param)))


async def collect(engine, request: GenerationRequest) -> list:
    return [e async for e in engine.generate(request)]


def call(i: int) -> dict:
    arguments = '{"city": "Paris"}'
    return {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def test_an_agent_session_is_served_from_the_cache_turn_after_turn(loop, make_engine, family_dir):
    """Tool calls and results, with a side request between turns: from turn 2 on, 90% of each prompt is cached."""
    engine = make_engine(model=family_dir)
    messages = [LONG_SYSTEM, user("Find out the weather in Paris, then summarise it.")]
    for turn in range(6):
        events = loop.run(collect(engine, GenerationRequest(messages=list(messages), tools=TOOLS, max_tokens=8)))
        start = next(e for e in events if isinstance(e, Started))
        if turn:
            assert start.cached_tokens >= 0.9 * start.prompt_tokens, (turn, start)
        side = GenerationRequest(messages=[user(f"Write a title for conversation {turn}.")], max_tokens=4)
        loop.run(collect(engine, side))
        # the client sends the call back in its own words, not the model's, then the tool's result
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call(turn)]},
            {"role": "tool", "tool_call_id": f"call_{turn}", "content": f"{10 + turn} degrees"},
        ]
    stats = loop.run(engine.stats())["cache"]
    assert stats["snapshots"] > 0 and stats["snapshot_bytes"] > 0 and stats["mode"].startswith("snapshots")


def test_a_restarted_engine_hits_snapshots_on_disk(loop, make_engine, family_dir, tmp_path):
    first = make_engine(model=family_dir, cache_dir=str(tmp_path))
    loop.run(collect(first, GenerationRequest(messages=[LONG_SYSTEM, user("Hello!")], max_tokens=8)))
    loop.run(first.stop())
    second = make_engine(model=family_dir, cache_dir=str(tmp_path))
    events = loop.run(collect(second, GenerationRequest(messages=[LONG_SYSTEM, user("Good morning!")], max_tokens=8)))
    assert next(e for e in events if isinstance(e, Started)).cached_tokens > 0
    assert loop.run(second.stats())["cache"]["disk_hits"] == 1


def text_of(events: list) -> str:
    from mlx_tui.engine.events import RawText

    return "".join(e.text for e in events if isinstance(e, RawText))


def test_a_group_agrees_on_snapshot_hits_from_disk(loop, make_engine, tmp_path_factory, tmp_path):
    """Two tensor-parallel ranks of a hybrid model: the same output as one worker, and a disk hit on both after a
    restart."""
    model = str(build("qwen3_5", tmp_path_factory.mktemp("qwen3_5_group")))
    first, second = [LONG_SYSTEM, user("Hello!")], [LONG_SYSTEM, user("Good morning!")]
    one = make_engine(model=model, loop_window=0)
    expected = [text_of(loop.run(collect(one, GenerationRequest(messages=m, max_tokens=8)))) for m in (first, second)]
    group = make_engine(model=model, loop_window=0, ranks=2, cache_dir=str(tmp_path))
    assert text_of(loop.run(collect(group, GenerationRequest(messages=first, max_tokens=8)))) == expected[0]
    loop.run(group.stop())
    group = make_engine(model=model, loop_window=0, ranks=2, cache_dir=str(tmp_path))
    events = loop.run(collect(group, GenerationRequest(messages=second, max_tokens=8)))
    assert text_of(events) == expected[1]
    assert next(e for e in events if isinstance(e, Started)).cached_tokens > 0
    assert loop.run(group.stats())["cache"]["disk_hits"] == 1


def test_a_model_whose_cache_cannot_be_batched_is_refused_at_start(loop, tmp_path):
    from mlx_tui.engine.client import EngineClient, ModelLoadError
    from mlx_tui.engine.config import EngineConfig

    engine = EngineClient(EngineConfig(model=str(build("llama4", tmp_path)), transcripts_dir=None, cache_dir=None))
    with pytest.raises(ModelLoadError, match="ChunkedKVCache layers cannot be batched"):
        loop.run(engine.start())
    loop.run(engine.stop())
