"""Constrained decoding with llguidance: JSON schemas and tool-call markup turned into per-request token masks.

A request's constraint becomes one Lark grammar (llguidance's dialect, with JSON schemas
inlined as `%json`): free reasoning up to the end of `<think>` when the prompt opened it,
then the reply (a JSON value, forced tool calls, or free text whose tool calls are bound
once their markup begins). Compiled grammars are kept per grammar text; each request gets
a copy of the compiled matcher, and its mask is applied by an mlx-lm logits processor as an
additive bias (one MLX add), so it runs on the CPU backend and on Metal alike.
"""

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np

from .call_formats import FORMATS, GrammarError, Writer, literal
from .request import GenerationRequest
from .schemas import LIMITS, first_line, inline_json, tool_name, tool_schema

FREE_TEXT = r"/(.|\n)*/"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A byte of a bitmask as the bias of its 8 tokens: 0 where the bit is set, -inf where not.
BYTE_BIAS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"),
    np.float32(0),
    np.float32(-np.inf),
)


def masked(logits: mx.array, bitmask: np.ndarray, out: np.ndarray | None = None) -> mx.array:
    """`logits` with every token the bitmask (llguidance's: one bit a token, 32 a word) leaves out at -inf.

    The bitmask becomes an additive bias on the host (a table lookup per byte, into `out` when
    given); adding it is one MLX operation on any backend. (`mx.where` over a 150k vocabulary
    costs about 1 ms a step on the CPU backend; the bias, a third of that.)
    """
    bias = np.take(BYTE_BIAS, bitmask.view(np.uint8), axis=0, out=out).reshape(bitmask.shape[0], -1)
    if (short := logits.shape[-1] - bias.shape[-1]) > 0:  # logits past the tokenizer's vocabulary: never allowed
        bias = np.pad(bias, [(0, 0), (0, short)], constant_values=-np.inf)
    return logits + mx.array(bias[:, : logits.shape[-1]], dtype=logits.dtype)


class GrammarProcessor:
    """An mlx-lm logits processor holding one request's matcher.

    Called once a step with the tokens so far (the last one sampled at the step before) and
    the step's logits, still lazy: it starts the model's step, feeds the matcher that last
    token and computes the next mask while the step runs, then masks the logits.
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos: list[int], description: str, begins: str
    ) -> None:
        self.matcher = matcher
        self.eos = eos
        self.description = description
        self.begins = begins  # the markup after which the grammar binds ("": from the first token)
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self.bias = np.empty((1, self.bitmask.shape[1] * 4, 8), np.float32)
        self.first = True
        self.error = ""
        self.drafted = 0  # drafted tokens the last `verify` consumed

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)
        self._consume(int(tokens[-1].item()))  # type: ignore[arg-type]  # item() is typed to allow complex
        self._fill(self.bitmask, 0)
        return masked(logits, self.bitmask, self.bias)

    def verify(self, fed: list[int], logits: mx.array) -> mx.array:
        """Mask a speculative pass's logits: row j as the grammar stands after `fed[: j + 1]`.

        The drafted tokens (`fed[1:]`) are consumed while the grammar allows them; one it
        does not allow cannot be sampled at the row before, so the rows after it are never
        used. `kept` then gives back what was consumed past the tokens kept.
        """
        mx.async_eval(logits)
        self._consume(fed[0])
        bitmask = llguidance.numpy.allocate_token_bitmask(len(fed), self.bitmask.shape[1] * 32)
        self.drafted = 0
        for j in range(len(fed)):
            self._fill(bitmask, j)
            if j + 1 < len(fed) and not self.error and self.matcher.validate_tokens(fed[j + 1 : j + 2]):
                self.matcher.consume_token(fed[j + 1])
                self.drafted += 1
            elif j + 1 < len(fed):
                bitmask[j + 1 :] = bitmask[j]  # never used: the draft is cut at row j
                break
        return masked(logits, bitmask)

    def kept(self, accepted: int) -> None:
        """Of the drafted tokens the last `verify` consumed, `accepted` were kept: roll back the rest."""
        if self.drafted > accepted:
            self.matcher.rollback(self.drafted - accepted)

    def _consume(self, token: int) -> None:
        """Feed the matcher the token sampled at the step before (at the first step, the prompt's last: not fed)."""
        if not self.first and not self.error and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error()
        self.first = False

    def _fill(self, bitmask: np.ndarray, row: int) -> None:
        if not self.error:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, row)
            self.error = self.matcher.get_error()
        if self.error:  # only an end is left: the reply stops here rather than leave the grammar
            bitmask[row] = 0
            for t in self.eos:
                bitmask[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))


