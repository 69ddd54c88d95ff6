"""Continuous batching on mlx-lm's BatchGenerator: admit requests, step the batch, turn tokens into events."""

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

from . import boundaries, cache_kinds, faults, sampling, speculation
from .config import EngineConfig, draft_most
from .events import Done, Error, Event, PrefillProgress, Queued, Started, StopReason, Timings, Usage, coalesced
from .grammar import Grammars
from .loader import Loaded
from .output import MarkupParser, OutputStream
from .prefix_cache import PrefixCache, TurnMemory
from .request import GenerationRequest

Tagged = tuple[str, Event]


class RequestError(Exception):
    """The request cannot be run as asked; the message goes back to its client."""


@dataclass(slots=True)
class Prompt:
    """Rendered tokens; `system_end` is where the system prompt and tools end (0: none).

    `boundaries` are the token positions where later prompts are likely to part from this
    one (around the last user message); models whose cache cannot be cut anywhere keep
    snapshots there.
    """

    text: str
    tokens: list[int]
    state: str
    body: str
    system_end: int = 0
    boundaries: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Active:
    rid: str
    uid: int
    output: OutputStream
    guard: sampling.LoopGuard
    prompt: Prompt
    prompt_tokens: int
    cached_tokens: int
    checkpoint_at: int
    snapshot_at: set[int] = field(default_factory=set)
    snapshots: dict[int, list] = field(default_factory=dict)
    submitted: float = field(default_factory=time.perf_counter)
    prefill_started: float | None = None
    prefilled: int = 0
    fault: tuple[str, int] | None = None
    first_token: float | None = None
    generated: int = 0
    reasoning: int = 0
    drafted: int = 0
    reply: list[int] = field(default_factory=list)


