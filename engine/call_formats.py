"""Tool-call markup as Lark grammar, one writer per `mlx_lm.tool_parsers` module.

Each writes the body of a call (between the format's start and end tags) for one tool: its
name, then its arguments in the format's own syntax around the schema. What the grammar allows
is what that module's `parse_tool_call` reads back as the tool's name and arguments valid
against its schema: values the parser reads as JSON are llguidance's `%json`; strings a
format writes raw never hold the markup that ends them, nor what the parser would read as
something else (surrounding whitespace it strips, "null"). Gemma's and FunctionGemma's value
syntaxes get small grammars of their own here; what a format cannot carry is refused with a
GrammarError that says so.
"""

import json
import keyword
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.tool_parsers.minimax_m2 import _extract_types_from_schema as converted_types

from .schemas import inline_json

ANY = r"(.|\n)"
# What str.strip() strips: no raw value may begin or end with it where the parser strips values.
SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f \u{85}\u{a0}\u{1680}\u{2000}-\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}]"
STRIPPED = [f"{SPACE}{ANY}*", f"{ANY}*{SPACE}"]
Q = '"'
NULL = "[nN][uU][lL][lL]"  # read as null by the XML converters, whatever the type
# Schema keywords the non-JSON value grammars bind (numbers go to %json, which binds their keywords).
KEYWORDS = {
    "type", "enum", "const", "anyOf", "$ref", "properties", "required", "additionalProperties", "items",
    "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "title", "description", "default", "examples", "$comment", "$schema",
    "$id", "$defs", "definitions", "x-guidance", "strict",
}  # fmt: skip


NO_CHOICE = "none of the values of an enum or const (each holds markup, or what its parser would read otherwise)"


class GrammarError(ValueError):
    """The constraint cannot be compiled; the message says why, for the client."""


def literal(text: str) -> str:
    return json.dumps(text)


def regex_escape(text: str) -> str:
    def one(c: str) -> str:
        if c in r"\.+*?()|[]{}^$/-&~":
            return "\\" + c
        return c if c.isprintable() else f"\\u{{{ord(c):x}}}"

    return "".join(one(c) for c in text)


def containing(text: str) -> str:
    return f"{ANY}*{regex_escape(text)}{ANY}*"


@dataclass(slots=True)
class Writer:
    """What a call format writes its grammar with: `markup(text)` (the model's special tokens where the text holds
    them, else the text), `rules`, where it adds any rule it needs, and the call's `end` tag."""

    markup: Callable[[str], str]
    rules: list[str]
    end: str = ""
    shared: set[str] = field(default_factory=set)

    def rule(self, expr: str, lazy: bool = False) -> str:
        name = f"part_{len(self.rules)}"
        self.rules.append(f"{name}{'[lazy]' if lazy else ''}: {expr}")
        return name

    def once(self, name: str, expr: Callable[[], str]) -> str:
        """A rule written once per grammar, however many values use it."""
        if name not in self.shared:
            self.shared.add(name)
            self.rules.append(f"{name}: {expr()}")
        return name

    def raw(self, schema: dict, close: str, avoid: tuple[str, ...] = (), excluded: tuple[str, ...] = ()) -> str:
        """A string written raw (within its length bounds), then `close`: it never holds `close`, the call's end tag
        or any of `avoid`, and never matches any of the regexes `excluded`, so the parser's regexes end it where the
        grammar does and read it back unchanged."""
        check_raw(schema)
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        parts = [f"/{ANY}{{{low},{'' if high is None else high}}}/"]
        parts += [f"~/{containing(t)}/" for t in {close, self.end, *avoid} if t]
        parts += [f"~/{regex}/" for regex in excluded]
        token = f"RAW_{len(self.rules)}"
        self.rules.append(f"{token}: {' & '.join(parts)}")
        # the text of `close` up to its first special token ends the raw text in one lazy lexeme
        cut = next((i for i in range(len(close)) if "<[" in self.markup(close[: i + 1])), len(close))
        if cut == 0:
            return self.rule(f"{token} {self.markup(close)}")
        head = self.rule(f"{token} {literal(close[:cut])}", lazy=True)
        return f"{head} {self.markup(close[cut:])}" if close[cut:] else head


