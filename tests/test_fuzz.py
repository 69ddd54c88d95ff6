"""Bad input, fuzzed: at least 1000 mutated bodies per API against the shared server.

An invalid request gets a 4xx in its protocol's error shape, a valid one a 2xx; never a
5xx, a dropped connection or a hang; and the server still serves afterwards. Most bodies
come out invalid, so they are answered without generating; valid ones ask for few tokens.
"""

import copy
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "responses": "/v1/responses"}
FEW = 3  # max_tokens in the seeds, so that valid bodies are answered quickly

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SEEDS = {
    "anthropic": [
        {"model": "m", "max_tokens": FEW, "messages": [{"role": "user", "content": "Good morning!"}]},
        {
            "model": "claude-x",
            "max_tokens": FEW,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
            ],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}],
            "tool_choice": {"type": "auto"},
            "temperature": 0.0,
            "stop_sequences": ["\n\n"],
        },
        {
            "model": "m",
            "max_tokens": FEW,
            "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "metadata": {"user_id": "u"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "x"},
                        {"type": "text", "text": "Hello"},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
                        {"type": "text", "text": "And?"},
                    ],
                },
            ],
        },
    ],
    "openai": [
        {"model": "m", "max_tokens": FEW, "messages": [{"role": "user", "content": "Good morning!"}]},
        {
            "model": "gpt-x",
            "max_completion_tokens": FEW,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}],
            "tool_choice": "auto",
            "temperature": 0.0,
            "stop": ["\n\n"],
            "logit_bias": {"5": -1.0},
            "seed": 1,
        },
        {
            "model": "m",
            "max_tokens": FEW,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "developer", "content": "Answer in French."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
                },
            ],
        },
    ],
    "responses": [
        {"model": "m", "max_output_tokens": FEW, "input": "Good morning!"},
        {
            "model": "gpt-x",
            "max_output_tokens": FEW,
            "instructions": "Be brief.",
            "input": [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Answer in French."}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is the weather in Paris?"},
                        {"type": "input_image", "image_url": "data:,"},
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "namespace": "weather",
                    "arguments": '{"city": "Paris"}',
                },
                {
                    "type": "function_call_output",
                    "call_id": "call_1",
                    "output": [{"type": "input_text", "text": "Sunny"}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "aGk=.AAAA"},
            ],
            "tools": [
                {
                    "type": "namespace",
                    "name": "weather",
                    "description": "Weather",
                    "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}],
                },
                {"type": "custom", "name": "apply_patch"},
                {"type": "web_search"},
            ],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "temperature": 0.0,
            "store": False,
        },
        {
            "model": "m",
            "max_output_tokens": FEW,
            "stream": True,
            "reasoning": {"effort": "low", "summary": "auto"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k",
            "text": {"format": {"type": "text"}},
            "input": [{"type": "message", "role": "user", "content": "Is 17 a prime number?"}],
        },
    ],
}

