"""Structured output and grammar-bound tool calls on the demo model, which was never trained for these schemas.

Schemas are generated (bounded strings, enums, numeric ranges, item counts); every reply that
ends by itself must validate, and most must end by themselves rather than on max_tokens.
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.events import Done, Error, RawText, ReasoningDelta, Started, TextDelta, ToolCallEnd
from mlx_tui.engine.request import Constraint, GenerationRequest

BY_NAME = {c["name"]: c for c in CONVERSATIONS}
BATCH = 6  # requests sent together, so constrained requests share batches
MOST = 5  # of a batch, at least this many must end by themselves
MAX_TOKENS = 160
# No shrinking: each example is a batch of real generations, and a failure shows its whole batch anyway.
SETTINGS = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    phases=[Phase.explicit, Phase.generate],
)

names = st.text(alphabet="abcdefghijklmnop", min_size=1, max_size=8)
words = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=6)


def ranged(kind: str):
    """Integers in a range; numbers also in steps (binary fractions, exact for the validator): a bare number's
    digits have no end, and a model never trained for it may write 2.0000... until max_tokens."""
    step = st.sampled_from([0.5, 0.25]) if kind == "number" else st.none()
    return st.tuples(st.integers(-1000, 1000), st.integers(0, 1000), step).map(
        lambda t: {"type": kind, "minimum": t[0], "maximum": t[0] + t[1]} | ({"multipleOf": t[2]} if t[2] else {})
    )


strings = st.tuples(st.integers(0, 3), st.integers(1, 12)).map(
    lambda t: {"type": "string", "minLength": t[0], "maxLength": t[0] + t[1]}
)
enums = st.lists(words, min_size=1, max_size=4, unique=True).map(lambda v: {"type": "string", "enum": v})
scalars = st.one_of(strings, enums, ranged("integer"), ranged("number"), st.just({"type": "boolean"}))
arrays = st.tuples(st.one_of(enums, ranged("integer")), st.integers(0, 2), st.integers(0, 3)).map(
    lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
)


@st.composite
def objects(draw) -> dict:
    """An object schema of one to three bounded properties, some required, nothing else allowed."""
    properties = draw(st.dictionaries(names, st.one_of(scalars, arrays), min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def together(work, items: list) -> list:
    """`work` on every item at once, so the requests share the engine's batches."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(work, items))


def check_batch(replies: list[tuple[str, str]], schemas: list[dict], ended: str):
    """Every reply that ended by itself (`ended`) validates against its schema, and most did end by themselves."""
    finished = 0
    for (text, reason), schema in zip(replies, schemas, strict=False):
        if reason == ended:
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= MOST, f"only {finished} of {len(replies)} ended by themselves: {replies}"


USER = [{"role": "user", "content": "Describe the item."}]


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def anthropic_client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def openai_reply(client, stream: bool, **body) -> tuple[str, str, list]:
    """The reply's text, finish reason and calls (name, arguments JSON)."""
    body = {"model": "any", "messages": USER, "max_tokens": MAX_TOKENS, "temperature": 0} | body
    if not stream:
        [choice] = client.chat.completions.create(**body).choices
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content or "", choice.finish_reason, calls
    text, reason, calls = "", None, {}
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
            for call in choice.delta.tool_calls or []:
                name, arguments = calls.get(call.index, ("", ""))
                calls[call.index] = (name or call.function.name, arguments + (call.function.arguments or ""))
    return text, reason, [calls[i] for i in sorted(calls)]


def anthropic_reply(client, stream: bool, **body) -> tuple[str, str, list]:
    """The reply's text, stop reason and calls (name, arguments JSON)."""
    body = {"model": "any", "messages": USER, "max_tokens": MAX_TOKENS} | body
    if stream:
        with client.messages.stream(**body) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**body)
    text = "".join(b.text for b in message.content if b.type == "text")
    calls = [(b.name, json.dumps(b.input)) for b in message.content if b.type == "tool_use"]
    return text, message.stop_reason, calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH))
def test_openai_json_schema_replies_validate(openai_client, stream, schemas):
    def ask(schema):
        fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema, "strict": True}}
        return openai_reply(openai_client, stream, response_format=fmt)[:2]

    check_batch(together(ask, schemas), schemas, "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH))
def test_anthropic_output_format_replies_validate(anthropic_client, stream, schemas):
    def ask(schema):
        config = {"format": {"type": "json_schema", "schema": schema}}
        return anthropic_reply(anthropic_client, stream, extra_body={"output_config": config})[:2]

    check_batch(together(ask, schemas), schemas, "end_turn")


def responses_reply(client, stream: bool, **body) -> tuple[str, str, list]:
    """The reply's text, status and calls (name, arguments JSON), through the Responses API."""
    body = {"model": "any", "input": USER, "max_output_tokens": MAX_TOKENS, "temperature": 0} | body
    if stream:  # the SDK's get_final_response() takes only `response.completed`, and a reply may be cut
        with client.responses.stream(**body) as events:
            ends = [e.response for e in events if e.type in ("response.completed", "response.incomplete")]
        [response] = ends
    else:
        response = client.responses.create(**body)
    calls = [(item.name, item.arguments) for item in response.output if item.type == "function_call"]
    return response.output_text, response.status, calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH))
