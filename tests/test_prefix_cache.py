"""The prefix KV cache on the real engine: reuse across turns, checkpoints, eviction, budgets, the disk tier."""

import asyncio
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLAUDE_CODE_SAMPLE
from tokenizers import Tokenizer

from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.conversations import CONVERSATIONS, TOOLS, result, user
from mlx_tui.engine.events import Done, ReasoningDelta, Started, TextDelta, ToolCallEnd
from mlx_tui.engine.request import GenerationRequest, Sampling

BY_NAME = {c["name"]: c for c in CONVERSATIONS}
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 40}


def request_for(name: str, **changes) -> GenerationRequest:
    c = BY_NAME[name]
    given = {"messages": c["messages"][:-1], "tools": c["tools"], "enable_thinking": c.get("enable_thinking")}
    return GenerationRequest(**given | changes)


async def collect(engine, request: GenerationRequest) -> list:
    return [e async for e in engine.generate(request)]


def started(events) -> Started:
    return next(e for e in events if isinstance(e, Started))


def reply(events) -> tuple:
    return "".join(e.text for e in events if isinstance(e, TextDelta)), [
        (e.name, e.arguments) for e in events if isinstance(e, ToolCallEnd)
    ]


def test_next_turn_reuses_the_whole_previous_turn(loop, make_engine):
    engine = make_engine()
    first = loop.run(collect(engine, request_for("weather_paris")))
    second = loop.run(collect(engine, request_for("tool_result")))
    done = first[-1]
    assert started(first).cached_tokens == 0
    # the first turn's KV holds its prompt and its whole reply, the end-of-turn token (not counted as output) included
    assert started(second).cached_tokens == done.usage.prompt_tokens + done.usage.generated_tokens + 1
    assert second[-1].usage.cached_tokens == started(second).cached_tokens


def test_reasoning_turns_are_reused_too(loop, make_engine):
    engine = make_engine()
    first = loop.run(collect(engine, request_for("reasoning")))
    second = loop.run(collect(engine, request_for("reasoning_multi_turn")))
    done = first[-1]
    assert started(second).cached_tokens == done.usage.prompt_tokens + done.usage.generated_tokens + 1


@pytest.mark.parametrize(
    "names", [["multi_turn", "greeting", "tool_result", "parallel_results", "reasoning_multi_turn"]]
)
def test_greedy_output_is_the_same_with_and_without_the_cache(loop, make_engine, names):
    cached = make_engine()
    uncached = make_engine(cache_ram_gb=1e-9)
    for name in names + names:
        with_cache = loop.run(collect(cached, request_for(name)))
        without = loop.run(collect(uncached, request_for(name)))
        assert started(without).cached_tokens == 0
        assert reply(with_cache) == reply(without)
    assert loop.run(cached.stats())["cache"]["hits"] >= len(names)


def as_message(events) -> dict:
    """The reply as a client sends it back: text, reasoning and the parsed calls."""
    text, calls = reply(events)
    message = {"role": "assistant", "content": text}
    if reasoning := "".join(e.text for e in events if isinstance(e, ReasoningDelta)):
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    return message


TOOL_TURNS = [
    [user("What are the weather and the time in Berlin?")],
    [
        result("call_0", '{"city": "Berlin", "temperature_c": 12, "condition": "cloudy"}'),
        result("call_1", '{"timezone": "Europe/Berlin", "time": "14:05"}'),
    ],
    [user("What is the weather in Paris?")],
]
REASONING_TURNS = [[user("Is 17 a prime number?")], [user("And 18?")], [user("Good morning!")]]


@pytest.mark.parametrize(
    "steps, tools", [(TOOL_TURNS, TOOLS), (REASONING_TURNS, None)], ids=["tool_calls", "reasoning"]
)
def test_a_conversation_built_from_its_replies_reuses_each_whole_turn(loop, make_engine, steps, tools):
    """Each turn resends the replies as parsed (calls as JSON, reasoning): the next prompt starts with all of the
    last turn's tokens."""
    cached, uncached = make_engine(), make_engine(cache_ram_gb=1e-9)
    messages, previous = [], None
    for step in steps:
        messages += step
        request = GenerationRequest(messages=list(messages), tools=tools, enable_thinking=True, max_tokens=64)
        with_cache = loop.run(collect(cached, request))
        without = loop.run(collect(uncached, request))
        assert reply(with_cache) == reply(without) and started(without).cached_tokens == 0
        if previous:
            used = previous.usage
            assert started(with_cache).cached_tokens >= used.prompt_tokens + used.generated_tokens - 1
        previous = with_cache[-1]
        messages.append(as_message(with_cache))
    assert any(m.get("tool_calls" if tools else "reasoning_content") for m in messages)


