"""(9) Edit replay on a model that copies: mlx-tui with speculation (auto), without (off), and mlx_lm.server.

Each task is a file and a one-line change; the reply is the whole edited file, so nearly
every token is in the prompt already, the case prompt-lookup speculative decoding is for.
The tasks go through the OpenAI streaming API, greedy, one at a time; for every task each
server runs once, in an order that rotates from task to task, and each ratio is taken within
one task. A chat sub-run asks plain questions whose answers share no text with the prompt,
where speculation has nothing to draft and must cost nothing. The speculation counters come
from mlx-tui's `/metrics` (absent before the engine has them: "n/a"); a server without
`--speculate` runs only the default. In this process, what one forward pass over 1 to 16
tokens costs against a pass over one, with a KV cache of an edit prompt.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import copy_model, servers
from .clients import openai_stream
from .edit_tasks import Task, replayed_chats, replayed_edits
from .stats import median, progress, ratio, spread

AUTO, OFF, THEIRS = "mlx-tui (default)", "mlx-tui --speculate off", "mlx_lm.server"
COUNTERS = {
    "drafts": "mlx_tui:spec_decode_num_drafts_total",
    "draft_tokens": "mlx_tui:spec_decode_num_draft_tokens_total",
    "accepted": "mlx_tui:spec_decode_num_accepted_tokens_total",
}
PASS_TOKENS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
PASS_PROMPT = 300


def counters(text: str) -> dict[str, float | None]:
    """The speculation counters in a Prometheus text page, summed over labels (None: not exposed)."""
    out: dict[str, float | None] = dict.fromkeys(COUNTERS)
    for line in text.splitlines():
        for key, name in COUNTERS.items():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[key] = (out[key] or 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def read_counters(client, server) -> dict[str, float | None]:
    return counters((await client.get(server.url + "/metrics")).text)


def speculation(before: dict, after: dict) -> dict:
    """Acceptance rate (accepted / drafted tokens) and tokens per verify pass (1 + accepted / drafts)."""
    if any(v is None for v in after.values()):
        return {"drafts": None, "draft_tokens": None, "accepted": None, "acceptance": None, "tokens_per_pass": None}
    d = {k: after[k] - (before[k] or 0.0) for k in COUNTERS}  # a labelled counter appears at its first count
    return {
        **d,
        "acceptance": d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None,
        "tokens_per_pass": 1 + d["accepted"] / d["drafts"] if d["drafts"] else None,
    }


async def replay(client, contestants: dict, tasks: list[Task], rounds: int, max_tokens: int, label: str) -> dict:
    """Every task on every server, rotating the order; per-request rows and per-task ratios."""
    names = list(contestants)
    ours = [n for n in names if n != THEIRS]
    before = {n: await read_counters(client, contestants[n]) for n in ours}
    rows = []
    i = 0
    for r in range(rounds):
        for t, task in enumerate(tasks):
            order = names[i % len(names) :] + names[: i % len(names)]
            i += 1
            for name in order:
                server = contestants[name]
                body = {"model": server.model_name, "messages": task.messages(), "max_tokens": max_tokens}
                out = await openai_stream(client, server.url, {**body, "temperature": 0.0})
                if out.error:
                    raise RuntimeError(f"{label}: {name}, task {t}: {out.error}")
                rows.append(
                    {
                        "server": name,
                        "round": r,
                        "task": t,
                        "kind": task.kind,
                        "prompt_tokens": out.prompt_tokens,
                        "generated": out.generated,
                        "ttft_s": out.ttft,
                        "decode_tps": out.decode_tps,
                        "e2e_tps": out.generated / out.total if out.total else None,
                        "exact": same(out.text, task.edited) if task.kind != "chat" else None,
                        "text": out.text,
                    }
                )
            progress(
                f"{label}: round {r + 1}/{rounds}, task {t + 1}/{len(tasks)}: "
                + ", ".join(f"{x['server']} {x['decode_tps'] or 0:.0f} tok/s" for x in rows[-len(names) :])
            )
    after = {n: await read_counters(client, contestants[n]) for n in ours}
    return summarize(rows, names, {n: speculation(before[n], after[n]) for n in ours})


def same(a: str, b: str) -> bool:
    """Equal but for whitespace at the end (mlx-tui drops a reply's last newline; mlx_lm.server keeps it)."""
    return a.rstrip() == b.rstrip()


def summarize(rows: list[dict], names: list[str], spec: dict) -> dict:
    by = {(x["round"], x["task"], x["server"]): x for x in rows}
    keys = sorted({(x["round"], x["task"]) for x in rows})
    pairs = [(a, b) for a, b in ((AUTO, THEIRS), (OFF, THEIRS), (AUTO, OFF)) if a in names and b in names]
    ratios = {
        f"{a} / {b}": [ratio(by[k + (a,)]["decode_tps"], by[k + (b,)]["decode_tps"]) for k in keys] for a, b in pairs
    }
    e2e = {f"{a} / {b}": [ratio(by[k + (a,)]["e2e_tps"], by[k + (b,)]["e2e_tps"]) for k in keys] for a, b in pairs}
    reference = THEIRS if THEIRS in names else names[0]
    servers_out = {}
    for n in names:
        mine = [x for x in rows if x["server"] == n]
        exact = [x["exact"] for x in mine if x["exact"] is not None]
        servers_out[n] = {
            "decode_tps": median(x["decode_tps"] for x in mine),
            "e2e_tps": median(x["e2e_tps"] for x in mine),
            "ttft_s": median(x["ttft_s"] for x in mine),
            "generated": median(x["generated"] for x in mine),
            "prompt_tokens": median(x["prompt_tokens"] for x in mine),
            "exact_match": sum(exact) / len(exact) if exact else None,
            "same_text_as_reference": sum(same(x["text"], by[(x["round"], x["task"], reference)]["text"]) for x in mine)
            / len(mine),
            "speculation": spec.get(n),
        }
    return {
        "servers": servers_out,
        "reference": reference,
        "median_ratio": {k: median(v) for k, v in ratios.items()},
        "ratio_range": {k: spread(v) for k, v in ratios.items()},
        "median_e2e_ratio": {k: median(v) for k, v in e2e.items()},
        "rows": [{k: v for k, v in x.items() if k != "text"} for x in rows],
    }


def pass_cost_one_thread(model_dir: Path, rounds: int) -> dict:
    """`pass_cost` in a child process whose OpenBLAS runs one thread (no thread wake-ups in a pass)."""
    code = (
        "import json, os; from benchmarks.edit import pass_cost; "
        f"print(json.dumps(pass_cost({str(model_dir)!r}, {rounds})), flush=True); os._exit(0)"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "ms": {int(k): v for k, v in result["ms"].items()}}


def pass_cost(model_dir: Path, rounds: int) -> dict:
    """ms of one forward pass over k tokens with a KV cache of an edit prompt, against k = 1."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, tokenizer = load(str(model_dir))
    task = replayed_edits(1)[0]
    prompt = tokenizer.apply_chat_template(task.messages(), add_generation_prompt=True)[:PASS_PROMPT]
    reply = tokenizer.encode(task.edited, add_special_tokens=False)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    times: dict[int, list[float]] = {k: [] for k in PASS_TOKENS}
    for _ in range(max(rounds, 1) * 20):
        for k in PASS_TOKENS:
            x = mx.array(reply[:k])[None]
            start = time.perf_counter()
            mx.eval(model(x, cache=cache))
            times[k].append(1000 * (time.perf_counter() - start))
            trim_prompt_cache(cache, k)
    return {"prompt_tokens": len(prompt), "ms": {k: median(v) for k, v in times.items()}}


async def run(client, workdir: Path, concurrency: int, cache_bytes: int, n_tasks: int, rounds: int) -> dict:
    model_dir = copy_model.ensure()
    progress(f"edit: copy model {model_dir}")
    contestants = {
        AUTO: servers.ours(model_dir, workdir / "edit-auto", concurrency, speculate="auto"),
        OFF: servers.ours(model_dir, workdir / "edit-off", concurrency, speculate="off"),
    }
    contestants[THEIRS] = servers.mlx_lm(model_dir, workdir / "edit-mlx-lm", concurrency, cache_bytes)
    for name, s in contestants.items():
        s.label = name
    try:
        for s in contestants.values():
            s.start()
        for s in contestants.values():
            s.wait_ready()
        warm_up = replayed_edits(n_tasks + 1)[-1]  # a task that is not measured
        for s in contestants.values():
            body = {"model": s.model_name, "messages": warm_up.messages(), "max_tokens": 512, "temperature": 0.0}
            await openai_stream(client, s.url, body)
        edit = await replay(client, contestants, replayed_edits(n_tasks), rounds, 512, "edit")
        chat = await replay(client, contestants, replayed_chats(n_tasks), rounds, 256, "edit (chat)")
    finally:
        for s in contestants.values():
            s.stop()
    progress("edit: forward-pass cost over k tokens")
    return {
        "model": copy_model.describe(model_dir),
        "tasks": n_tasks,
        "rounds": rounds,
        "edit": edit,
        "chat": chat,
        "pass_cost": pass_cost(model_dir, rounds),
        "pass_cost_one_thread": pass_cost_one_thread(model_dir, rounds),
    }
