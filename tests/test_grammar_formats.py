"""Each tool-call format's grammar against its own mlx-lm parser.

Random token walks through what a forced call's grammar allows (on the demo tokenizer, for
generated schemas) are read back by our markup parser with the format's `parse_tool_call`:
every walk that ends must give one call to a declared tool with arguments valid against its
schema. A pythonic model (the demo model told to use that format) makes forced calls through
the HTTP API.
"""

import importlib
import json
import pkgutil
import random

import jsonschema
import llguidance
import llguidance.numpy
import mlx_lm.tool_parsers
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_tui.engine.call_formats import FORMATS, GrammarError
from mlx_tui.engine.events import ParseError, RawText, ToolCallEnd, ToolCallStart
from mlx_tui.engine.grammar import Grammars
from mlx_tui.engine.output import MarkupParser
from mlx_tui.engine.request import Constraint, GenerationRequest

USER = [{"role": "user", "content": "Record the item."}]
WALKS = 6  # random walks per schema
STEPS = 400  # a walk that has not ended by then is dropped (most end far sooner)

names = st.text(alphabet="abcdefghij_", min_size=1, max_size=6).map(lambda s: "p" + s)
# values holding markup characters; none a format cannot write (FunctionGemma's "}", whitespace a parser strips)
words = st.text(alphabet="abcdefgh xyz<>/&\"'{,:[]", min_size=1, max_size=6).map(str.strip).filter(bool)
strings = st.tuples(st.integers(0, 3), st.integers(1, 10)).map(
    lambda t: {"type": "string", "minLength": t[0], "maxLength": t[0] + t[1]}
)
enums = st.tuples(st.lists(words, min_size=1, max_size=4, unique=True), st.booleans()).map(
    lambda t: {"enum": t[0]} | ({"type": "string"} if t[1] else {})
)
integers = st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(
    lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
)
numbers = st.tuples(st.integers(-100, 100), st.sampled_from([0.5, 0.25])).map(
    lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + 10, "multipleOf": t[1]}
)
optional_strings = strings.map(lambda s: s | {"type": ["string", "null"]})
scalars = st.one_of(
    strings, enums, integers, numbers, optional_strings, st.just({"type": "boolean"}), st.just({"type": "null"})
)
arrays = st.tuples(st.one_of(enums, integers, strings), st.integers(0, 2), st.integers(0, 2)).map(
    lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
)


@st.composite
def objects(draw, depth: int = 1) -> dict:
    """An object schema of up to three bounded properties (objects among them, once), some required, nothing else
    allowed."""
    values = st.one_of(scalars, arrays, objects(depth=0)) if depth else st.one_of(scalars, arrays)
    properties = draw(st.dictionaries(names, values, min_size=0, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True)) if properties else []
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def tools_of(schemas: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": s}} for i, s in enumerate(schemas)]


@pytest.fixture(scope="module")
def demo_tokenizer():
    from mlx_lm.utils import load_tokenizer

    from mlx_tui.engine.demo import MODEL_DIR

    return load_tokenizer(MODEL_DIR)


def grammars_for(tokenizer, parser: str) -> tuple[Grammars, object]:
    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    tags = (module.tool_call_start, module.tool_call_end)
    return Grammars(tokenizer, len(tokenizer), None, tags, parser), module


def walk(matcher: llguidance.LLMatcher, vocab: int, eos: set[int], rng: random.Random) -> list[int] | None:
    """Tokens the grammar allows, each drawn at random among those allowed, until it may end and a coin says so;
    None if it has not ended within STEPS."""
    bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    tokens: list[int] = []
    for _ in range(STEPS):
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        allowed = np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab])
        choices = [int(t) for t in allowed if int(t) not in eos]
        if not choices or (matcher.is_accepting() and rng.random() < 0.3):
            assert matcher.is_accepting(), matcher.get_error()
            return tokens
        token = rng.choice(choices)
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    return None