def test_responses_text_format_replies_validate(openai_client, stream, schemas):
    def ask(schema):
        fmt = {"type": "json_schema", "name": "item", "schema": schema, "strict": True}
        return responses_reply(openai_client, stream, text={"format": fmt})[:2]

    check_batch(together(ask, schemas), schemas, "completed")


def test_responses_strict_tools_bind_the_models_own_call(openai_client):
    """A strict function tool binds the call the demo model makes by itself; absent `strict`, it does not."""

    def tools(strict: bool) -> list[dict]:
        return [{"type": "function", **t["function"]} for t in weather_tools(strict)]

    ask = BY_NAME["weather_paris"]["messages"][:-1]
    _, _, bound = responses_reply(openai_client, False, input=ask, tools=tools(True))
    _, _, free = responses_reply(openai_client, False, input=ask, tools=tools(False))
    jsonschema.validate(json.loads(bound[0][1]), ONLY_ROME)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(free[0][1]), ONLY_ROME)


def tool(schema: dict, strict: bool = False) -> dict:
    return {
        "type": "function",
        "function": {"name": "record", "parameters": schema} | ({"strict": True} if strict else {}),
    }


def check_calls(replies: list[tuple[str, str, list]], schemas: list[dict], ended: str):
    """Every reply that ends by itself holds one whole call that validates; most end so rather than on max_tokens.

    The requests turn parallel calls off: the demo model, never trained for these tools, would
    otherwise call again and again until max_tokens.
    """
    finished = 0
    for (_, reason, calls), schema in zip(replies, schemas, strict=False):
        if reason == ended:
            assert len(calls) == 1 and calls[0][0] == "record", "one call: parallel calls are off"
            for _, arguments in calls:
                jsonschema.validate(json.loads(arguments), schema)
            finished += 1
    assert finished >= MOST, f"only {finished} of {len(replies)} ended by themselves: {replies}"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH), named=st.booleans())
def test_openai_forced_calls_have_valid_arguments(openai_client, stream, schemas, named):
    choice = {"type": "function", "function": {"name": "record"}} if named else "required"

    def ask(schema):
        return openai_reply(openai_client, stream, tools=[tool(schema)], tool_choice=choice, parallel_tool_calls=False)

    check_calls(together(ask, schemas), schemas, "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH), named=st.booleans())
def test_anthropic_forced_calls_have_valid_arguments(anthropic_client, stream, schemas, named):
    choice = {"type": "tool", "name": "record"} if named else {"type": "any"}
    choice["disable_parallel_tool_use"] = True

    def ask(schema):
        tools = [{"name": "record", "description": "Record the item.", "input_schema": schema}]
        return anthropic_reply(anthropic_client, stream, tools=tools, tool_choice=choice)

    check_calls(together(ask, schemas), schemas, "tool_use")


async def collect(engine, request: GenerationRequest) -> list:
    return [e async for e in engine.generate(request)]


@pytest.fixture(scope="module")
def qwen3_coder(loop):
    """The demo model made to write Qwen3-Coder's XML calls (`<function=...>`, `<parameter=...>`), which it never
    saw."""
    from conftest import start_engine

    engine = start_engine(loop, tool_parser="qwen3_coder")
    yield engine
    loop.run(engine.stop())


@SETTINGS
@given(schemas=st.lists(objects(), min_size=BATCH, max_size=BATCH))
def test_qwen3_coder_forced_calls_have_valid_arguments(loop, qwen3_coder, schemas):
    async def ask(schema):
        request = GenerationRequest(
            USER, tools=[tool(schema)], tool_choice="record", max_tokens=MAX_TOKENS, parallel_tool_calls=False
        )
        events = await collect(qwen3_coder, request)
        raw = "".join(e.text for e in events if isinstance(e, RawText))
        calls = [("record", json.dumps(e.arguments)) for e in events if isinstance(e, ToolCallEnd)]
        assert raw.startswith("<tool_call>\n<function=record>\n"), raw
        return raw, events[-1].stop_reason, calls

    async def all_of():
        return await asyncio.gather(*(ask(s) for s in schemas))

    check_calls(loop.run(all_of()), schemas, "tool_calls")


BAD_SCHEMAS = {
    "unknown type": ({"type": "object", "properties": {"a": {"type": "strin"}}}, "Invalid type: strin"),
    "unknown format": ({"type": "string", "format": "bogus"}, "Unknown format: bogus"),
    "look-around": ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    "dangling $ref": ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "/nope"),
    "too large": ({"enum": [f"value-{i}" for i in range(100_000)]}, "too big"),
    "not an object": ("a string", "JSON object"),
}