def check_raw(schema: dict) -> None:
    if {"pattern", "format"} & schema.keys() and not lenient(schema):
        raise GrammarError("a string's pattern or format cannot be bound where this tool-call format writes it raw")


def lenient(schema: dict) -> bool:
    return bool((schema.get("x-guidance") or {}).get("lenient"))


def joined(items: list[tuple[str, bool]], sep: str, w: Writer, at_least_one: bool = False) -> str:
    """The items in order, each optional unless required, `sep` between those written."""
    tail = ['""'] * (len(items) + 1)  # tail[i]: items[i:], each after a separator
    for i in range(len(items) - 1, 0, -1):
        expr, required = items[i]
        piece = f"{literal(sep)} {expr}" if sep else expr
        tail[i] = w.rule(f"({piece}){'' if required else '?'} {tail[i + 1]}")
    first = []
    for i, (expr, required) in enumerate(items):
        first.append(f"{expr} {tail[i + 1]}")
        if required:
            break
    else:
        if not at_least_one:
            first.append('""')
    if not first:
        raise GrammarError("a call in this tool-call format needs at least one parameter")
    return "(" + " | ".join(first) + ")"


def alternatives(exprs: list[str], what: str = "no value of this schema") -> str:
    if not exprs:
        raise GrammarError(f"{what} can be written in this tool-call format")
    return "(" + " | ".join(exprs) + ")"


def attempt(write: Callable[[], str]) -> list[str]:
    """`[write()]`, or `[]` where it cannot be written: one way among others to write a value."""
    try:
        return [write()]
    except GrammarError:
        return []


def check_keywords(schema: dict) -> None:
    """Keywords a value grammar does not bind are refused, unless nobody asked for the schema to be strict."""
    if not lenient(schema) and (unknown := sorted(schema.keys() - KEYWORDS)):
        raise GrammarError(f"the keyword {unknown[0]} cannot be bound in this tool-call format")


def parameters(
    schema: dict,
    item: Callable[[str, dict, dict], str],
    sep: str,
    w: Writer,
    at_least_one: bool = False,
) -> str:
    """Every declared parameter in order, each optional unless required, `sep` between those written.

    `item(key, declared, resolved)` writes one, from its schema as declared (what a parser reading the tool's
    schema sees) and resolved (references followed; the top level's `$defs` and x-guidance passed down).
    """
    check_keywords({k: v for k, v in schema.items() if k != "type"})
    properties = dict(schema.get("properties") or {})
    required = list(schema.get("required") or [])
    properties |= {key: {} for key in required if key not in properties}  # required, undeclared: any value
    items = []
    for key, sub in properties.items():
        sub = sub if isinstance(sub, dict) else {}
        items.append((item(key, sub, resolved(sub, schema)), key in required))
    return joined(items, sep, w, at_least_one)