# Leaves chosen to hurt: huge and tiny numbers, empty and odd strings, lone surrogates.
NAMES = [
    "",
    " ",
    "\x00",
    "\ud800",
    "user",
    "assistant",
    "tool",
    "wizard",
    "text",
    "tool_use",
    "tool_result",
    "function",
    "type",
]
EDGES = (
    st.sampled_from(
        [
            0,
            -1,
            1,
            2**31,
            2**63,
            2**64,
            -(2**63),
            10**30,
            1e308,
            -1e308,
            5e-324,
            -0.0,
            0.5,
            2,
            True,
            False,
            None,
            [],
            {},
            [[]],
            {"type": "text"},
            {"type": None},
        ]
        + NAMES
    )
    | st.builds(lambda n: "a" * n, st.just(5000))
    | st.builds(lambda n: 10**n, st.just(400))
)
LEAVES = EDGES | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.sampled_from(NAMES), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(value, prefix=()):
    """Every place in a JSON document, the root first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, prefix + (i,))


def parent(body, path):
    for part in path[:-1]:
        body = body[part]
    return body


def surely_invalid(protocol: str):
    """Changes any client of this API could send by mistake, each of which leaves the body invalid."""
    wrong_content = [5, True, {"text": "x"}, [5], [{"text": "no type"}], [{"type": 7}]]
    if protocol == "anthropic":
        wrong_content += [[{"type": "tool_use", "id": "x"}], [{"type": "tool_result"}], [{"type": "text", "text": 5}]]
    if protocol == "responses":
        return st.one_of(
            st.tuples(
                st.just(("input",)),
                st.sampled_from([None, [], {}, 5, [None], [[]], [{"role": "wizard", "content": "x"}]]),
            ),
            st.tuples(st.just(("model",)), st.sampled_from([None, 5, ["m"]])),
            st.tuples(st.just(("max_output_tokens",)), st.sampled_from([0, -1, "3", 1.5, 1e308, [3]])),
            st.tuples(st.just(("temperature",)), st.sampled_from([-1, "hot", [0]])),
            st.tuples(st.just(("stream",)), st.sampled_from(["yes", 1, "true", None])),
            st.tuples(st.just(("previous_response_id",)), st.sampled_from(["resp_1", ""])),
        )
    return st.one_of(
        st.tuples(st.just(("messages",)), st.sampled_from([None, [], "hello", {}, 5, [None], [[]]])),
        st.tuples(st.just(("model",)), st.sampled_from([None, 5, ["m"]])),
        st.tuples(st.just(("messages", 0, "role")), st.sampled_from(["wizard", "", None, 1, "USER", "function"])),
        st.tuples(st.just(("messages", 0, "content")), st.sampled_from(wrong_content)),
        st.tuples(st.just(("max_tokens",)), st.sampled_from([0, -1, "3", 1.5, 1e308, [3]])),
        st.tuples(st.just(("temperature",)), st.sampled_from([-1, "hot", [0]])),
        st.tuples(st.just(("stream",)), st.sampled_from(["yes", 1, "true", None])),
    )


DEPTHS = (50, 199, 200, 201, 1000, 5000)


def deep(kind: str, depth: int) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


@st.composite
def bodies(draw, protocol: str) -> tuple[bytes, bool]:
    """A mutated body: its bytes, and whether it is surely invalid (else it may be valid or not)."""
    body = copy.deepcopy(draw(st.sampled_from(SEEDS[protocol])))
    for _ in range(draw(st.integers(0, 3))):  # random changes: the body may stay valid
        places = list(paths(body))[1:]
        op = draw(st.sampled_from(["set", "set", "delete", "add", "deep"]))
        if op == "add":  # an unknown field, anywhere a field can go
            dicts = [()] + [p for p in places if isinstance(parent(body, p + (None,)), dict)]
            target = parent(body, draw(st.sampled_from(dicts)) + (None,))
            target[draw(st.text(max_size=8))] = copy.deepcopy(
                draw(VALUES)
            )  # sampled objects are shared: never mutate them
            continue
        if not places:
            break
        path = draw(st.sampled_from(places))
        holder = parent(body, path)
        if op == "delete":
            del holder[path[-1]]
        elif op == "deep":
            holder[path[-1]] = f"__DEEP_{draw(st.sampled_from(['list', 'dict']))}_{draw(st.sampled_from(DEPTHS))}__"
        else:
            holder[path[-1]] = copy.deepcopy(draw(VALUES))
    invalid = False
    if draw(st.integers(0, 2)) == 0:
        path, value = draw(surely_invalid(protocol))
        try:
            holder = parent(body, path)
        except (KeyError, IndexError, TypeError):
            holder = None
        if isinstance(holder, dict):
            holder[path[-1]] = copy.deepcopy(value)
            invalid = True
        if value is None and path in (("model",), ("input",)):
            del body[path[0]]
    raw = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True)
    for kind in ("list", "dict"):
        for depth in DEPTHS:
            raw = raw.replace(f'"__DEEP_{kind}_{depth}__"', deep(kind, depth))
    try:
        data = raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw: not UTF-8
        data, invalid = raw.encode("utf-8", "surrogatepass"), True
    byte_op = draw(st.integers(0, 9))
    if byte_op == 0:  # invalid UTF-8 somewhere
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff", b"\x80"]))
        data, invalid = data[:at] + bad + data[at:], True
    elif byte_op == 1:  # cut short: a proper prefix of an object is never JSON
        data, invalid = data[: draw(st.integers(0, len(data) - 1))], True
    return data, invalid


def check(client: httpx.Client, protocol: str, data: bytes, invalid: bool, fuzzing: bool = True):
    """Post the body; the answer must be a protocol-shaped 4xx (surely so when `invalid`) or a complete 2xx."""
    try:
        with client.stream(
            "POST", PATHS[protocol], content=data, headers={"content-type": "application/json"}
        ) as response:
            content = response.read()
    except httpx.HTTPError as e:  # a dropped connection or a hang (the client's timeout)
        pytest.fail(f"{type(e).__name__} for body {data[:2000]!r}")
    status = response.status_code
    if fuzzing:  # shown by --hypothesis-show-statistics
        event(f"{'invalid' if invalid else 'maybe valid'}: {status}")
    assert status < 500, f"{status} {content[:500]!r} for body {data[:2000]!r}"
    if invalid:
        assert 400 <= status < 500, f"an invalid body got {status}: {data[:2000]!r}"
    if status >= 400:
        error = json.loads(content)
        if protocol == "anthropic":
            assert error["type"] == "error" and isinstance(error["error"]["type"], str)
            assert isinstance(error["error"]["message"], str), error
        else:
            assert isinstance(error["error"]["message"], str) and "type" in error["error"], error
        return
    assert status == 200, status
    text = content.decode()
    if response.headers["content-type"].startswith("text/event-stream"):
        data_lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        failed = (
            "event: response.failed" in text
            if protocol == "responses"
            else '"error"' in data_lines[-2 if protocol == "openai" else -1]
        )
        assert "event: error" not in text and not failed, (
            f"a stream ended with an error for body {data[:2000]!r}: {text[-500:]}"
        )
        last = data_lines[-1]
        ends = {
            "openai": lambda: last == "[DONE]",
            "anthropic": lambda: json.loads(last)["type"] == "message_stop",
            "responses": lambda: json.loads(last)["type"] in ("response.completed", "response.incomplete"),
        }
        assert ends[protocol](), text[-500:]
    else:
        answer = json.loads(text)
        kinds = {
            "anthropic": ("type", "message"),
            "openai": ("object", "chat.completion"),
            "responses": ("object", "response"),
        }
        field, kind = kinds[protocol]
        assert answer[field] == kind


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, connect=10)) as client:
        yield client


# CI replays the same 1000 bodies each run (a red CI names a body to fix); elsewhere each run explores new ones.
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


@FUZZ
@given(bodies("anthropic"))
def test_fuzz_anthropic(client, case):
    check(client, "anthropic", *case)


@FUZZ
@given(bodies("openai"))
def test_fuzz_openai(client, case):
    check(client, "openai", *case)


@FUZZ
@given(bodies("responses"))
def test_fuzz_responses(client, case):
    check(client, "responses", *case)


@pytest.mark.parametrize("protocol", ["anthropic", "openai", "responses"])
def test_still_serving_after_the_fuzz(client, protocol):
    check(client, protocol, json.dumps(SEEDS[protocol][0]).encode(), False, fuzzing=False)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["worker"]["restarts"] == 0
