"""(1) Decode tokens/s of one stream: mlx-lm in-process, our engine's client API, our server and mlx_lm.server over
HTTP.

Each round runs every contestant once on the same prompt (the order rotates from round to
round), and each ratio is taken within a round. Decode speed is (tokens - 1) / (time of
the last text - time of the first text), on the consumer's clock: prefill is excluded and
every per-token cost between the model and the consumer (IPC, detokenising, SSE) is in.
"""

import os
import time

import httpx

from .clients import Timed, openai_stream
from .stats import median, progress, ratio, spread

PROMPT = [{"role": "user", "content": "Write a Python function that parses an INI file into a dict, with tests."}]
BASELINE = "mlx_lm.stream_generate (in-process)"
ENGINE = "mlx-tui engine API (client in-process, worker process)"
OURS_HTTP = "mlx-tui --serve (HTTP, OpenAI stream)"
MLX_HTTP = "mlx_lm.server (HTTP, OpenAI stream)"
# the same server sending every token as it comes (the default on a GPU): what pacing the stream saves on the CPU
EVERY_TOKEN = "--stream-interval 0"
OURS_EVERY_TOKEN = f"mlx-tui --serve {EVERY_TOKEN} (HTTP, OpenAI stream)"


class InProcess:
    """Plain `mlx_lm.stream_generate` in this process: the reference for what the hardware does."""

    def __init__(self, model_dir):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))

    async def __call__(self, messages, max_tokens: int) -> Timed:
        from mlx_lm import stream_generate

        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out = Timed()
        start = time.perf_counter()
        for r in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens):
            now = time.perf_counter() - start
            out.ttft = out.ttft if out.ttft is not None else now
            out.last = now
            out.text += r.text
            out.generated = r.generation_tokens
            out.prompt_tokens = r.prompt_tokens
        out.total = time.perf_counter() - start
        return out


class EngineApi:
    """Our engine through its async client, as the dashboard's chat pane and the API use it.

    `fields` go into every GenerationRequest (structured.py adds a constraint and tools).
    """

    def __init__(self, engine, **fields):
        self.engine = engine
        self.fields = fields

    async def __call__(self, messages, max_tokens: int) -> Timed:
        from mlx_tui.engine.events import Done, Error, ReasoningDelta, Started, TextDelta
        from mlx_tui.engine.request import GenerationRequest

        out = Timed()
        start = time.perf_counter()
        async for ev in self.engine.generate(
            GenerationRequest(messages=messages, max_tokens=max_tokens, source="bench", **self.fields)
        ):
            if isinstance(ev, (TextDelta, ReasoningDelta)) and ev.text:
                now = time.perf_counter() - start
                out.ttft = out.ttft if out.ttft is not None else now
                out.last = now
                out.text += ev.text
            elif isinstance(ev, Started):
                out.prompt_tokens, out.cached_tokens = ev.prompt_tokens, ev.cached_tokens
            elif isinstance(ev, Done):
                out.generated = ev.usage.generated_tokens
            elif isinstance(ev, Error):
                out.error = f"{ev.kind}: {ev.message}"
        out.total = time.perf_counter() - start
        return out


class OpenAiHttp:
    def __init__(self, client: httpx.AsyncClient, url: str, model: str):
        self.client, self.url, self.model = client, url, model

    async def __call__(self, messages, max_tokens: int) -> Timed:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        return await openai_stream(self.client, self.url, body)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    try:
        fields = open(f"/proc/{pid or 'self'}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(contestants: dict, rounds: int, max_tokens: int, pids: dict[str, dict[str, int | None]]) -> dict:
    """Per contestant the decode tokens/s of each round, and per-round ratios against the baseline.

    `pids` names, per contestant, the processes whose CPU time its generation costs (None: this one);
    the CPU milliseconds per generated token of each are reported beside the speed, a measure that
    other load on the machine disturbs far less than the wall clock.
    """
    names = list(contestants)
    progress(f"decode: warm-up ({len(names)} contestants)")
    for name in names:
        r = await contestants[name](PROMPT, 8)
        if r.error:
            raise RuntimeError(f"{name}: {r.error}")
    tps: dict[str, list] = {n: [] for n in names}
    cpu: dict[str, dict[str, list]] = {n: {p: [] for p in pids.get(n, {})} for n in names}
    texts: dict[str, str] = {}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            before = {p: cpu_seconds(pid) for p, pid in pids.get(name, {}).items()}
            r = await contestants[name](PROMPT, max_tokens)
            for p, pid in pids.get(name, {}).items():
                cpu[name][p].append(1000 * (cpu_seconds(pid) - before[p]) / max(r.generated, 1))
            if r.error or r.generated != max_tokens:
                progress(f"decode: {name}: {r.error or f'{r.generated} tokens, expected {max_tokens}'}")
            tps[name].append(r.decode_tps)
            texts.setdefault(name, r.text)
        progress(
            f"decode: round {i + 1}/{rounds}: "
            + ", ".join(f"{n.split(' (')[0]} {t[-1]:.1f}" for n, t in tps.items() if t[-1] is not None)
        )
    base = tps[names[0]]
    ratios = {n: [ratio(a, b) for a, b in zip(tps[n], base, strict=False)] for n in names[1:]}
    if OURS_HTTP in tps and MLX_HTTP in tps:
        ratios[f"{OURS_HTTP} / {MLX_HTTP}"] = [ratio(a, b) for a, b in zip(tps[OURS_HTTP], tps[MLX_HTTP], strict=False)]
    if OURS_HTTP in tps and OURS_EVERY_TOKEN in tps:
        ratios[f"{OURS_HTTP} / {OURS_EVERY_TOKEN}"] = [
            ratio(a, b) for a, b in zip(tps[OURS_HTTP], tps[OURS_EVERY_TOKEN], strict=False)
        ]
    same = {n: texts[n] == texts[names[0]] for n in names[1:]}
    return {
        "max_tokens": max_tokens,
        "rounds": rounds,
        "baseline": names[0],
        "tps": tps,
        "median_tps": {n: median(v) for n, v in tps.items()},
        "ratios": ratios,
        "median_ratio": {n: median(v) for n, v in ratios.items()},
        "ratio_range": {n: spread(v) for n, v in ratios.items()},
        "same_text_as_baseline": same,
        "cpu_ms_per_token": {n: {p: median(v) for p, v in c.items()} for n, c in cpu.items()},
    }