@pytest.mark.parametrize("schema, message", BAD_SCHEMAS.values(), ids=BAD_SCHEMAS)
def test_bad_schemas_get_a_400_in_each_protocol(server, schema, message):
    openai_body = {
        "model": "any",
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=openai_body, timeout=60)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text
    anthropic_body = {
        "model": "any",
        "max_tokens": 10,
        "messages": USER,
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    answer = httpx.post(f"{server.url}/v1/messages", json=anthropic_body, timeout=60)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["type"] == "invalid_request_error" and message in error["message"]
    responses_body = {
        "model": "any",
        "input": "Describe the item.",
        "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}},
    }
    answer = httpx.post(f"{server.url}/v1/responses", json=responses_body, timeout=60)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text


def test_a_strict_tool_with_a_bad_schema_is_named_in_its_400(server):
    body = {
        "model": "any",
        "max_tokens": 10,
        "messages": USER,
        "tools": [
            {
                "name": "record",
                "input_schema": {"type": "object", "properties": {"a": {"format": "bogus", "type": "string"}}},
                "strict": True,
            }
        ],
    }
    answer = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith("tool record's schema cannot be used: ")


def test_json_schema_without_its_schema_is_refused(server):
    body = {"model": "any", "messages": USER, "response_format": {"type": "json_schema"}}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400 and "response_format.json_schema" in answer.json()["error"]["message"]


# The demo model calls get_weather for Paris by itself; these schemas make that call invalid unless bound.
ONLY_ROME = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Rome", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}


def weather_tools(strict: bool) -> list[dict]:
    tools = json.loads(json.dumps(BY_NAME["weather_paris"]["tools"]))
    weather = next(t for t in tools if t["function"]["name"] == "get_weather")
    weather["function"]["parameters"] = ONLY_ROME
    if strict:
        weather["function"]["strict"] = True
    return tools


def test_without_a_grammar_the_models_own_call_breaks_the_schema(openai_client):
    """The check that the strict and --constrain-tools tests below can fail."""
    messages = BY_NAME["weather_paris"]["messages"][:-1]
    _, reason, calls = openai_reply(openai_client, False, messages=messages, tools=weather_tools(False))
    assert reason == "tool_calls" and json.loads(calls[0][1]) == {"city": "Paris"}


def test_a_strict_tool_binds_the_call_the_model_makes_by_itself(openai_client):
    messages = BY_NAME["weather_paris"]["messages"][:-1]
    _, reason, calls = openai_reply(openai_client, False, messages=messages, tools=weather_tools(True))
    assert reason == "tool_calls" and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), ONLY_ROME)


def test_constrain_tools_binds_calls_and_leaves_text_free(loop, make_engine):
    engine = make_engine(constrain_tools=True)
    messages = BY_NAME["weather_paris"]["messages"][:-1]
    events = loop.run(collect(engine, GenerationRequest(messages, tools=weather_tools(False))))
    [call] = [e for e in events if isinstance(e, ToolCallEnd)]
    jsonschema.validate(call.arguments, ONLY_ROME)
    started = next(e for e in events if isinstance(e, Started))
    assert "bound from <tool_call>" in started.constraint and started.constraint_from == "<tool_call>"
    answer = BY_NAME["tool_result"]  # a text reply with tools at hand
    events = loop.run(collect(engine, GenerationRequest(answer["messages"][:-1], tools=answer["tools"])))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer["messages"][-1]["content"]


def test_reasoning_stays_free_before_the_reply_is_bound(loop, engine):
    reasoning = BY_NAME["reasoning"]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    request = GenerationRequest(
        reasoning["messages"][:-1],
        enable_thinking=True,
        max_tokens=MAX_TOKENS,
        constraint=Constraint("json_schema", schema),
    )
    events = loop.run(collect(engine, request))
    thought = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert thought == reasoning["messages"][-1]["reasoning_content"], "the trained reasoning, untouched"
    assert events[-1].stop_reason == "end"
    jsonschema.validate(json.loads("".join(e.text for e in events if isinstance(e, TextDelta))), schema)