def test_a_reply_that_tokenises_differently_as_text_is_reused_whole(loop, make_engine):
    """A reply of ids that encoding its text would merge differently: the next turn keeps the generated ids."""
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    token, piece = next(
        (i, text)
        for i in range(tokenizer.get_vocab_size())
        if (text := tokenizer.decode([i])).isalpha()
        and tokenizer.encode(text * 4, add_special_tokens=False).ids != [i] * 4
    )
    engine = make_engine()
    messages = [user("Hiss like a snake.")]
    first = loop.run(
        collect(
            engine, GenerationRequest(messages=messages, sampling=Sampling(logit_bias={token: 100.0}), max_tokens=4)
        )
    )
    text, _ = reply(first)
    assert text == piece * 4
    follow = messages + [{"role": "assistant", "content": text}, user("Again?")]
    second = loop.run(collect(engine, GenerationRequest(messages=follow, max_tokens=4)))
    used = first[-1].usage
    assert started(second).cached_tokens >= used.prompt_tokens + used.generated_tokens - 1
    plain = tokenizer.encode(started(second).prompt_text, add_special_tokens=False).ids
    assert started(second).prompt_tokens != len(plain), "the prompt keeps the generated ids, not the text's own"


def test_a_reply_cut_by_a_stop_sequence_is_reused_as_far_as_it_was_sent(loop, make_engine):
    engine = make_engine()
    first = loop.run(collect(engine, request_for("greeting", stop=["help"])))
    text, _ = reply(first)
    assert first[-1].stop_reason == "stop_sequence" and text == "Good morning! How can I "
    follow = BY_NAME["greeting"]["messages"][:-1] + [{"role": "assistant", "content": text}, user("Thanks.")]
    second = loop.run(collect(engine, GenerationRequest(messages=follow, max_tokens=4)))
    assert started(second).cached_chars >= len(started(first).prompt_text) + len(text)


def test_system_prompt_and_tools_are_a_checkpoint_of_their_own(loop, make_engine):
    engine = make_engine()
    tools = BY_NAME["weather_paris"]["tools"]
    head = loop.run(
        engine.count_tokens(GenerationRequest(messages=[SYSTEM, {"role": "user", "content": "x"}], tools=tools))
    )
    loop.run(
        collect(
            engine,
            GenerationRequest(
                messages=[SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}],
                tools=tools,
                max_tokens=8,
            ),
        )
    )
    other = loop.run(
        collect(
            engine,
            GenerationRequest(
                messages=[SYSTEM, {"role": "user", "content": "Good morning!"}], tools=tools, max_tokens=8
            ),
        )
    )
    assert head - 10 < started(other).cached_tokens < head


def test_side_requests_do_not_evict_the_conversation(loop, make_engine):
    long_system = {"role": "system", "content": "Follow the house rules carefully. " * 300}
    main = [long_system, {"role": "user", "content": "What is the capital of France?"}]

    def side(i):
        return GenerationRequest(
            messages=[{"role": "user", "content": f"Write a short title for chat number {i}."}], max_tokens=8
        )

    sizing = make_engine()
    loop.run(collect(sizing, GenerationRequest(messages=main, max_tokens=16)))
    main_bytes = loop.run(sizing.stats())["cache"]["ram_bytes"]
    loop.run(collect(sizing, side(0)))
    side_bytes = loop.run(sizing.stats())["cache"]["ram_bytes"] - main_bytes
    engine = make_engine(cache_ram_gb=(main_bytes + 2.5 * side_bytes) / 2**30)

    first = loop.run(collect(engine, GenerationRequest(messages=main, max_tokens=16)))
    for i in range(6):
        loop.run(collect(engine, side(i)))
    text = "".join(e.text for e in first if isinstance(e, TextDelta))
    follow = main + [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
    again = loop.run(collect(engine, GenerationRequest(messages=follow, max_tokens=8)))
    assert started(again).cached_tokens >= first[-1].usage.prompt_tokens
    stats = loop.run(engine.stats())["cache"]
    assert stats["evictions"] >= 3 and stats["ram_bytes"] <= stats["ram_budget"]


def test_ram_budget_is_never_exceeded(loop, make_engine):
    engine = make_engine(cache_ram_gb=40_000 / 2**30)
    rng = random.Random(3)

    async def traffic():
        peaks = []
        for _i in range(12):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(20, 120)))
            await collect(engine, GenerationRequest(messages=[{"role": "user", "content": words}], max_tokens=4))
            peaks.append((await engine.stats())["cache"])
        return peaks

    for cache in loop.run(traffic()):
        assert cache["ram_bytes"] <= cache["ram_budget"]


def test_a_restarted_engine_hits_on_disk(loop, make_engine, tmp_path):
    first = make_engine(cache_dir=str(tmp_path))
    loop.run(collect(first, request_for("weather_paris")))
    loop.run(first.stop())
    second = make_engine(cache_dir=str(tmp_path))
    events = loop.run(collect(second, request_for("tool_result")))
    assert started(events).cached_tokens > 0
    assert loop.run(second.stats())["cache"]["disk_hits"] == 1


