"""The benchmark run: build the model, start the servers, measure each section, write the results."""

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from . import (
    SECTIONS,
    concurrency,
    dashboard,
    decode,
    edit,
    families,
    overhead,
    ranks,
    replay,
    report,
    servers,
    structured,
    ttft,
)
from .model import build, default_dir, describe
from .stats import progress


@dataclasses.dataclass(frozen=True)
class Plan:
    decode_rounds: int
    decode_tokens: int
    overhead_rounds: int
    ttft_sizes: dict[int, int]  # system prompt tokens: rounds
    streams: tuple[int, ...]
    concurrency_rounds: int
    concurrency_tokens: int
    replay_turns: int
    replay_tokens: int
    dashboard_rounds: int
    ranks_rounds: int
    families_turns: int
    families_tokens: int
    structured_rounds: int
    edit_tasks: int
    edit_rounds: int


QUICK = Plan(
    decode_rounds=3,
    decode_tokens=48,
    overhead_rounds=1,
    ttft_sizes={1024: 1},
    streams=(1, 4),
    concurrency_rounds=1,
    concurrency_tokens=32,
    replay_turns=3,
    replay_tokens=2500,
    dashboard_rounds=1,
    ranks_rounds=1,
    families_turns=3,
    families_tokens=3000,
    structured_rounds=2,
    edit_tasks=4,
    edit_rounds=1,
)
FULL = Plan(
    decode_rounds=10,
    decode_tokens=64,
    overhead_rounds=2,
    ttft_sizes={1024: 3, 4096: 2, 8192: 1},
    streams=(1, 2, 4, 8),
    concurrency_rounds=3,
    concurrency_tokens=64,
    replay_turns=10,
    replay_tokens=2500,
    dashboard_rounds=3,
    ranks_rounds=3,
    families_turns=6,
    families_tokens=6000,
    structured_rounds=6,
    edit_tasks=4,
    edit_rounds=3,
)
CONCURRENCY = 8  # both servers decode up to this many streams together


def plan_for(args) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(
            plan,
            decode_rounds=args.rounds,
            overhead_rounds=args.rounds,
            concurrency_rounds=args.rounds,
            dashboard_rounds=args.rounds,
            ranks_rounds=args.rounds,
            structured_rounds=args.rounds,
            edit_rounds=args.rounds,
            ttft_sizes={k: args.rounds for k in plan.ttft_sizes},
        )
    if args.decode_tokens:
        plan = dataclasses.replace(plan, decode_tokens=args.decode_tokens)
    if args.replay_tokens is not None:
        plan = dataclasses.replace(plan, replay_tokens=args.replay_tokens)
    return plan