def test_constrained_and_free_requests_share_a_batch(loop, engine):
    """A free request decoded beside constrained ones gives its trained reply; theirs validate."""
    conversation = BY_NAME["weather_paris"]
    free = GenerationRequest(conversation["messages"][:-1], tools=conversation["tools"])
    bound = GenerationRequest(USER, max_tokens=MAX_TOKENS, constraint=Constraint("json_schema", ONLY_ROME))

    async def all_of():
        return await asyncio.gather(collect(engine, free), collect(engine, bound), collect(engine, bound))

    plain, *constrained = loop.run(all_of())
    assert [(e.name, e.arguments) for e in plain if isinstance(e, ToolCallEnd)] == [("get_weather", {"city": "Paris"})]
    for events in constrained:
        assert events[-1].stop_reason == "end"
        jsonschema.validate(json.loads("".join(e.text for e in events if isinstance(e, TextDelta))), ONLY_ROME)


def test_the_transcript_shows_the_constraint_and_where_it_began(loop, engine):
    transcript = engine.transcripts.open("constrained", "test", "", None)
    request = GenerationRequest(
        BY_NAME["weather_tokyo"]["messages"][:-1], tools=BY_NAME["weather_tokyo"]["tools"], tool_choice="get_weather"
    )

    async def run():
        return [e async for e in engine.generate(request, "constrained", transcript)]

    events = loop.run(run())
    assert isinstance(events[-1], Done) and not any(isinstance(e, Error) for e in events)
    assert transcript.constraint == "a call to get_weather (json_tools)"
    assert transcript.constrained_at == 0 and transcript.raw.startswith("<tool_call>")


CITY_DAYS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
# A call to f(city="Paris", days=3) as each format's template writes it, and one that breaks the schema (days="x").
RENDERED = {
    "json_tools": '<tool_call>\n{"name": "f", "arguments": {"city": "Paris", "days": DAYS}}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=f>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\nDAYS\n</parameter>\n</function>\n</tool_call>",
    "glm47": "<tool_call>f\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>DAYS</arg_value>\n</tool_call>",
    "minimax_m2": '<minimax:tool_call>\n<invoke name="f">\n<parameter name="city">Paris</parameter>\n'
    '<parameter name="days">DAYS</parameter>\n</invoke>\n</minimax:tool_call>',
    "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>"
    '{"city": "Paris", "days": DAYS}<|tool_call_end|><|tool_calls_section_end|>',
}


@pytest.fixture(scope="module")
def demo_tokenizer():
    from mlx_lm.utils import load_tokenizer

    from mlx_tui.engine.demo import MODEL_DIR

    return load_tokenizer(MODEL_DIR)


@pytest.mark.parametrize("parser", RENDERED)
def test_each_call_format_grammar_takes_what_its_parser_reads(demo_tokenizer, parser):
    """The grammar of a forced call accepts the format's own markup for valid arguments, which its mlx-lm parser
    reads back to those arguments, and refuses the same markup with arguments that break the schema."""
    import importlib

    from mlx_tui.engine.grammar import Grammars

    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    tags = (module.tool_call_start, module.tool_call_end)
    grammars = Grammars(demo_tokenizer, len(demo_tokenizer), None, tags, parser)
    tools = [tool(CITY_DAYS) | {"function": {"name": "f", "parameters": CITY_DAYS}}]
    processor = grammars.processor(GenerationRequest(USER, tools=tools, tool_choice="f"), False)
    good, bad = (RENDERED[parser].replace("DAYS", days) for days in ("3", '"x"'))
    matcher = processor.matcher.deep_copy()
    assert matcher.consume_tokens(demo_tokenizer.encode(good, add_special_tokens=False)), matcher.get_error()
    assert matcher.is_accepting()
    body = good[len(tags[0]) : len(good) - len(tags[1])]
    parsed = module.parse_tool_call(body, tools)
    parsed = parsed[0] if isinstance(parsed, list) else parsed
    arguments = parsed["arguments"] if isinstance(parsed["arguments"], dict) else json.loads(parsed["arguments"])
    assert (parsed["name"], arguments) == ("f", {"city": "Paris", "days": 3})
    matcher = processor.matcher.deep_copy()
    assert not matcher.consume_tokens(demo_tokenizer.encode(bad, add_special_tokens=False))


def test_a_schema_slow_to_compile_is_refused_without_waiting_for_it(monkeypatch):
    """The front process gives up on a compilation past its time limit (here cut to 50 ms) with a clear error."""
    from mlx_tui.engine import schemas

    monkeypatch.setattr(schemas, "CHECK_SECONDS", 0.05)
    slow = {"enum": [f"slow-{i}" for i in range(100_000)]}  # well over 50 ms to build, before its size is refused
    problem = asyncio.run(schemas.check(GenerationRequest(USER, constraint=Constraint("json_schema", slow))))
    assert problem == "a schema took longer than 0.05 s to compile; simplify it"