def resolved(sub: dict, root: dict) -> dict:
    """`sub` with its local `$ref` followed, the root's `$defs` and x-guidance carried (for %json and lenience)."""
    carried = {k: root[k] for k in ("$defs", "definitions", "x-guidance") if k in root}
    while isinstance(ref := sub.get("$ref"), str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise GrammarError(f"the reference {ref} does not resolve")
        sub = {**{k: v for k, v in sub.items() if k != "$ref"}, **target}
    return {**sub, **carried}


def writes_raw(schema: dict) -> bool:
    """A string-only schema whose pattern or format, if any, may be ignored: one a format may write raw."""
    return string_only(schema) and (not {"pattern", "format"} & schema.keys() or lenient(schema))


def string_only(schema: dict) -> bool:
    """The schema takes strings and nothing else (a string type, or an enum or const of strings)."""
    if "const" in schema:
        return isinstance(schema["const"], str)
    if "enum" in schema:
        return all(isinstance(v, str) for v in schema["enum"])
    return schema.get("type") == "string" and "anyOf" not in schema


def raw_value(schema: dict, close: str, w: Writer, avoid: tuple[str, ...] = (), excluded: tuple[str, ...] = ()) -> str:
    """A string-only schema's value written raw, then `close`: its enum or const where given (those it can write)."""
    choices = [schema["const"]] if "const" in schema else schema.get("enum")
    if choices is None:
        return w.raw(schema, close, avoid, excluded)
    bad = [close, w.end, *avoid]
    patterns = [re.compile(re.sub(r"\\u\{([0-9a-f]+)\}", lambda m: chr(int(m[1], 16)), r)) for r in excluded]
    fits = [v for v in choices if not any(t and t in v for t in bad) and not any(p.fullmatch(v) for p in patterns)]
    return f"{alternatives([w.markup(v) for v in fits], NO_CHOICE)} {w.markup(close)}"


def json_tools_call(name: str, schema: dict, w: Writer) -> str:
    """Hermes style: `{"name": ..., "arguments": {...}}` on its own line."""
    head = w.markup(f'\n{{"name": {json.dumps(name)}, "arguments": ')
    return f"{head} {inline_json(schema)} {w.markup('}' + chr(10))}"


QWEN3_STRINGS = {"string", "str", "text", "varchar", "char", "enum"}
QWEN3_JSON = ("int", "uint", "long", "short", "unsigned", "num", "float", "bool", "object", "arr", "dict", "list")
OPENS_JSON = r"[ \t\n\r]*[{\[]" + ANY + "*"  # json.loads reads such text as an object or array


def qwen3_coder_value(declared: dict, schema: dict, w: Writer) -> str:
    """A value for mlx-lm's Qwen3-Coder converter, which reads it by the name of its declared type: raw where that
    is a string's (or where none is declared, unless JSON would read an object or array), JSON otherwise."""
    close, avoid = "\n</parameter>\n", ("</parameter>",)
    kind = declared.get("type")
    if kind is None and string_only(as_string(schema)):
        return raw_value(as_string(schema), close, w, avoid, excluded=(NULL, OPENS_JSON))
    if kind is None and schema.get("type") in ("object", "array"):
        return f"{inline_json(schema)} {w.markup(close)}"
    if isinstance(kind, list) and set(kind) <= {"string", "number", "integer", "null"}:
        return f"{inline_json(schema)} {w.markup(close)}"  # read by literal_eval, which reads these as JSON does
    name = kind.strip().lower() if isinstance(kind, str) else ""
    if name in QWEN3_STRINGS and string_only(schema):
        return raw_value(schema, close, w, avoid, excluded=(NULL,))
    if name.startswith(QWEN3_JSON) or name == "null":
        return f"{inline_json(schema)} {w.markup(close)}"
    what = f"of type {kind}" if kind is not None else "without a declared type that is not a string, object or array"
    raise GrammarError(f"a parameter {what} cannot be written in this tool-call format")


def qwen3_coder_call(name: str, schema: dict, w: Writer) -> str:
    """Qwen3-Coder XML: `<function=NAME>` then `<parameter=KEY>` blocks, string values raw."""

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, r"[^\s<>]+", "key")
        return f"{w.markup('<parameter=' + key + '>' + chr(10))} {qwen3_coder_value(declared, sub, w)}"

    check_name(name, r"[^\s<>]+", "tool name")
    params = parameters(schema, item, "", w)
    return f"{w.markup(chr(10) + '<function=' + name + '>' + chr(10))} {params} {w.markup('</function>' + chr(10))}"


def glm47_call(name: str, schema: dict, w: Writer) -> str:
    """GLM-4.7: the name, then `<arg_key>`/`<arg_value>` pairs; values raw where declared strings, else JSON."""

    check_name(name, r"\S(.*\S)?", "tool name")
    return f"{w.markup(name + chr(10))} {parameters(schema, tagged_pair('arg', w), '', w)}"


