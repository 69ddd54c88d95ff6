"""The worker as an mlx.distributed group: two local ranks started by mlx.launch, tensor parallel on the demo model."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server, letter_token, start_engine

from mlx_tui.api.server import create_app
from mlx_tui.engine.bus import WorkerChange
from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.disk_cache import read_metadata
from mlx_tui.engine.events import Done, Error, RawText, Started, TextDelta, ToolCallEnd
from mlx_tui.engine.group import CONNECT_TIMEOUT
from mlx_tui.engine.request import Constraint, GenerationRequest, Sampling

BY_NAME = {c["name"]: c for c in CONVERSATIONS}


def request_for(name: str, **changes) -> GenerationRequest:
    c = BY_NAME[name]
    given = {"messages": c["messages"][:-1], "tools": c["tools"], "enable_thinking": c.get("enable_thinking")}
    return GenerationRequest(**given | changes)


def endless() -> GenerationRequest:
    """Generates until stopped: one token forced (the engines here have the loop guard off)."""
    return request_for("greeting", sampling=Sampling(logit_bias={letter_token(): 50.0}), max_tokens=100_000)


async def collect(engine, request: GenerationRequest) -> list:
    return [e async for e in engine.generate(request)]


def raw(events) -> str:
    return "".join(e.text for e in events if isinstance(e, RawText))


def started(events) -> Started:
    return next(e for e in events if isinstance(e, Started))


@pytest.fixture(scope="module")
def group(loop):
    """An engine whose worker is two ranks on 127.0.0.1, each holding half of every layer."""
    engine = start_engine(loop, ranks=2, loop_window=0)
    yield engine
    loop.run(engine.stop())


def test_the_group_reports_its_ranks(group):
    ranks = group.info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2 and all(r["host"] for r in ranks)
    assert group.info["shard"] == "tensor"


def test_health_shows_each_rank(loop, group):
    server = Server(loop, create_app(group))
    try:
        health = httpx.get(f"{server.url}/health").json()
    finally:
        server.close()
    assert health["status"] == "ok" and health["ranks"] == 2
    assert [(r["rank"], r["pid"], r["state"]) for r in health["rank_states"]] == [
        (r["rank"], r["pid"], "ready") for r in group.info["ranks"]
    ]


@pytest.mark.asyncio
async def test_the_dashboard_shows_the_ranks(loop, group):
    from test_tui_app import SIZE, shown, until

    from mlx_tui.tui.app import MlxTui
    from mlx_tui.tui.remote import RemoteBackend

    server = Server(loop, create_app(group))
    app = MlxTui(RemoteBackend(server.url))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "ranks" in shown(app, "#engine-info"))
            line = next(s for s in shown(app, "#engine-info").splitlines() if s.strip().startswith("ranks"))
            assert all(f"{r['rank']} {r['host']}" in line for r in group.info["ranks"])
    finally:
        await app.backend.stop()
        server.close()


@pytest.mark.parametrize("name", ["capital", "weather_paris", "reasoning", "text_then_call"])
def test_greedy_output_is_the_same_as_one_rank(loop, engine, group, name):
    one, two = (loop.run(collect(e, request_for(name))) for e in (engine, group))
    assert raw(two) == raw(one) and raw(one)
    assert [(e.name, e.arguments) for e in two if isinstance(e, ToolCallEnd)] == [
        (e.name, e.arguments) for e in one if isinstance(e, ToolCallEnd)
    ]
    assert isinstance(two[-1], Done) and two[-1].stop_reason == one[-1].stop_reason


RECORD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 3, "maximum": 300}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "changes",
    [{"constraint": Constraint("json_schema", RECORD)}, {"tool_choice": "get_time"}],
    ids=["json_schema", "forced_call"],
)
def test_constrained_output_is_the_same_as_one_rank(loop, engine, group, changes):
    """Every rank applies the same mask: a rank that did not would sample other tokens, and its KV (hence the
    all-reduced logits) would part from one rank's run."""
    request = request_for("weather_paris" if "tool_choice" in changes else "greeting", **changes)
    one, two = (loop.run(collect(e, request)) for e in (engine, group))
    assert started(two).constraint and started(two).constraint == started(one).constraint
    assert raw(two) == raw(one) and raw(one)
    assert isinstance(two[-1], Done) and two[-1].stop_reason == one[-1].stop_reason