class Scheduler:
    """`kv_bytes_per_token`: what one more token of a request adds to the cache (see `cache_kinds`)."""

    def __init__(self, loaded: Loaded, config: EngineConfig, cache: PrefixCache, kv_bytes_per_token: int) -> None:
        self.cache = cache
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.context_length
        self.config = config
        self.parser_name = self.tokenizer.init_kwargs.get("tool_parser_type")
        self.think = (self.tokenizer.think_start, self.tokenizer.think_end) if self.tokenizer.has_thinking else None
        self.tool = (
            (self.tokenizer.tool_call_start, self.tokenizer.tool_call_end) if self.tokenizer.has_tool_calling else None
        )
        self.active: dict[int, Active] = {}
        self.uid_of: dict[str, int] = {}
        self.batch_sizes: Counter[int] = Counter()
        self.prompt_tokens_total = 0
        self.prefill_tokens_total = 0
        self.generation_tokens_total = 0
        self.failures: list[str] = []
        self.kv_bytes_per_token = kv_bytes_per_token
        self.cache_mode = cache_kinds.mode(self.model)
        self.snapshotting = self.cache_mode != "any token"
        # KV layers pad soundly; a model with other layers is checked, and prefilled one request at a time if need be
        self.prefill_together = not self.snapshotting or cache_kinds.padded_prefill_sound(self.model)
        if not self.prefill_together:
            self.cache_mode += "; prompts prefilled one at a time"
        self.draft_most, self.speculation_mode = self._speculation(config.speculate)
        self.draft_counts = speculation.Counts()
        self.turns = TurnMemory(self.tokenizer.decode)
        vocab_size = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer)
        self.grammars = Grammars(
            self.tokenizer, vocab_size, self.think, self.tool, self.parser_name, config.constrain_tools
        )
        self.generator = self._new_generator()

    def _speculation(self, setting: str) -> tuple[int, str]:
        """How many tokens a pass may draft (0: none), and what the start line says of it."""
        most = draft_most(setting)
        if not most:
            return 0, "off"
        mode = f"prompt lookup, up to {most} tokens a pass"
        if self.cache_mode != "any token":  # see speculation.SpeculativeBatch._rewind
            mode += "; layers that cannot be cut are restored and the kept tokens fed again after a miss"
        return most, mode

    def _new_generator(self) -> speculation.SpeculativeGenerator:
        n = self.config.max_concurrency
        return speculation.SpeculativeGenerator(
            self.model,
            most=self.draft_most,
            counts=self.draft_counts,
            max_tokens=self.config.max_tokens,
            stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
            completion_batch_size=n,
            prefill_batch_size=n if self.prefill_together else 1,
            prefill_step_size=self.config.prefill_step,
        )

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def decoding(self) -> bool:
        """The next step only decodes: no request in the batch waits for its prefill (the others wait for a slot)."""
        decoding = sum(a.first_token is not None for a in self.active.values())
        return decoding > 0 and (decoding == len(self.active) or decoding >= self.config.max_concurrency)

    def render(self, request: GenerationRequest) -> Prompt:
        """The prompt's tokens, with the opening markup of a call when `tool_choice` forces one."""
        tools = request.tools if request.tool_choice != "none" and request.tools else None
        kwargs = {}
        if request.enable_thinking is not None:
            kwargs["enable_thinking"] = request.enable_thinking
        try:
            text = self.tokenizer.apply_chat_template(
                request.messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except Exception as e:  # jinja templates raise their own errors for bad input
            raise RequestError(f"the chat template cannot render these messages: {e}") from e
        state, body = MarkupParser.TEXT, ""
        if self.think and text.rstrip().endswith(self.think[0]):
            state = MarkupParser.REASONING
        if tools and request.tool_choice not in ("auto", "none"):
            opening = self._forced_call(request)
            if not self.grammars.forces_calls:  # else the grammar writes the whole call
                state, body = MarkupParser.TOOL, opening
                assert self.tool is not None  # _forced_call refuses a model without one
                text += self.tool[0] + body
        tokens = self.turns.encode(text, self._encode)
        system_end = boundaries.system_end(self.tokenizer, request.messages, tools, text, tokens)
        prompt = Prompt(text, tokens, state, body, system_end)
        if self.snapshotting:
            prompt.boundaries = boundaries.around_last_user(self.tokenizer, request.messages, tools, text, tokens)
        return prompt

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _forced_call(self, request: GenerationRequest) -> str:
        if not self.tool:
            raise RequestError("this model has no tool-call format, so tool_choice cannot force a call")
        if request.tool_choice == "required":
            return "\n"
        names = [t.get("function", t).get("name") for t in request.tools or []]
        if request.tool_choice not in names:
            raise RequestError(f"tool_choice names {request.tool_choice!r}, which is not among the tools")
        if self.parser_name != "json_tools":
            return "\n"
        # no trailing space: the model saw " {" as one piece after the colon, never a lone space
        return f'\n{{"name": {json.dumps(request.tool_choice)}, "arguments":'

    def count_tokens(self, request: GenerationRequest) -> int:
        return len(self.render(request).tokens)

    def submit(self, rid: str, request: GenerationRequest) -> list[Tagged]:
        try:
            prompt = self.render(request)
            max_tokens = self._max_tokens(request, len(prompt.tokens))
            if problem := sampling.check(request.sampling, len(self.tokenizer)):
                raise RequestError(problem)
            fault = faults.parse(request.fault) if request.fault else None
            s = request.sampling
            sampler = sampling.sampler(s)
            processors = sampling.logits_processors(s, self.config.repetition_penalty)
            grammar = self.grammars.processor(request, prompt.state == MarkupParser.REASONING)
        except (RequestError, ValueError, TypeError) as e:
            return [(rid, Error("invalid_request", str(e)))]
        tokens = prompt.tokens
        hit = self.cache.match(tokens)
        cached = hit.length
        checkpoint_at = prompt.system_end if prompt.system_end > cached else 0
        snapshot_at = set()
        if self.snapshotting:
            snapshot_at = {
                n for n in [*prompt.boundaries, prompt.system_end, len(tokens) - 1] if cached < n < len(tokens)
            }
        cuts = sorted(snapshot_at | {checkpoint_at} - {0})
        segments = [tokens[a:b] for a, b in zip([cached, *cuts], [*cuts, len(tokens)], strict=False)]
        [uid] = self.generator.insert_segments(
            [segments],
            caches=[hit.layers] if hit.layers else None,
            all_tokens=[tokens[:cached]],
            max_tokens=[max_tokens],
            samplers=[sampler],
            logits_processors=[processors + [grammar] if grammar else processors],
        )
        markup = MarkupParser(
            self.think, self.tool, self.tokenizer.tool_parser, request.tools, prompt.state, prompt.body
        )
        output = OutputStream(self.tokenizer.detokenizer, request.stop, markup)
        guard = sampling.LoopGuard(self.config.loop_window, self.config.loop_max_period)
        ahead = sum(a.prefill_started is None for a in self.active.values())
        self.active[uid] = Active(
            rid, uid, output, guard, prompt, len(tokens), cached, checkpoint_at, snapshot_at, fault=fault
        )
        self.uid_of[rid] = uid
        self.prompt_tokens_total += len(tokens)
        cached_chars = len(self.tokenizer.decode(tokens[:cached])) if cached else 0
        bound = (grammar.description, grammar.begins) if grammar else ("", "")
        return [(rid, Queued(ahead)), (rid, Started(len(tokens), cached, prompt.text, cached_chars, *bound))]

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        if room < 1:
            raise RequestError(f"prompt is too long: {prompt_tokens} tokens > {self.context_length - 1} maximum")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {request.max_tokens}")
        max_tokens = min(request.max_tokens or self.config.max_tokens, self.config.max_tokens, room)
        kv_gb = (prompt_tokens + max_tokens) * self.kv_bytes_per_token / 2**30
        if self.config.max_kv_gb and kv_gb > self.config.max_kv_gb:
            raise RequestError(
                f"this request's KV cache could reach {kv_gb:.3g} GB ({prompt_tokens} prompt + {max_tokens} "
                f"new tokens), over the server's --max-kv-gb {self.config.max_kv_gb:g}; lower max_tokens"
            )
        return max_tokens

    def cancel(self, rid: str) -> None:
        if (uid := self.uid_of.get(rid)) is not None:
            self._retire(self.active[uid], still_batched=True)

    def step(self) -> list[Tagged]:
        try:
            return coalesced(self._step())
        except Exception as e:  # a failed batched step takes every request in it down
            return self.fail_all(f"the batched step failed: {type(e).__name__}: {e}")

    def _step(self) -> list[Tagged]:
        prompt_responses, generation_responses = self.generator.next()
        now = time.perf_counter()
        events: list[Tagged] = []
        for r in prompt_responses:
            if a := self.active.get(r.uid):
                a.prefill_started = a.prefill_started or now
                done, total = r.progress
                self.prefill_tokens_total += done - a.prefilled
                a.prefilled = done
                events.append((a.rid, PrefillProgress(done, total)))
                if r.end_of_segment and not r.end_of_prompt:
                    self._segment_ended(a, a.cached_tokens + done)
        if generation_responses:
            self.batch_sizes[len({r.uid for r in generation_responses})] += 1  # a verify pass gives a row several
        for r in generation_responses:
            if a := self.active.get(r.uid):
                events += self._token(a, r, now)
        return events

    def _segment_ended(self, a: Active, position: int) -> None:
        """Keep the state at a checkpoint or snapshot position the prefill just reached."""
        if position == a.checkpoint_at:
            layers, tokens = self.generator.extract_cache([a.uid])[a.uid]
            self.cache.store(list(tokens), layers, checkpoint=True)
            a.checkpoint_at = 0
        if position in a.snapshot_at:
            a.snapshots[position] = cache_kinds.snapshot_row(self.generator, a.uid)

    def _keep(self, a: Active, tokens: list[int], layers: list) -> None:
        """Store what a request leaves in the batch, with its snapshots, keeping its boundaries before others."""
        keep = {*a.prompt.boundaries, a.prompt.system_end, a.cached_tokens, len(a.prompt.tokens) - 1}
        self.cache.store(list(tokens), layers, snapshots=a.snapshots, keep=keep)

    def _token(self, a: Active, r: Any, now: float) -> list[Tagged]:
        a.first_token = a.first_token or now
        a.generated += (
            r.finish_reason != "stop"
        )  # the end-of-sequence token is not output, as OpenAI and Anthropic count
        a.reasoning += a.output.markup.state == MarkupParser.REASONING
        a.drafted += r.drafted
        a.reply.append(r.token)
        self.generation_tokens_total += 1
        reason: StopReason | Literal["error"] | None = None
        note: str | None = None
        out: list[Event]
        fault = a.fault[0] if a.fault and a.generated == a.fault[1] else None
        if fault in ("batch_error", "stall", "exit"):
            faults.act(fault)
        try:
            if fault:
                raise faults.InjectedFault(f"injected {fault}")
            if r.finish_reason == "stop":
                reason, out = "end", a.output.finish()
            else:
                out = a.output.add(r.token)
                if a.output.matched_stop is not None:
                    reason = "stop_sequence"
                elif a.guard.looping(r.token):
                    reason, note = "length", "repetition"
                elif r.finish_reason == "length":
                    reason = "length"
                if reason:
                    out += a.output.finish()
        except Exception as e:  # this request's own work failed; the batch goes on
            out, reason = [Error("internal", f"processing the output failed: {type(e).__name__}: {e}")], "error"
        tagged = [(a.rid, e) for e in out]
        if reason is None:
            return tagged
        if r.finish_reason is None:
            self._retire(a, still_batched=True)
        else:
            self._retire(a, still_batched=False)
            self._keep(a, r.all_tokens, r.prompt_cache)
        if reason != "error":
            if reason == "end" and a.output.markup.calls:
                reason = "tool_calls"
            tagged.append((a.rid, self._done(a, reason, note, now)))
        return tagged

    def _done(self, a: Active, reason: StopReason, note: str | None, now: float) -> Done:
        prefill = a.prefill_started or a.submitted
        timings = Timings(
            queued_s=prefill - a.submitted,
            prefill_s=(a.first_token or now) - prefill,
            decode_s=now - (a.first_token or now),
        )
        return Done(
            stop_reason=reason,
            usage=Usage(a.prompt_tokens, a.cached_tokens, a.generated, a.reasoning, a.drafted),
            timings=timings,
            stop_sequence=a.output.matched_stop,
            note=note,
        )

    def _retire(self, a: Active, still_batched: bool) -> None:
        """Take the request out; what it left in a running batch is kept in the prefix cache, its tokens in `turns`."""
        self.turns.remember(a.prompt.text, a.prompt.tokens, a.reply)
        if still_batched:
            kept = self.generator.remove([a.uid], return_prompt_caches=True)
            if a.uid in kept and a.prefill_started is not None:
                layers, tokens = kept[a.uid]
                self._keep(a, tokens, layers)
        del self.active[a.uid]
        del self.uid_of[a.rid]

    def fail_all(self, message: str) -> list[Tagged]:
        """End every request with an engine error and start from a fresh batch."""
        self.failures.append(message)
        events: list[Tagged] = [(a.rid, Error("engine", message)) for a in self.active.values()]
        self.active.clear()
        self.uid_of.clear()
        self.generator.close()
        self.generator = self._new_generator()
        mx.clear_cache()
        return events

    def stats(self) -> dict:
        running = sum(a.prefill_started is not None for a in self.active.values())
        cache = self.cache.stats
        counts = self.draft_counts
        return {
            "running": running,
            "waiting": len(self.active) - running,
            "batch_sizes": dict(self.batch_sizes),
            "prompt_tokens_total": self.prompt_tokens_total,
            "prefill_tokens_total": self.prefill_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "cache": {
                "entries": len(self.cache.entries),
                "ram_bytes": self.cache.nbytes,
                "ram_budget": self.cache.budget,
                "disk_bytes": self.cache.disk.nbytes if self.cache.disk else 0,
                "disk_budget": self.cache.disk.budget if self.cache.disk else 0,
                "lookups": cache.lookups,
                "hits": cache.hits,
                "disk_hits": cache.disk_hits,
                "disk_rejected": self.cache.disk.rejected if self.cache.disk else 0,
                "disk_write_errors": self.cache.disk.write_errors if self.cache.disk else 0,
                "disk_dropped": self.cache.disk.dropped if self.cache.disk else 0,
                "prompt_tokens": cache.prompt_tokens,
                "reused_tokens": cache.reused_tokens,
                "evictions": cache.evictions,
                "mode": self.cache_mode,
                "snapshots": self.cache.snapshot_count,
                "snapshot_bytes": self.cache.snapshot_nbytes,
                "snapshot_hits": cache.snapshot_hits,
            },
            "speculation": {
                "mode": self.speculation_mode,
                "drafts": counts.drafts,
                "draft_tokens": counts.draft_tokens,
                "accepted_tokens": counts.accepted_tokens,
            },
            "memory": {
                "active": mx.get_active_memory(),
                "peak": mx.get_peak_memory(),
                "running_kv": self.generator.prompt_cache_nbytes,
            },
        }