def tagged_pair(tag: str, w: Writer) -> Callable[[str, dict, dict], str]:
    """One parameter as `<TAG_key>KEY</TAG_key>` and `<TAG_value>VALUE</TAG_value>` lines (GLM, LongCat): the
    value raw where declared a string, else JSON."""

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, r"\S(.*\S)?", "key")
        head = w.markup(f"<{tag}_key>{key}</{tag}_key>\n<{tag}_value>")
        close = f"</{tag}_value>\n"
        if declared.get("type") == "string" and string_only(sub):
            return f"{head} {raw_value(sub, close, w, (f'</{tag}_value>',), excluded=tuple(STRIPPED))}"
        return f"{head} {inline_json(sub)} {w.markup(close)}"

    return item


def minimax_m2_call(name: str, schema: dict, w: Writer) -> str:
    """MiniMax-M2: `<invoke name=...>` with `<parameter name=...>` children, string values raw."""
    avoid = ("</parameter>", "</invoke>")

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, r'[^">]+', "key")
        value = converted_value(declared, sub, "</parameter>\n", avoid, w)
        return f"{w.markup('<parameter name=' + json.dumps(key) + '>')} {value}"

    check_name(name, r'[^">]+', "tool name")
    head = w.markup(f"\n<invoke name={json.dumps(name)}>\n")
    return f"{head} {parameters(schema, item, '', w)} {w.markup('</invoke>' + chr(10))}"


def kimi_k2_call(name: str, schema: dict, w: Writer) -> str:
    """Kimi-K2: one call in the section, `functions.NAME:0` and its JSON arguments."""
    head = w.markup(f"<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>")
    return f"{head} {inline_json(schema)} {w.markup('<|tool_call_end|>')}"


def as_string(schema: dict) -> dict:
    """The schema's strings: the string type of a string-or-null type, and strings for a schema that takes anything."""
    kind = schema.get("type")
    if isinstance(kind, list) and "string" in kind and set(kind) <= {"string", "null"}:
        return {**schema, "type": "string"}
    if kind is None and not {"enum", "const", "anyOf", "$ref"} & schema.keys():
        return {**schema, "type": "string"}
    return schema


def converted_value(
    declared: dict, schema: dict, close: str, avoid: tuple[str, ...], w: Writer, cdata: bool = False
) -> str:
    """A value for mlx-lm's MiniMax converter (MiniMax-M2, MiniCPM5), which reads it by the types its declared schema
    names: a raw string where those are string (and null), JSON where none is a string; "null" is always null.
    `cdata`: a string may also be wrapped in CDATA, which keeps it as written."""
    types = set(converted_types(declared))
    if "string" not in types:
        return f"{inline_json(schema)} {w.markup(close)}"
    strings = as_string(schema)
    if not types <= {"string", "null"} or not string_only(strings):
        raise GrammarError("a parameter read as a string or another type cannot be written in this tool-call format")
    check_raw(strings)
    plain = (NULL, *STRIPPED, *([f"{ANY}*[<&\\n]{ANY}*"] if cdata else []))
    values = attempt(lambda: raw_value(strings, close, w, avoid, excluded=plain))
    if cdata:
        cdata_open = w.markup("<![CDATA[")
        values += attempt(
            lambda: f"{cdata_open} {raw_value(strings, ']]>', w, (*avoid, close), (NULL,))} {w.markup(close)}"
        )
    if "null" in types and strings is not schema:
        values.append(f"{literal('null')} {w.markup(close)}")
    return alternatives(values, NO_CHOICE)


# The formats for the rest of mlx-lm's parsers


def check_name(name: str, pattern: str, what: str) -> None:
    if not re.fullmatch(pattern, name):
        raise GrammarError(f"the {what} {name!r} cannot be written in this tool-call format")


def python_identifier(name: str, what: str) -> None:
    for part in name.split("."):
        if not part.isidentifier() or keyword.iskeyword(part) or unicodedata.normalize("NFKC", part) != part:
            raise GrammarError(f"the {what} {name!r} is not a Python identifier, as a pythonic call needs")