class Grammars:
    """Builds each request's grammar for one model's tokenizer and call format; caches compiled grammars.

    `think` and `tool` are the template's (start, end) tags or None; `parser` the name of its
    `mlx_lm.tool_parsers` module; `constrain_tools` binds every call the model starts on its own.
    """

    CACHE = 64

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        think: tuple[str, str] | None,
        tool: tuple[str, str] | None,
        parser: str | None,
        constrain_tools: bool = False,
    ) -> None:
        self.eos = sorted(tokenizer.eos_token_ids)
        self.unavailable = ""  # why this tokenizer cannot be constrained ("" when it can)
        self.tokenizer: llguidance.LLTokenizer | None
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=vocab_size, eos_token=self.eos)
        except Exception as e:  # only Hugging Face fast tokenizers are supported
            self.tokenizer, self.unavailable = None, f"{type(e).__name__}: {e}"
        added = getattr(tokenizer._tokenizer, "added_tokens_decoder", {}) if self.tokenizer else {}
        self.specials = {
            t.content: i for i, t in added.items() if self.tokenizer and self.tokenizer.is_special_token(i)
        }
        pattern = "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        self.special_re = re.compile(f"({pattern})") if pattern else None
        self.think = think
        self.tool = tool
        self.parser = parser
        self.call = FORMATS.get(parser or "") if tool and self.tokenizer else None
        self.constrain_tools = constrain_tools
        self.limits = llguidance.LLParserLimits(**LIMITS)
        self.compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def forces_calls(self) -> bool:
        """Whether a forced call is generated under a grammar (else the prompt starts its markup)."""
        return self.call is not None

    def markup(self, text: str) -> str:
        """Fixed markup as Lark elements: the model's special tokens where the text holds one, the text elsewhere.

        A special token is never written out as text, so markup made of them must name them.
        """
        parts = self.special_re.split(text) if self.special_re else [text]
        elements = [f"<[{self.specials[p]}]>" if p in self.specials else literal(p) for p in parts if p]
        return " ".join(elements) or '""'

    def grammar(self, request: GenerationRequest, reasoning: bool) -> tuple[str, str, str] | None:
        """The request's Lark grammar, a line describing it and the markup after which it binds; None when nothing
        binds it."""
        constraint = request.constraint
        tools = request.tools if request.tool_choice != "none" else None
        strict = set(constraint.strict_tools) if constraint and tools else set()
        if self.unavailable and (strict or (constraint and constraint.format)):
            raise GrammarError(f"structured output is not available for this model's tokenizer ({self.unavailable})")
        if strict and self.call is None:
            name = self.parser or "none"
            raise GrammarError(
                f"strict tools need a grammar for this model's tool-call format ({name}), which has none here"
            )
        reply = constraint.schema if constraint and constraint.format else None
        forced = bool(tools) and request.tool_choice != "auto" and self.call is not None
        lazy = bool(tools) and not forced and self.call is not None and (self.constrain_tools or bool(strict))
        if reply is None and not forced and not lazy:
            return None
        rules, what = [], []
        head = begins = ""
        # reasoning stays free: to the end of the block the prompt opened, or of one the model opens when asked to think
        if self.think and (reasoning or request.enable_thinking):
            rules.append(f"think: {FREE_TEXT} {self.markup(self.think[1])} /[ \\n]{{0,4}}/")
            head = "think " if reasoning else f"({self.markup(self.think[0])} think)? "
            begins = self.think[1]
            what.append(f"free until {self.think[1]}" if reasoning else f"free inside {self.think[0]}{self.think[1]}")
        # a format without an end tag (Mistral) ends its one call at the end of the reply
        parallel = request.parallel_tool_calls and self.tool is not None and self.tool[1]
        calls = 'call ("\\n" call)*' if parallel else "call"
        if forced:
            assert tools is not None  # forced only with tools
            chosen = [t for t in tools if request.tool_choice == "required" or tool_name(t) == request.tool_choice]
            rules += self.call_rules(chosen, lambda t: True, strict)
            body = calls
            what.append(f"a call to {'/'.join(tool_name(t) for t in chosen)} ({self.parser})")
        elif reply is not None:
            rules.append(f"reply: {inline_json(reply)}")
            body = "reply"
            assert constraint is not None  # a reply schema comes from the constraint
            what.append(f"a {constraint.format} reply")
            if tools and self.call is not None:  # or the model's calls instead of the reply
                rules += self.call_rules(tools, lambda t: self.constrain_tools or tool_name(t) in strict, strict)
                body = f"reply | {calls}"
                what[-1] += f" or calls ({self.parser})"
        else:
            assert tools is not None and self.tool is not None  # lazy only with tools and a call format
            rules += self.call_rules(tools, lambda t: self.constrain_tools or tool_name(t) in strict, strict)
            start = self.markup(self.tool[0])
            lazy_mark = "" if "<[" in start else "[lazy]"  # a special token ends free text by itself
            rules.append(f"text_then_call{lazy_mark}: {FREE_TEXT} {start}")
            body = f"(text_then_call call_body)* {FREE_TEXT}"
            begins = begins or self.tool[0]
            bound = "every call" if self.constrain_tools else "calls to " + "/".join(sorted(strict))
            what.append(f"free text; {bound} bound from {self.tool[0]} ({self.parser})")
        return "\n".join([f"start: {head}{body}", *rules]), ", then ".join(what), begins

    def call_rules(self, tools: list[dict], bound: Callable[[dict], bool], strict: set[str]) -> list[str]:
        """`call` (a whole call, tags included) and `call_body` (after the start tag) for these tools.

        A tool's arguments follow its schema where `bound`, any object elsewhere; keywords
        llguidance lacks are refused only for the `strict` tools, and ignored for the rest.
        """
        assert self.call is not None and self.tool is not None  # call rules only for a known call format
        names = [f"call_{i}" for i in range(len(tools))]
        heads = [f"call_body: {' | '.join(names)}", f"call: {self.markup(self.tool[0])} call_body"]
        w = Writer(self.markup, heads, self.tool[1])
        for name, tool in zip(names, tools, strict=False):
            schema = tool_schema(tool) if bound(tool) else ANY_OBJECT
            if tool_name(tool) not in strict:
                schema = {**schema, "x-guidance": {"lenient": True, **(schema.get("x-guidance") or {})}}
            w.rules.append(f"{name}: {self.call(tool_name(tool), schema, w)} {self.markup(self.tool[1])}")
        return w.rules

    def processor(self, request: GenerationRequest, reasoning: bool) -> GrammarProcessor | None:
        """The request's logits processor, or None when nothing binds it; GrammarError when its grammar fails."""
        try:
            found = self.grammar(request, reasoning)
        except RecursionError:
            raise GrammarError("the schema cannot be used: it is nested too deeply") from None
        if found is None:
            return None
        lark, description, begins = found
        assert self.tokenizer is not None  # without one, grammar() refuses or finds nothing to bind
        return GrammarProcessor(
            self.compile(lark).deep_copy(), self.tokenizer.vocab_size, self.eos, description, begins
        )

    def compile(self, lark: str) -> llguidance.LLMatcher:
        if (matcher := self.compiled.get(lark)) is not None:
            self.compiled.move_to_end(lark)
            return matcher
        assert self.tokenizer is not None  # without one, grammar() refuses or finds nothing to bind
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer, limits=self.limits
        )
        if failed:
            raise GrammarError(f"the schema cannot be used: {first_line(messages[0])}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise GrammarError(f"the schema cannot be used: {first_line(matcher.get_error())}")
        self.compiled[lark] = matcher
        if len(self.compiled) > self.CACHE:
            self.compiled.popitem(last=False)
        return matcher