def damage_flip(path: Path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_header(path: Path):
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_header])
def test_damaged_disk_entries_are_removed_not_loaded(loop, make_engine, tmp_path, damage):
    first = make_engine(cache_dir=str(tmp_path))
    loop.run(collect(first, request_for("capital")))
    loop.run(first.stop())
    files = list(tmp_path.glob("*/*.safetensors"))
    assert files
    for f in files:
        damage(f)
    damaged = {f: f.read_bytes() for f in files}
    second = make_engine(cache_dir=str(tmp_path))
    events = loop.run(collect(second, request_for("capital")))
    assert isinstance(events[-1], Done) and started(events).cached_tokens == 0
    assert loop.run(second.stats())["cache"]["disk_rejected"] == len(files)
    assert not any(f.exists() and f.read_bytes() == content for f, content in damaged.items())


def test_entries_of_another_model_are_removed(loop, make_engine, tmp_path):
    copy = tmp_path / "other-model"
    shutil.copytree(MODEL_DIR, copy)
    cache = tmp_path / "cache"
    other = make_engine(model=str(copy), cache_dir=str(cache))
    loop.run(collect(other, request_for("capital")))
    loop.run(other.stop())
    [other_dir] = list(cache.iterdir())
    loop.run(make_engine(cache_dir=str(cache)).stop())
    [ours] = [d for d in cache.iterdir() if d != other_dir]
    planted = [Path(shutil.copy(f, ours)) for f in other_dir.glob("*.safetensors")]
    engine = make_engine(cache_dir=str(cache))
    assert planted and not any(p.exists() for p in planted), "removed when the cache directory is read"
    events = loop.run(collect(engine, request_for("capital")))
    assert started(events).cached_tokens == 0
    assert loop.run(engine.stats())["cache"]["disk_rejected"] == len(planted)


def change_one_weight(path: Path):
    """Change one number of the first tensor in a safetensors file in place: same size, same header."""
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    name, tensor = next((k, v) for k, v in json.loads(data[8 : 8 + header]).items() if k != "__metadata__")
    at = 8 + header + tensor["data_offsets"][0]
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_entry_for_weights_changed_in_place_misses(loop, make_engine, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    first = make_engine(model=str(model), cache_dir=str(tmp_path / "cache"))
    loop.run(collect(first, request_for("capital")))
    loop.run(first.stop())
    size = (model / "model.safetensors").stat().st_size
    change_one_weight(model / "model.safetensors")
    assert (model / "model.safetensors").stat().st_size == size
    second = make_engine(model=str(model), cache_dir=str(tmp_path / "cache"))
    events = loop.run(collect(second, request_for("capital")))
    assert started(events).cached_tokens == 0
    assert loop.run(second.stats())["cache"]["disk_hits"] == 0


def test_a_hub_snapshot_is_named_by_its_revision(tmp_path):
    from mlx_tui.engine.loader import identity

    def snapshot(commit: str) -> str:
        folder = tmp_path / "models--org--name" / "snapshots" / commit
        shutil.copytree(MODEL_DIR, folder)
        return str(folder)

    first = snapshot("a" * 40)
    named = identity(first, {}, "float32")
    change_one_weight(Path(first) / "model.safetensors")  # the hub never changes a revision's files: not read
    assert identity(first, {}, "float32") == named
    moved = Path(first).rename(Path(first).with_name("b" * 40))
    assert identity(str(moved), {}, "float32") != named


def test_a_hub_repo_id_is_named_by_its_cached_revision(tmp_path):
    """As mlx-lm finds a repo id: in the hub cache (HF_HUB_CACHE), under refs/main's snapshot; no network."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    shutil.copytree(MODEL_DIR, repo / "snapshots" / "c0ffee")
    code = "from mlx_tui.engine.loader import weights_fingerprint as f; print(f('org/name'), f('org/absent'))"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["b'revision", "c0ffee'", "b''"], done.stderr


def test_concurrent_conversations_each_hit(loop, make_engine):
    engine = make_engine()

    async def together(names):
        return await asyncio.gather(*(collect(engine, request_for(n)) for n in names))

    first = loop.run(together(["weather_paris", "reasoning"]))
    follow = loop.run(together(["tool_result", "reasoning_multi_turn"]))
    for f, s in zip(first, follow, strict=False):
        assert started(s).cached_tokens == f[-1].usage.prompt_tokens + f[-1].usage.generated_tokens + 1


def test_warm_up_makes_the_first_request_hit(loop, make_engine, tmp_path):
    from mlx_tui.api.warm import warm

    system_prompt = "You are the house assistant. Keep answers short and exact. " * 30
    (tmp_path / "system.txt").write_text(system_prompt)
    engine = make_engine()
    line = loop.run(warm(engine, tmp_path / "system.txt"))
    assert line.startswith("warmed the prefix cache with ")
    first = loop.run(
        collect(
            engine,
            GenerationRequest(
                messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": "Good morning!"}],
                max_tokens=8,
            ),
        )
    )
    assert started(first).cached_tokens > 300


def test_warm_up_reads_a_captured_claude_code_request():
    from mlx_tui.api.warm import warm_request

    request = warm_request(CLAUDE_CODE_SAMPLE)
    assert request.max_tokens == 1 and len(request.tools) > 5
    assert "x-anthropic-billing-header" not in json.dumps(request.messages)