def python_value(schema: dict) -> str:
    """A JSON value (the parser reads true/false/null too, as templates render nested values), or Python's own
    True/False/None for a boolean or null."""
    kind = schema.get("type")
    spelled = {"boolean": ['"True"', '"False"'], "null": ['"None"']}.get(kind if isinstance(kind, str) else "", [])
    if "enum" in schema or "const" in schema:
        spelled = []
    return alternatives([inline_json(schema), *spelled])


def pythonic_call(name: str, schema: dict, w: Writer) -> str:
    """Pythonic (LFM2, Llama 3.2): `[name(key=value, ...)]`, a Python list of one call with keyword arguments."""
    python_identifier(name, "tool name")

    def item(key: str, declared: dict, sub: dict) -> str:
        python_identifier(key, "parameter")
        return f"{literal(key + '=')} {python_value(sub)}"

    return f"{literal('[' + name + '(')} {parameters(schema, item, ', ', w)} {literal(')]')}"


def mistral_call(name: str, schema: dict, w: Writer) -> str:
    """Mistral: `name[ARGS]{...}` (v11 templates) or `[{"name": ..., "arguments": {...}}]` (earlier ones)."""
    check_name(name, r"[\w-]+", "tool name")
    arguments = inline_json(schema)
    header = f"{w.markup(name + '[ARGS]')} {arguments}"
    head = w.markup('[{"name": ' + json.dumps(name) + ', "arguments": ')
    listed = f"{head} {arguments} {w.markup('}]')}"
    return f"({header} | {listed})"


GEMMA_QUOTE = '<|"|>'
KEY = r"\w+"