def calls_of(text: str, module, tools: list[dict]) -> list[ToolCallEnd]:
    """The calls our markup parser reads from `text` with the format's parser; a ParseError fails the test."""
    markup = MarkupParser(None, (module.tool_call_start, module.tool_call_end), module.parse_tool_call, tools)
    events = markup.feed(text) + markup.finish()
    assert not [e for e in events if isinstance(e, ParseError)], (text, events)
    return [e for e in events if isinstance(e, ToolCallEnd)]


def has_container(schema: dict) -> bool:
    return any(p.get("type") in ("array", "object") for p in schema["properties"].values())


def test_every_mlx_lm_tool_parser_has_a_grammar():
    known = {m.name for m in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__)}
    assert known == set(FORMATS)


@pytest.mark.parametrize("parser", sorted(FORMATS))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(schemas=st.lists(objects(), min_size=1, max_size=2), seed=st.integers(0, 2**32))
def test_what_the_grammar_allows_parses_back_to_a_valid_call(demo_tokenizer, parser, schemas, seed):
    grammars, module = grammars_for(demo_tokenizer, parser)
    tools = tools_of(schemas)
    request = GenerationRequest(USER, tools=tools, tool_choice="required", parallel_tool_calls=False)
    try:
        processor = grammars.processor(request, False)
    except GrammarError as e:
        if str(e).startswith("none of the values of an enum"):  # as Qwen3-Coder's untyped enum ["{a"]: said so
            return
        # FunctionGemma's values are scalars: arrays and objects are refused, and said so
        assert parser == "function_gemma" and any(has_container(s) for s in schemas), e
        assert "cannot carry a value of type" in str(e)
        return
    rng = random.Random(seed)
    ended = 0
    for _ in range(WALKS):
        tokens = walk(processor.matcher.deep_copy(), len(demo_tokenizer), set(grammars.eos), rng)
        if tokens is None:
            continue
        ended += 1
        text = demo_tokenizer.decode(tokens)
        [call] = calls_of(text, module, tools)
        schema = schemas[int(call.name.removeprefix("tool_"))]
        jsonschema.validate(call.arguments, schema)
        assert json.loads(call.arguments_json) == call.arguments
    assert ended >= WALKS // 2, f"only {ended} of {WALKS} walks ended"


# Schemas beyond plain types: consts, anyOf, local $refs, type lists, untyped (any) values
WORD = {"type": "string", "minLength": 1, "maxLength": 5}
exotic = st.one_of(
    words.map(lambda w: {"const": w}),
    st.tuples(integers, strings).map(lambda t: {"anyOf": list(t)}),
    st.just({"$ref": "#/$defs/word"}),
    integers.map(lambda s: s | {"type": ["integer", "null"]}),
    st.just({"type": "array", "items": {"$ref": "#/$defs/word"}, "maxItems": 2}),
    st.just({}),
)


@pytest.mark.parametrize("parser", sorted(FORMATS))
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(properties=st.dictionaries(names, exotic, min_size=1, max_size=3), seed=st.integers(0, 2**32))
def test_other_schemas_are_bound_exactly_or_refused(demo_tokenizer, parser, properties, seed):
    """Where a format can write a schema, what it allows parses back valid; where not, it says so; the JSON formats
    write every schema."""
    schema = {"type": "object", "properties": properties, "required": sorted(properties)[:1], "$defs": {"word": WORD}}
    grammars, module = grammars_for(demo_tokenizer, parser)
    tools = tools_of([schema | {"additionalProperties": False}])
    request = GenerationRequest(USER, tools=tools, tool_choice="required", parallel_tool_calls=False)
    try:
        processor = grammars.processor(request, False)
    except GrammarError as e:
        assert parser not in ("json_tools", "kimi_k2", "mistral"), e
        assert "cannot" in str(e) or str(e).startswith("none of the values of an enum"), e
        return
    rng = random.Random(seed)
    for _ in range(WALKS):
        if (tokens := walk(processor.matcher.deep_copy(), len(demo_tokenizer), set(grammars.eos), rng)) is not None:
            [call] = calls_of(demo_tokenizer.decode(tokens), module, tools)
            jsonschema.validate(call.arguments, tools[0]["function"]["parameters"])