async def run(args, blas: str) -> int:
    plan = plan_for(args)
    # the ranks comparison and the edit replay (it trains its model on first use) only when asked
    sections = args.only or tuple(s for s in SECTIONS if s not in ("ranks", "edit"))
    # a run of one of these alone writes beside the main results rather than over them
    alone = ("ranks", "families", "structured", "edit")
    subdir = sections[0] if len(sections) == 1 and sections[0] in alone else ""
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / ("quick" if args.quick else "") / subdir
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    meta = report.machine(blas)
    progress(f"BLAS: {blas}; load average {meta['load_start']}; sections: {', '.join(sections)}")

    model_dir = Path(args.model).expanduser() if args.model else build(default_dir())
    progress(f"model: {model_dir}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results = {
        "meta": meta,
        "model": describe(model_dir) if set(sections) - {"families", "edit"} else None,
        "plan": dataclasses.asdict(plan),
        "sections": list(sections),
        "mode": "quick" if args.quick else "full",
    }
    workdir = Path(tempfile.mkdtemp(prefix="mlx-tui-bench-"))
    cache_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 5  # our default RAM budget
    needs_servers = bool(set(sections) - {"ranks", "families", "structured", "edit"})
    ours = servers.ours(model_dir, workdir, CONCURRENCY) if needs_servers else None
    theirs = servers.mlx_lm(model_dir, workdir, CONCURRENCY, cache_bytes) if needs_servers else None
    tui = servers.ours(model_dir, workdir, CONCURRENCY, dashboard=True) if "dashboard" in sections else None
    every_token = (
        servers.ours(model_dir, workdir, CONCURRENCY, decode.EVERY_TOKEN.split(), variant=decode.EVERY_TOKEN)
        if "decode" in sections
        else None
    )
    running = [s for s in (ours, theirs, tui, every_token) if s]
    engine = None
    try:
        for s in running:
            s.start()
        results["processes"] = {"benchmark (in-process)": {"pid": os.getpid(), "blas": servers.blas_of(None)}}
        for s in running:
            s.wait_ready()
            pid = s.compute_pid()
            results["processes"][s.label] = {"pid": pid, "blas": servers.blas_of(pid), "log": str(s.log)}
        progress("ready; BLAS mapped: " + ", ".join(f"{k}: {v['blas']}" for k, v in results["processes"].items()))
        if ours:
            results["health"] = httpx.get(ours.url + "/health").json()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
            if "decode" in sections or "concurrency" in sections:
                from mlx_tui.engine.client import EngineClient

                engine = EngineClient(servers.engine_config(model_dir, max_concurrency=CONCURRENCY))
                await engine.start()
            if "decode" in sections:
                contestants = {
                    decode.BASELINE: decode.InProcess(model_dir),
                    decode.ENGINE: decode.EngineApi(engine),
                    decode.OURS_HTTP: decode.OpenAiHttp(client, ours.url, ours.model_name),
                    decode.MLX_HTTP: decode.OpenAiHttp(client, theirs.url, theirs.model_name),
                    decode.OURS_EVERY_TOKEN: decode.OpenAiHttp(client, every_token.url, every_token.model_name),
                }
                pids = {
                    decode.BASELINE: {"this process": None},
                    decode.ENGINE: {"worker": engine.pid, "front (this process)": None},
                    decode.OURS_HTTP: {**ours.pids(), "HTTP client (this process)": None},
                    decode.MLX_HTTP: {**theirs.pids(), "HTTP client (this process)": None},
                    decode.OURS_EVERY_TOKEN: {**every_token.pids(), "HTTP client (this process)": None},
                }
                results["decode"] = await decode.run(contestants, plan.decode_rounds, plan.decode_tokens, pids)
                del contestants
            if "overhead" in sections:
                results["overhead"] = overhead.run(model_dir, plan.overhead_rounds, plan.decode_tokens)
            if "ttft" in sections:
                results["ttft"] = await ttft.run(client, [ours, theirs], tokenizer, plan.ttft_sizes)
            if "concurrency" in sections:
                contestants = [ours, theirs, concurrency.EngineContestant(engine)]
                results["concurrency"] = await concurrency.run(
                    client, contestants, plan.streams, plan.concurrency_rounds, plan.concurrency_tokens
                )
            if engine is not None:
                await engine.stop()
                engine = None
            if "replay" in sections:
                results["replay"] = await replay.run(
                    client, [ours, theirs], tokenizer, plan.replay_turns, plan.replay_tokens, args.sample
                )
            if tui:
                results["dashboard"] = await dashboard.run(
                    client, ours, tui, plan.dashboard_rounds, plan.concurrency_tokens
                )
            if "families" in sections:
                results["families"] = await families.run(
                    client, workdir, CONCURRENCY, cache_bytes, plan.families_turns, plan.families_tokens, args.sample
                )
            if "ranks" in sections:
                results["ranks"] = await ranks.run(model_dir, tokenizer, plan.ranks_rounds, plan.decode_tokens, 1024)
            if "structured" in sections:
                results["structured"] = await structured.run(model_dir, plan.structured_rounds, plan.decode_tokens)
            if "edit" in sections:
                results["edit"] = await edit.run(
                    client, workdir, CONCURRENCY, cache_bytes, plan.edit_tasks, plan.edit_rounds
                )
    finally:
        if engine is not None:
            await engine.stop()
        for s in running:
            s.stop()
    results["meta"]["load_end"] = report.loadavg()
    results["meta"]["duration_s"] = round(time.time() - started, 1)
    results["meta"]["logs"] = str(workdir)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report.write(results, out)
    progress(f"wrote {out / 'README.md'} in {results['meta']['duration_s']:.0f} s (server logs in {workdir})")
    print((out / "README.md").read_text())
    return 0