def gemma_literal(value: Any) -> str:
    """A JSON value as Gemma 4 writes it: strings between <|"|>, object keys bare, no spaces."""
    if isinstance(value, str):
        return GEMMA_QUOTE + value + GEMMA_QUOTE
    if isinstance(value, list):
        return "[" + ",".join(gemma_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{gemma_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def gemma_literal_fits(value: Any, w: Writer) -> bool:
    if isinstance(value, str):
        return not any(t in value for t in (GEMMA_QUOTE, "\x00", w.end))
    if isinstance(value, list):
        return all(gemma_literal_fits(v, w) for v in value)
    if isinstance(value, dict):
        return all(re.fullmatch(KEY, k) and gemma_literal_fits(v, w) for k, v in value.items())
    return True


def gemma_value(schema: dict, root: dict, w: Writer) -> str:
    """A value of `schema` in Gemma 4's syntax."""
    schema = resolved(schema, root)
    check_keywords(schema)
    if "const" in schema or "enum" in schema:
        choices = [schema["const"]] if "const" in schema else schema["enum"]
        return alternatives([w.markup(gemma_literal(v)) for v in choices if gemma_literal_fits(v, w)], NO_CHOICE)
    if isinstance(schema.get("anyOf"), list):
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return alternatives([gemma_value({**rest, **branch}, root, w) for branch in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return alternatives([gemma_value({**schema, "type": k}, root, w) for k in kind])
    if kind == "string":
        quote = w.markup(GEMMA_QUOTE)
        return f"{quote} {w.raw(schema, GEMMA_QUOTE, avoid=(chr(0),))}"
    if kind in ("integer", "number"):
        return inline_json(schema)
    if kind in ("boolean", "null"):
        return '("true" | "false")' if kind == "boolean" else '"null"'
    if kind == "array":
        items = gemma_value(schema["items"], root, w) if isinstance(schema.get("items"), dict) else gemma_any(w)
        return bracketed(items, schema.get("minItems", 0), schema.get("maxItems"), w)
    if kind == "object":

        def item(key: str, declared: dict, sub: dict) -> str:
            check_name(key, KEY, "key")
            return f"{literal(key + ':')} {gemma_value(sub, root, w)}"

        return f'"{{" {parameters(schema, item, ",", w)} "}}"'
    if kind is None:
        return gemma_any(w)
    raise GrammarError(f"the type {kind} is not a JSON Schema type")


def bracketed(item: str, low: int, high: int | None, w: Writer) -> str:
    """`[item,...]` with `low` to `high` items."""
    if high == 0:
        return '"[]"'
    more = f'("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}' if high != 1 else ""
    items = f"{item} {more}"
    return f'"[" {items if low > 0 else f"({items})?"} "]"'


def gemma_any(w: Writer) -> str:
    """Any value in Gemma 4's syntax."""

    def expr() -> str:
        string = f"{w.markup(GEMMA_QUOTE)} {w.raw({}, GEMMA_QUOTE, avoid=(chr(0),))}"
        pair = f'/{KEY}/ ":" gemma_any'
        return (
            f'{string} | {inline_json({"type": "number"})} | "true" | "false" | "null"'
            f' | "[" (gemma_any ("," gemma_any)*)? "]" | "{{" ({pair} ("," {pair})*)? "}}"'
        )

    return w.once("gemma_any", expr)


def gemma4_call(name: str, schema: dict, w: Writer) -> str:
    """Gemma 4: `call:name{key:value,...}`, strings between `<|"|>`, keys bare."""
    check_name(name, r"[\w-]+", "tool name")
    return f"{literal('call:' + name)} {gemma_value(schema, schema, w)}"


ESCAPE = "<escape>"


def function_gemma_value(schema: dict, root: dict, w: Writer) -> str:
    """A scalar in FunctionGemma's syntax: a string between <escape> marks, else JSON up to the next comma."""
    schema = resolved(schema, root)
    check_keywords(schema)
    if "const" in schema or "enum" in schema:
        choices = [schema["const"]] if "const" in schema else schema["enum"]
        fits = [v for v in choices if not isinstance(v, list | dict)]
        fits = [v for v in fits if not isinstance(v, str) or not any(t in v for t in (ESCAPE, "}", w.end))]
        written = [w.markup(ESCAPE + v + ESCAPE if isinstance(v, str) else json.dumps(v)) for v in fits]
        return alternatives(written, NO_CHOICE)
    if isinstance(schema.get("anyOf"), list):
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return alternatives([function_gemma_value({**rest, **branch}, root, w) for branch in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list) or kind is None:
        kinds = kind or ["string", "number", "boolean", "null"]
        return alternatives([function_gemma_value({**schema, "type": k}, root, w) for k in kinds])
    if kind == "string":
        return f"{w.markup(ESCAPE)} {w.raw(schema, ESCAPE, avoid=('}',))}"
    if kind in ("integer", "number"):
        return inline_json(schema)
    if kind in ("boolean", "null"):
        return '("true" | "false")' if kind == "boolean" else '"null"'
    raise GrammarError(f"FunctionGemma's call format cannot carry a value of type {kind}")


def function_gemma_call(name: str, schema: dict, w: Writer) -> str:
    """FunctionGemma: `call:name{key:value,...}` with scalar values, strings between <escape> marks."""
    check_name(name, r"\w+", "tool name")

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, KEY, "key")
        return f"{literal(key + ':')} {function_gemma_value(sub, schema, w)}"

    return f'{literal("call:" + name + "{")} {parameters(schema, item, ",", w)} "}}"'


def longcat_call(name: str, schema: dict, w: Writer) -> str:
    """LongCat: the name, then `<longcat_arg_key>`/`<longcat_arg_value>` pairs (strings raw where declared so); a call
    without arguments as `{"name": ..., "arguments": {}}`, which the parser also reads."""
    check_name(name, r"\S(.*\S)?", "tool name")

    head = w.markup('{"name": ' + json.dumps(name) + ', "arguments": ')
    listed = f"{head} {inline_json(schema)} {literal('}')}"
    try:
        tagged = (
            f"{w.markup(name + chr(10))} {parameters(schema, tagged_pair('longcat_arg', w), '', w, at_least_one=True)}"
        )
    except GrammarError:  # no parameter to write: only the JSON form
        return listed
    return f"({tagged} | {listed})"


def minicpm5_call(name: str, schema: dict, w: Writer) -> str:
    """MiniCPM5: (after `<function name=`) `"NAME">` then `<param name="KEY">` children; strings raw, or in CDATA."""
    check_name(name, r'[^"]+', "tool name")

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, r'[^"]+', "key")
        value = converted_value(declared, sub, "</param>\n", ("</param>",), w, cdata=True)
        return f"{w.markup('<param name=' + Q + key + Q + '>')} {value}"

    return f"{w.markup(Q + name + Q + '>' + chr(10))} {parameters(schema, item, '', w)}"


# json.loads would read a raw string that looks like these as something else
JSON_LOOKALIKES = (
    r'["{\[]' + ANY + "*",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "true|false|null|NaN|-?Infinity",
)


def muse_spark_call(name: str, schema: dict, w: Writer) -> str:
    """Muse Spark: `<atem:invoke name="NAME">` with `<atem:parameter name="KEY">` children, values JSON, or strings raw
    where JSON would not read them."""
    check_name(name, r'[^"]+', "tool name")
    close = "</atem:parameter>"

    def item(key: str, declared: dict, sub: dict) -> str:
        check_name(key, r'[^">]+', "key")
        values = [f"{inline_json(sub)} {w.markup(close)}"]
        if writes_raw(sub):
            avoid = ("</atem:invoke>",)
            values += attempt(lambda: raw_value(sub, close, w, avoid, excluded=(*STRIPPED, *JSON_LOOKALIKES)))
        return f"{w.markup('<atem:parameter name=' + Q + key + Q + '>')} {alternatives(values)}"

    head = w.markup(f'<atem:invoke name="{name}">')
    return f"{head} {parameters(schema, item, '', w)} {w.markup('</atem:invoke>')}"


def attribute(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;")


def kimi_k3_call(name: str, schema: dict, w: Writer) -> str:
    """Kimi K3 XTML: `<|open|>call tool="NAME"<|sep|>`, then the arguments one by one (strings raw) or as one JSON
    object block, then `<|close|>call<|sep|>`."""
    close = "<|close|>argument<|sep|>"
    avoid = ("<|close|>call<|sep|>", "<|close|>json<|sep|>")

    def item(key: str, declared: dict, sub: dict) -> str:
        head = '<|open|>argument key="' + attribute(key) + '" type="'
        raw = attempt(lambda: raw_value(sub, close, w, avoid)) if writes_raw(sub) else []
        if raw:
            return f"{w.markup(head + 'string' + Q + '<|sep|>')} {raw[0]}"
        kind = sub.get("type")
        kind = kind if isinstance(kind, str) and kind != "string" else "json"
        return f"{w.markup(head + kind + Q + '<|sep|>')} {inline_json(sub)} {w.markup(close)}"

    block = f"{w.markup('<|open|>json type=' + Q + 'object' + Q + '<|sep|>')} {inline_json(schema)}"
    arguments = f"({parameters(schema, item, '', w)} | {block} {w.markup('<|close|>json<|sep|>')})"
    head = w.markup('<|open|>call tool="' + attribute(name) + '" index="1"<|sep|>')
    return f"{head} {arguments} {w.markup('<|close|>call<|sep|>')}"


FORMATS: dict[str, Callable[[str, dict, Writer], str]] = {
    "json_tools": json_tools_call,
    "qwen3_coder": qwen3_coder_call,
    "glm47": glm47_call,
    "laguna": glm47_call,
    "minimax_m2": minimax_m2_call,
    "kimi_k2": kimi_k2_call,
    "pythonic": pythonic_call,
    "mistral": mistral_call,
    "gemma4": gemma4_call,
    "function_gemma": function_gemma_call,
    "longcat": longcat_call,
    "minicpm5": minicpm5_call,
    "muse_spark": muse_spark_call,
    "kimi_k3": kimi_k3_call,
}