# A call each format's template would write, with a value that breaks the schema where FIX is
RENDERED = {
    "pythonic": '<|tool_call_start|>[f(city="Paris", days=FIX)]<|tool_call_end|>',
    "mistral": '[TOOL_CALLS]f[ARGS]{"city": "Paris", "days": FIX}',
    "gemma4": '<|tool_call>call:f{city:<|"|>Paris<|"|>,days:FIX}<tool_call|>',
    "function_gemma": "<start_function_call>call:f{city:<escape>Paris<escape>,days:FIX}<end_function_call>",
    "longcat": "<longcat_tool_call>f\n<longcat_arg_key>city</longcat_arg_key>\n<longcat_arg_value>Paris"
    "</longcat_arg_value>\n<longcat_arg_key>days</longcat_arg_key>\n<longcat_arg_value>FIX</longcat_arg_value>\n"
    "</longcat_tool_call>",
    "minicpm5": '<function name="f">\n<param name="city">Paris</param>\n<param name="days">FIX</param>\n</function>',
    "muse_spark": '<atem:function_calls><atem:invoke name="f"><atem:parameter name="city">Paris</atem:parameter>'
    '<atem:parameter name="days">FIX</atem:parameter></atem:invoke></atem:function_calls>',
    "kimi_k3": '<|open|>tools<|sep|><|open|>call tool="f" index="1"<|sep|><|open|>argument key="city" type="string"'
    '<|sep|>Paris<|close|>argument<|sep|><|open|>argument key="days" type="integer"<|sep|>FIX<|close|>argument<|sep|>'
    "<|close|>call<|sep|><|close|>tools<|sep|>",
}
CITY_DAYS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}


@pytest.mark.parametrize("parser", RENDERED)
def test_the_templates_own_call_is_allowed_and_a_broken_one_refused(demo_tokenizer, parser):
    """The markup a template writes for a valid call is what the grammar allows; with days="x" it is refused."""
    grammars, module = grammars_for(demo_tokenizer, parser)
    tools = tools_of([CITY_DAYS])
    tools[0]["function"]["name"] = "f"
    processor = grammars.processor(GenerationRequest(USER, tools=tools, tool_choice="f"), False)
    good = RENDERED[parser].replace("FIX", "3")
    matcher = processor.matcher.deep_copy()
    assert matcher.consume_tokens(demo_tokenizer.encode(good, add_special_tokens=False)), matcher.get_error()
    assert matcher.is_accepting()
    [call] = calls_of(good, module, tools)
    assert (call.name, call.arguments) == ("f", {"city": "Paris", "days": 3})
    bad = RENDERED[parser].replace("FIX", '"x"' if parser in ("pythonic", "mistral") else "x")
    assert not processor.matcher.deep_copy().consume_tokens(demo_tokenizer.encode(bad, add_special_tokens=False))


REFUSED = {
    "a Python keyword as a pythonic parameter": ("pythonic", {"class": {"type": "string"}}, "not a Python identifier"),
    "an array in FunctionGemma": ("function_gemma", {"a": {"type": "array"}}, "cannot carry a value of type array"),
    "a pattern where strings are raw": ("qwen3_coder", {"a": {"type": "string", "pattern": "a+"}}, "pattern"),
    "a pattern in MiniCPM5": ("minicpm5", {"a": {"type": "string", "pattern": "a+"}}, "pattern"),
    "a key Gemma cannot write bare": ("gemma4", {"a b": {"type": "string"}}, "cannot be written"),
    "a string-or-number in MiniMax's converter": ("minimax_m2", {"a": {"type": ["string", "number"]}}, "string or"),
    "an enum whose values hold FunctionGemma's end of arguments": ("function_gemma", {"a": {"enum": ["}"]}}, "enum"),
    "an enum of values GLM strips": ("glm47", {"a": {"type": "string", "enum": [" a "]}}, "enum"),
}