def test_the_next_turn_hits_the_cache_on_every_rank(loop, group):
    first = loop.run(collect(group, request_for("weather_paris")))
    second = loop.run(collect(group, request_for("tool_result")))
    done = first[-1]
    # a hit on rank 0 that rank 1 did not share would desynchronise the ranks and fail the request
    assert started(second).cached_tokens == done.usage.prompt_tokens + done.usage.generated_tokens + 1  # + end of turn
    assert isinstance(second[-1], Done) and "".join(e.text for e in second if isinstance(e, TextDelta))


def test_two_concurrent_requests_decode_in_one_batch(loop, engine, group):
    names = ["capital", "weather_paris"]
    before = loop.run(group.stats())["batch_sizes"]

    async def together():
        return await asyncio.gather(*(collect(group, request_for(n, max_tokens=40)) for n in names))

    results = loop.run(together())
    for name, events in zip(names, results, strict=False):
        assert raw(events) == raw(loop.run(collect(engine, request_for(name, max_tokens=40))))
    assert loop.run(group.stats())["batch_sizes"].get(2, 0) > before.get(2, 0)


def test_a_cancelled_request_leaves_every_rank(loop, group):
    async def start_then_leave():
        stream = group.generate(endless())
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()
        return await group.stats()

    stats = loop.run(start_then_leave())
    assert stats["running"] == stats["waiting"] == 0
    # the ranks still step together: a request after the cancellation runs to its end
    assert isinstance(loop.run(collect(group, request_for("capital")))[-1], Done)


async def signal_mid_stream(engine, pid: int, sig: int) -> list:
    """An endless generation on `engine`, with `sig` sent to `pid` after its third piece; its events."""
    events = []
    async for event in engine.generate(endless()):
        events.append(event)
        if isinstance(event, RawText) and sum(isinstance(e, RawText) for e in events) == 3:
            os.kill(pid, sig)
    return events


async def restarted(engine):
    """Until `engine` is ready again after a restart."""
    async for event in engine.bus.subscribe(replay=True):
        if isinstance(event, WorkerChange) and event.state == "ready" and (event.restarts or 0) >= 1:
            return


def test_killing_rank_1_mid_stream_restarts_the_whole_group(loop, make_engine):
    engine = make_engine(ranks=2, loop_window=0)
    rank1 = engine.info["ranks"][1]["pid"]
    failures = []

    async def scenario():
        events = await signal_mid_stream(engine, rank1, signal.SIGKILL)
        await asyncio.wait_for(restarted(engine), 120)
        failures.extend(e.failure for e in engine.bus.recent if isinstance(e, WorkerChange) and e.failure)
        return events, await collect(engine, request_for("capital"))

    events, after = loop.run(scenario())
    assert isinstance(events[-1], Error) and events[-1].kind == "engine"
    # rank 0's failed batch step may come first; the group's exit names the rank that ended
    assert any("rank 1 (" in failure and "ended" in failure for failure in failures), failures
    assert isinstance(after[-1], Done)
    assert engine.info["ranks"][1]["pid"] != rank1
    assert engine.breaker.failures == 0, "the failure was counted, then the success reset it"


def test_a_rank_that_ends_while_the_group_is_idle_restarts_it(loop, make_engine):
    engine = make_engine(ranks=2)
    rank1 = engine.info["ranks"][1]["pid"]
    os.kill(rank1, signal.SIGKILL)
    loop.run(asyncio.wait_for(restarted(engine), 120))
    assert engine.info["ranks"][1]["pid"] != rank1
    assert isinstance(loop.run(collect(engine, request_for("capital")))[-1], Done)


def mlx_tui(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", "--cache-disk-gb", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def error_line(done: subprocess.CompletedProcess) -> str:
    [line] = [s for s in done.stderr.splitlines() if s.startswith("mlx-tui:")]
    return line


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "doesn't exist"),
        ('{"hosts": [', "Failed to parse hostfile"),
        ('[{"ssh": "mac1"}, {"ssh": "mac2"}]', 'the ring backend needs "ips" for every host'),
    ],
)
def test_a_hostfile_that_cannot_be_used(tmp_path, content, problem):
    hostfile = tmp_path / "hosts.json"
    if content is not None:
        hostfile.write_text(content)
    done = mlx_tui("--hostfile", str(hostfile))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"mlx-tui: --hostfile {hostfile}: ")
    assert problem in done.stderr


def test_an_unreachable_host_fails_the_start_in_bounded_time(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "192.0.2.1", "ips": ["192.0.2.1"]}]  # TEST-NET-1
    hostfile.write_text(json.dumps(hosts))
    started = time.monotonic()
    done = mlx_tui("--hostfile", str(hostfile), timeout=CONNECT_TIMEOUT + 60)
    assert time.monotonic() - started < CONNECT_TIMEOUT + 60
    assert done.returncode == 1
    line = error_line(done)
    assert "rank 1 (192.0.2.1)" in line or "did not all connect" in line, line


def test_a_model_that_cannot_be_split_is_named(tmp_path):
    config = {
        "model_type": "gpt2",
        "n_ctx": 64,
        "n_embd": 32,
        "n_head": 2,
        "n_layer": 2,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = mlx_tui("--model", str(tmp_path), "--local-ranks", "2")
    assert done.returncode == 1
    assert error_line(done).startswith(f"mlx-tui: {tmp_path}: model type 'gpt2' cannot be split across ranks")


def tiny_pipeline_model(path: Path, layers: int = 4) -> Path:
    """A randomly initialised ministral3 (a type with mlx-lm's PipelineMixin), with the demo model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import ministral3
    from mlx_lm.utils import save_model

    config = {
        "model_type": "ministral3",
        "hidden_size": 64,
        "num_hidden_layers": layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 400,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 4096,
        },
    }
    mx.random.seed(0)
    model = ministral3.Model(ministral3.ModelArgs.from_dict(config))
    # weights large enough that greedy decoding wanders over the vocabulary instead of repeating one token
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.5 if p.ndim == 2 else p, model.parameters()))
    save_model(path, model)  # writes model.safetensors.index.json, which the pipeline path reads
    (path / "config.json").write_text(json.dumps(config))
    for f in MODEL_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


def test_pipeline_greedy_output_is_the_same_as_one_rank(loop, make_engine, tmp_path):
    model = str(tiny_pipeline_model(tmp_path))
    one = make_engine(model=model, loop_window=0)
    two = make_engine(model=model, loop_window=0, ranks=2, shard="pipeline")
    assert two.info["shard"] == "pipeline"
    turns = [request_for("capital", max_tokens=24), request_for("capital", max_tokens=24)]
    outputs = [[loop.run(collect(engine, r)) for r in turns] for engine in (one, two)]
    assert [raw(e) for e in outputs[1]] == [raw(e) for e in outputs[0]]
    assert len(set(raw(outputs[0][0]))) > 5, "the random model should not repeat one token"
    assert started(outputs[1][1]).cached_tokens > 0, "the second turn hits on both pipeline stages"


def test_uneven_pipeline_stages_keep_and_evict_the_same_entries(loop, make_engine, tmp_path):
    # 3 layers over 2 ranks: one stage holds twice the KV bytes of the other, and a budget of
    # about one and a half entries of the bigger stage would keep one entry there, two on the other
    model = str(tiny_pipeline_model(tmp_path, layers=3))
    one = make_engine(model=model, loop_window=0)
    names = ["capital", "greeting", "arithmetic", "capital"]
    entry_tokens = max(loop.run(one.count_tokens(request_for(n))) for n in names) + 24
    budget_gb = 1.5 * entry_tokens * 2 * 256 / 2**30  # 256 bytes per token and layer: 2 KV heads of 16 floats, K and V
    two = make_engine(model=model, loop_window=0, ranks=2, shard="pipeline", cache_ram_gb=budget_gb)
    for name in names:
        expected = raw(loop.run(collect(one, request_for(name, max_tokens=24))))
        events = loop.run(asyncio.wait_for(collect(two, request_for(name, max_tokens=24)), 60))
        assert isinstance(events[-1], Done) and raw(events) == expected, name


def test_a_stopped_rank_shows_as_stalled_until_it_runs_again(loop, make_engine):
    engine = make_engine(ranks=2)
    rank1 = engine.info["ranks"][1]["pid"]

    async def until(holds) -> list[dict]:
        while not holds(ranks := engine.rank_states()):
            await asyncio.sleep(0.1)  # the states follow the heartbeats' age
        return ranks

    def heard_from_both(ranks):
        return all(r["state"] == "ready" and r["cpu"] is not None for r in ranks)

    loop.run(asyncio.wait_for(until(heard_from_both), 30))
    os.kill(rank1, signal.SIGSTOP)
    try:
        ranks = loop.run(asyncio.wait_for(until(lambda ranks: ranks[1]["state"] == "stalled"), 30))
        assert ranks[0]["state"] == "ready"
    finally:
        os.kill(rank1, signal.SIGCONT)
    loop.run(asyncio.wait_for(until(heard_from_both), 30))
    assert isinstance(loop.run(collect(engine, request_for("capital")))[-1], Done)


def test_a_hung_rank_is_caught_by_the_watchdog(loop, make_engine):
    engine = make_engine(ranks=2, loop_window=0, stall_timeout=1.5)
    rank1 = engine.info["ranks"][1]["pid"]

    async def scenario():
        events = await signal_mid_stream(engine, rank1, signal.SIGSTOP)
        await restarted(engine)
        return events

    events = loop.run(asyncio.wait_for(scenario(), 120))
    assert isinstance(events[-1], Error) and "stalled: rank 1 (" in events[-1].message, events[-1].message
    assert isinstance(loop.run(collect(engine, request_for("capital")))[-1], Done)
    with pytest.raises(ProcessLookupError):
        os.kill(rank1, 0)  # the whole group was killed, the stopped rank too


def test_a_hostfile_group_serves(loop, make_engine, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    engine = make_engine(hostfile=str(hostfile))
    assert [r["rank"] for r in engine.info["ranks"]] == [0, 1]
    events = loop.run(collect(engine, request_for("capital")))
    assert isinstance(events[-1], Done) and raw(events)


def rank_files(cache: Path, rank: int) -> dict[str, Path]:
    """The entry files of one rank's disk tier, by name (the same entry has the same name on every rank)."""
    [folder] = cache.glob(f"*{rank}of2")
    return {f.name: f for f in folder.glob("*.safetensors") if not f.name.endswith(".partial.safetensors")}


def after_restart(loop, one, group, name: str):
    """`name` on the restarted `group`: it ends as on one worker; its cached tokens and the disk hits."""
    events = loop.run(asyncio.wait_for(collect(group, request_for(name)), 120))
    assert isinstance(events[-1], Done), "the ranks ran the same steps"
    assert raw(events) == raw(loop.run(collect(one, request_for(name))))
    return started(events).cached_tokens, loop.run(group.stats())["cache"]["disk_hits"]


def test_a_restarted_group_hits_on_disk_on_every_rank(loop, engine, make_engine, tmp_path):
    group = make_engine(ranks=2, loop_window=0, cache_dir=str(tmp_path))
    done = loop.run(collect(group, request_for("weather_paris")))[-1]
    rank1 = group.info["ranks"][1]["pid"]

    async def written_then_restarted():
        # the turn is one entry (no system prompt), which each rank writes behind on its own
        while not rank_files(tmp_path, 0) or rank_files(tmp_path, 0).keys() != rank_files(tmp_path, 1).keys():
            await asyncio.sleep(0.05)
        os.kill(rank1, signal.SIGKILL)
        await restarted(group)

    loop.run(asyncio.wait_for(written_then_restarted(), 120))
    cached, disk_hits = after_restart(loop, engine, group, "tool_result")
    assert cached == done.usage.prompt_tokens + done.usage.generated_tokens + 1 and disk_hits == 1  # + end of turn


def remove(path: Path):
    path.unlink()


def corrupt(path: Path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the arrays: the header still reads, the digest does not match
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [remove, corrupt])
def test_an_entry_one_rank_lacks_is_not_read_from_disk(loop, engine, make_engine, tmp_path, damage):
    group = make_engine(ranks=2, loop_window=0, cache_dir=str(tmp_path))
    loop.run(collect(group, request_for("system_prompt")))
    loop.run(group.stop())  # each rank writes everything out
    assert set(rank_files(tmp_path, 0)) == set(rank_files(tmp_path, 1))
    system, turn = sorted(rank_files(tmp_path, 1).values(), key=lambda f: f.stat().st_size)
    damage(turn)  # rank 1 no longer holds the whole turn; rank 0's files and rank 1's system prompt are intact
    damaged = turn.read_bytes() if turn.exists() else None
    group = make_engine(ranks=2, loop_window=0, cache_dir=str(tmp_path))
    cached, disk_hits = after_restart(loop, engine, group, "system_prompt")
    if damage is remove:  # the longest prefix both ranks hold: the system prompt
        assert cached == len(json.loads(read_metadata(system)["tokens"])) and disk_hits == 1
    else:  # rank 1 found its file unsound after the ranks agreed on it: all of them use memory
        assert cached == 0 and disk_hits == 0
        assert not turn.exists() or turn.read_bytes() != damaged, "removed (then written again, sound)"