@pytest.mark.parametrize("parser, properties, message", REFUSED.values(), ids=REFUSED)
def test_what_a_format_cannot_write_is_refused_for_strict_tools(demo_tokenizer, parser, properties, message):
    grammars, _ = grammars_for(demo_tokenizer, parser)
    tools = tools_of([{"type": "object", "properties": properties, "required": list(properties)}])
    request = GenerationRequest(USER, tools=tools, constraint=Constraint(strict_tools=["tool_0"]))
    with pytest.raises(GrammarError, match=message):
        grammars.processor(request, False)


@pytest.fixture(scope="module")
def pythonic_server(loop):
    """The demo model made to write pythonic calls (`[f(a=1)]`), which it never saw, behind the HTTP API."""
    from conftest import Server, start_engine

    from mlx_tui.api.server import create_app

    engine = start_engine(loop, tool_parser="pythonic")
    server = Server(loop, create_app(engine))
    yield server
    server.close()
    loop.run(engine.stop())


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_forced_pythonic_call_through_the_api_is_valid(pythonic_server, stream):
    client = openai.OpenAI(base_url=pythonic_server.url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    body = {
        "model": "any",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "temperature": 0,
    }
    if stream:
        reason, calls = None, {}
        for chunk in client.chat.completions.create(**body, stream=True):
            for choice in chunk.choices:
                reason = choice.finish_reason or reason
                for call in choice.delta.tool_calls or []:
                    name, arguments = calls.get(call.index, ("", ""))
                    calls[call.index] = (name or call.function.name, arguments + (call.function.arguments or ""))
        calls = list(calls.values())
    else:
        [choice] = client.chat.completions.create(**body).choices
        reason = choice.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert reason == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather", (reason, calls)
    jsonschema.validate(json.loads(calls[0][1]), WEATHER)


def test_a_strict_tool_the_format_cannot_write_gets_a_400(pythonic_server):
    client = openai.OpenAI(base_url=pythonic_server.url + "/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"from": {"type": "string"}}, "required": ["from"]}
    tools = [{"type": "function", "function": {"name": "book", "parameters": schema, "strict": True}}]
    with pytest.raises(openai.BadRequestError, match="not a Python identifier"):
        client.chat.completions.create(model="any", messages=USER, tools=tools, max_tokens=10)


@pytest.mark.parametrize("parser", ["mistral", "kimi_k3", "gemma4"])
def test_a_forced_call_in_other_formats_comes_back_as_one_valid_call(loop, make_engine, parser):
    """Through the engine: Mistral's call has no end tag, Kimi-K3's parser returns a list, Gemma has own values."""
    engine = make_engine(tool_parser=parser)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    request = GenerationRequest(USER, tools=tools, tool_choice="get_weather", max_tokens=400, parallel_tool_calls=False)

    async def run():
        return [e async for e in engine.generate(request)]

    events = loop.run(run())
    assert not [e for e in events if isinstance(e, ParseError)], (
        events[-1],
        "".join(e.text for e in events if isinstance(e, RawText)),
    )
    [call] = [e for e in events if isinstance(e, ToolCallEnd)]
    assert call.name == "get_weather" and events[-1].stop_reason == "tool_calls", events[-1]
    jsonschema.validate(call.arguments, WEATHER)


def test_a_value_that_looks_like_a_hermes_call_stays_a_value():
    """A pythonic call whose argument holds `"name": ..., "arguments": ...` is not taken for a JSON call's head."""
    module = importlib.import_module("mlx_lm.tool_parsers.pythonic")
    text = '<|tool_call_start|>[f(job={"name": "x", "arguments": {"a": 1}})]<|tool_call_end|>'
    markup = MarkupParser(None, (module.tool_call_start, module.tool_call_end), module.parse_tool_call, None)
    events = [e for chunk in text for e in markup.feed(chunk)] + markup.finish()
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["f"]
    [call] = [e for e in events if isinstance(e, ToolCallEnd)]
    assert (call.name, call.arguments) == ("f", {"job": {"name": "x", "arguments": {"a": 1}}})
    assert json.loads(call.arguments_json) == call.arguments
