"""The results as a markdown table and PNG charts, with the machine, model, dtype, BLAS and versions."""

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .stats import fmt

OURS, THEIRS, ENGINE = "mlx-tui --serve", "mlx_lm.server", "mlx-tui engine API"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return sha.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "?"


def machine(blas: str) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, {mem:.0f} GiB",
        "python": platform.python_version(),
        "versions": {n: version(n) for n in ("mlx", "mlx-lm", "mlx-tui", "transformers", "uvicorn", "starlette")},
        "commit": git_commit(),
        "blas": blas,
        "load_start": loadavg(),
    }


def target(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def write(results: dict, out: Path):
    body, targets = [], []
    if d := results.get("decode"):
        body += decode_table(d, targets)
    if o := results.get("overhead"):
        body += overhead_table(o)
    if t := results.get("ttft"):
        body += ttft_table(t, targets)
    if c := results.get("concurrency"):
        body += concurrency_table(c, targets)
    if r := results.get("replay"):
        body += replay_table(r, targets)
    if db := results.get("dashboard"):
        body += dashboard_table(db, targets)
    if fam := results.get("families"):
        body += families_tables(fam, targets)
    if rk := results.get("ranks"):
        body += ranks_table(rk)
    if st := results.get("structured"):
        body += structured_table(st, targets)
    if ed := results.get("edit"):
        body += edit_tables(ed, targets)
    summary = ["## Targets", ""]
    if results.get("mode") == "quick":
        summary += [
            "*Quick run: a smoke check with one to three rounds per measurement; on a shared machine "
            "that is too few to judge a target. Use the full run for that.*",
            "",
        ]
    summary += ["| target | measured | |", "|---|---|---|"]
    summary += [f"| {name} | {value} | {target(ok)} |" for name, value, ok in targets] + [""]
    charts = ["## Charts", ""] + [f"![{c.stem}]({c.name})" for c in draw(results, out)] + [""]
    (out / "README.md").write_text("\n".join(header(results) + summary + body + charts))


def header(results: dict) -> list[str]:
    m, model = results["meta"], results["model"]
    procs = results.get("processes", {})
    blas = ", ".join(f"{k}: {v.get('blas') or '?'}" for k, v in procs.items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return [
        "# mlx-tui benchmark results",
        "",
        f"- date: {m['date']} ({m.get('duration_s', '?')} s); commit {m['commit']}",
        f"- machine: {m['machine']}; load average {m['load_start']} at start, {m.get('load_end', '?')} at end "
        "(shared machine: numbers are medians of interleaved rounds, each ratio from one round)",
        f"- model: random {model.get('type', 'llama')}, {model['params_m']}M parameters, {model['layers']} layers, "
        f"hidden {model['hidden']}, vocab {model['vocab']}, {model['dtype']} (`{model['path']}`)"
        if model
        else "- models: as each section says",
        f"- BLAS: {m['blas']}; mapped per process: {blas}",
        f"- python {m['python']}; {versions}",
        f"- plan: {results['plan']}",
        "",
    ]


def decode_table(d: dict, targets: list) -> list[str]:
    lines = [
        f"## Decode, one stream ({d['max_tokens']} tokens, {d['rounds']} rounds)",
        "",
        "| | tokens/s (median) | ratio to in-process mlx-lm (median of rounds) | range | same text | "
        "CPU ms per token, by process |",
        "|---|---|---|---|---|---|",
    ]
    for name, tps in d["median_tps"].items():
        r = d["median_ratio"].get(name)
        rng = d["ratio_range"].get(name)
        same = d["same_text_as_baseline"].get(name)
        cpu = d.get("cpu_ms_per_token", {}).get(name, {})
        cpu_text = ", ".join(f"{p} {fmt(v, 1)}" for p, v in cpu.items())
        lines.append(
            f"| {name} | {fmt(tps, 1)} | {fmt(r, 3) if name != d['baseline'] else '1'} | "
            f"{f'{rng[0]:.3f}–{rng[1]:.3f}' if rng else ''} | {'' if same is None else same} | {cpu_text} |"
        )
    for name, r in d["median_ratio"].items():
        if "/" in name:
            rng = d["ratio_range"][name]
            lines.append(f"| {name} | | {fmt(r, 3)} | {f'{rng[0]:.3f}–{rng[1]:.3f}' if rng else ''} | | |")
    lines.append("")
    from .decode import ENGINE, MLX_HTTP, OURS_HTTP

    for name, goal in ((ENGINE, 0.97), (OURS_HTTP, 0.97)):
        r = d["median_ratio"].get(name)
        targets.append(
            (
                f"decode: {name.split(' (')[0]} ≥ {goal} of in-process mlx-lm",
                fmt(r, 3),
                None if r is None else r >= goal,
            )
        )
    r = d["median_ratio"].get(f"{OURS_HTTP} / {MLX_HTTP}")
    targets.append(("decode over HTTP: ours ≥ 1.0 of mlx_lm.server", fmt(r, 3), None if r is None else r >= 1.0))
    return lines


def overhead_table(o: dict) -> list[str]:
    ms = o["ms_per_token"]
    lines = [
        f"## Where a token's time goes (in one process, {o['tokens']} tokens, {o['rounds']} rounds)",
        "",
        "| loop | ms per token (median) | speed relative to stream_generate |",
        "|---|---|---|",
        f"| mlx_lm.stream_generate | {fmt(ms['stream_generate'])} | 1 |",
        f"| mlx_lm BatchGenerator, bare | {fmt(ms['BatchGenerator'])} | "
        f"{fmt(o['ratio_to_stream_generate']['BatchGenerator'], 3)} |",
        f"| our Scheduler.step (BatchGenerator + our per-token work) | {fmt(ms['Scheduler.step'])} | "
        f"{fmt(o['ratio_to_stream_generate']['Scheduler.step'], 3)} |",
        f"| mlx_lm BatchGenerator, bare, 4 sequences (per token of all 4) | {fmt(ms['BatchGenerator x4'])} | "
        f"{fmt(o['ratio_to_stream_generate']['BatchGenerator x4'], 3)} |",
        "",
        f"Four sequences in one bare BatchGenerator decode {fmt(o['batch4_scaling'], 2)}x the tokens/s of one: "
        "the ceiling for any server built on it, ours and mlx_lm.server alike.",
        "",
        f"Inside Scheduler.step: BatchGenerator.next() {fmt(o['scheduler_next_ms'])} ms, our work (events, "
        f"detokenising, stop/markup parsing, cache) {fmt(o['scheduler_ours_ms'], 3)} ms per token (wall clock, "
        "inflated by other load on the machine).",
        "",
    ]
    if cpu := o.get("cpu_ms_per_token"):
        lines += [
            "| CPU ms per generated token | model step (every thread) | our host work (the worker's thread) | "
            "pickling the step's events |",
            "|---|---|---|---|",
        ]
        for batch, c in cpu.items():
            lines.append(f"| {batch} | {fmt(c['model step'])} | {fmt(c['host work'], 3)} | {fmt(c['pickling'], 3)} |")
        lines.append("")
    return lines


def dashboard_table(db: dict, targets: list) -> list[str]:
    serve, tui = db["serve"], db["tui"]
    lines = [
        f"## Dashboard cost ({db['max_tokens']} tokens per stream)",
        "",
        f"| streams | {serve} tokens/s | {tui} tokens/s | ratio (median of rounds) | front-process CPU ms per "
        f"token, serve / dashboard |",
        "|---|---|---|---|---|",
    ]
    for row in db["summary"]:
        a, b = row[serve], row[tui]
        lines.append(
            f"| {row['streams']} | {fmt(a['tps'], 1)} | {fmt(b['tps'], 1)} | {fmt(row['ratio'], 3)} | "
            f"{fmt(a['cpu_ms_per_token'].get('front'), 2)} / {fmt(b['cpu_ms_per_token'].get('front'), 2)} |"
        )
    lines += [
        "",
        f"The dashboard drew {db['screen_bytes'] / 1e6:.1f} MB of terminal output in a 120x40 "
        "pseudo-terminal during the run.",
        "",
    ]
    for row in db["summary"]:
        r = row["ratio"]
        targets.append(
            (
                f"dashboard costs ≤ 3% ({row['streams']} stream{'s' if row['streams'] > 1 else ''})",
                fmt(r, 3),
                None if r is None else r >= 0.97,
            )
        )
    return lines


def ranks_table(rk: dict) -> list[str]:
    one, two = rk["summary"]["1"], rk["summary"]["2"]
    return [
        f"## One worker vs 2 ranks on this machine ({rk['rounds']} rounds; the cost of the group, not a speed-up)",
        "",
        "| ranks | decode tokens/s (median) | TTFT s, uncached prompt (median) | prompt tokens |",
        "|---|---|---|---|",
        f"| 1 | {fmt(one['decode_tps'], 1)} | {fmt(one['ttft_s'])} | {fmt(one['prompt_tokens'], 0)} |",
        f"| 2 (tensor parallel, ring over loopback) | {fmt(two['decode_tps'], 1)} | {fmt(two['ttft_s'])} | "
        f"{fmt(two['prompt_tokens'], 0)} |",
        "",
        f"2 ranks / 1: decode {fmt(rk['decode_ratio'], 3)}×, TTFT {fmt(rk['ttft_ratio'], 3)}×; "
        f"same greedy text: {rk['same_text']}.",
        "",
    ]


def structured_table(st: dict, targets: list) -> list[str]:
    rows = [
        f"## Decode under a JSON schema vs free ({st['rounds']} interleaved rounds,"
        f" {st['max_tokens']} tokens a stream)",
        "",
        "| vocabulary | constrained / free | streams | free tokens/s | constrained tokens/s | ratio (median of rounds) "
        "| range | worker CPU ms/token, free / constrained | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for vocab, m in st["models"].items():
        for key, r in m["median_ratio"].items():
            bound, free = m["pairs"][key]
            low, high = m["ratio_range"][key] or (None, None)
            cpu, tps = m["median_cpu_ms_per_token"], m["median_tps"]
            rows.append(
                f"| {int(vocab):,} | {bound.split(' ')[0]} / {free.split(' ')[0]} | {bound.split(' x')[1]} | "
                f"{fmt(tps[free], 1)} | {fmt(tps[bound], 1)} | {fmt(r, 3)} | {fmt(low, 2)}–{fmt(high, 2)} | "
                f"{fmt(cpu[free], 1)} / {fmt(cpu[bound], 1)} | {fmt(m['median_cpu_ratio'][key], 3)} |"
            )
            if bound.startswith("json_schema"):
                targets.append(
                    (
                        f"json_schema decode ≥ 0.95× free, vocab {int(vocab):,}, {key} stream(s)",
                        fmt(r, 3),
                        None if r is None else r >= 0.95,
                    )
                )
    return rows + [""]


def edit_tables(ed: dict, targets: list) -> list[str]:
    """The edit replay and the chat sub-run per server, the speculation counters, and the cost of a wider pass."""
    from .edit import AUTO, OFF, THEIRS

    m, ev = ed["model"], ed["model"]["evaluation"]
    lines = [
        f"## Edit replay on a copy-trained model ({ed['tasks']} tasks, {ed['rounds']} round(s), streamed, greedy)",
        "",
        f"Model: llama, {m['params_m']}M parameters, {m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']}, "
        f"float32, trained {ev['steps']} steps in {ev['train_s']} s (`{m['path']}`) to memorise the replayed tasks; "
        f"exact match {ev['exact_match']:.0%} of {ev['tasks']} "
        f"({', '.join(f'{k} {v}' for k, v in ev['by_kind'].items())}).",
        "",
    ]
    for part, title in (("edit", "Edit tasks (reply: the whole edited file)"), ("chat", "Chat (no text to copy)")):
        r = ed[part]
        lines += [
            f"### {title}",
            "",
            "| server | decode tokens/s | end-to-end tokens/s | TTFT s | tokens generated | prompt tokens "
            f"| exact match | same text as {r['reference']} | acceptance | tokens per verify pass |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in r["servers"].items():
            spec = row["speculation"] or {}
            exact = row["exact_match"]
            lines.append(
                f"| {name} | {fmt(row['decode_tps'], 1)} | {fmt(row['e2e_tps'], 1)} | {fmt(row['ttft_s'])} | "
                f"{fmt(row['generated'], 0)} | "
                f"{fmt(row['prompt_tokens'], 0)} | {'' if exact is None else f'{exact:.0%}'} | "
                f"{row['same_text_as_reference']:.0%} | "
                f"{'n/a' if spec.get('acceptance') is None else fmt(100 * spec['acceptance'], 0, '%')} | "
                f"{'n/a' if spec.get('tokens_per_pass') is None else fmt(spec['tokens_per_pass'])} |"
            )
        lines += [
            "",
            "| ratio (median of per-task ratios) | decode tokens/s | range | end to end (tokens / request time) |",
            "|---|---|---|---|",
        ]
        for key, value in r["median_ratio"].items():
            rng = r["ratio_range"][key]
            lines.append(
                f"| {key} | {fmt(value, 3)} | {f'{rng[0]:.3f}–{rng[1]:.3f}' if rng else ''} | "
                f"{fmt(r['median_e2e_ratio'][key], 3)} |"
            )
        lines.append("")
    # end to end: under load a server's chunks can arrive in one burst, which makes decode tokens/s meaningless
    edit_ratio = ed["edit"]["median_e2e_ratio"].get(f"{AUTO} / {THEIRS}")
    targets.append(
        (
            "edit: mlx-tui (default) ≥ 2x mlx_lm.server, end to end",
            fmt(edit_ratio, 3),
            None if edit_ratio is None else edit_ratio >= 2,
        )
    )
    chat_ratio = ed["chat"]["median_e2e_ratio"].get(f"{AUTO} / {OFF}")
    targets.append(
        (
            "chat: speculation auto ≥ 0.97x off, end to end",
            fmt(chat_ratio, 3),
            None if chat_ratio is None else chat_ratio >= 0.97,
        )
    )
    pc, one = ed["pass_cost"], ed["pass_cost_one_thread"]
    lines += [
        f"### One forward pass over k tokens (in-process, KV cache of a {pc['prompt_tokens']}-token edit prompt)",
        "",
        "| k | ms per pass, BLAS threads as the servers | relative to k = 1 | ms per pass, 1 BLAS thread | relative |",
        "|---|---|---|---|---|",
    ]
    for k, ms in pc["ms"].items():
        lines.append(
            f"| {k} | {fmt(ms, 2)} | {fmt(ms / pc['ms'][1], 2)} | {fmt(one['ms'][k], 2)} | "
            f"{fmt(one['ms'][k] / one['ms'][1], 2)} |"
        )
    return lines + [""]


def ttft_table(t: dict, targets: list) -> list[str]:
    lines = [
        "## Time to first token, cold vs warm system prompt",
        "",
        "| server | system prompt | prompt tokens | cold TTFT s | warm TTFT s | warm/cold | warm cached tokens"
        " | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in t["summary"]:
        lines.append(
            f"| {row['server']} | {row['size']} | {fmt(row['prompt_tokens'], 0)} | {fmt(row['cold_s'])} | "
            f"{fmt(row['warm_s'])} | {fmt(row['ratio'], 3)} | {fmt(row['warm_cached'], 0)} | {row['rounds']} |"
        )
    lines.append("")
    ours = {r["size"]: r for r in t["summary"] if r["server"] == OURS}
    size = 4096 if 4096 in ours else max(ours) if ours else None
    if size:
        r = ours[size]["ratio"]
        targets.append((f"TTFT warm/cold ≤ 0.10 at {size} tokens (ours)", fmt(r, 3), None if r is None else r <= 0.10))
    return lines


def concurrency_table(c: dict, targets: list) -> list[str]:
    lines = [
        f"## Aggregate decode, concurrent streams ({c['max_tokens']} tokens each)",
        "",
        "| server | streams | aggregate tokens/s | per-stream tokens/s after the first | median TTFT s "
        "| scaling vs 1 stream | ours / mlx_lm.server | CPU ms per token, by process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in c["summary"]:
        cpu = ", ".join(f"{p} {fmt(v, 1)}" for p, v in (row.get("cpu_ms_per_token") or {}).items())
        lines.append(
            f"| {row['server']} | {row['streams']} | {fmt(row['tps'], 1)} | {fmt(row['per_stream_tps'], 1)} | "
            f"{fmt(row.get('ttft_s'))} | {fmt(row['scaling'], 2)}x | {fmt(row.get('vs_other'), 3)} | {cpu} |"
        )
    lines.append("")
    ours = {r["streams"]: r for r in c["summary"] if r["server"] == OURS}
    if 4 in ours:
        s = ours[4]["scaling"]
        targets.append(("4 streams ≥ 2.5x one (ours)", fmt(s, 2) + "x", None if s is None else s >= 2.5))
        v = ours[4].get("vs_other")
        targets.append(("4 streams: ours ≥ mlx_lm.server", fmt(v, 3), None if v is None else v >= 1.0))
    return lines


def replay_table(r: dict, targets: list) -> list[str]:
    servers = list(dict.fromkeys(row["server"] for row in r["rows"]))
    lines = [
        f"## Claude-Code-shaped replay ({max(row['turn'] for row in r['rows'])} turns)",
        "",
        f"Source: {r['source']} ({r['captured_tokens']} prompt tokens as captured"
        + (f", scaled to ~{r['scaled_to']}" if r["scaled_to"] else "")
        + f"; {r['tools']} tools). "
        "Billing header changes every request; a side request runs between turns.",
        "",
        "Cells: prompt tokens / tokens from cache (share of the prompt; share of the previous turn's prompt) / TTFT s.",
        "",
        "| turn | " + " | ".join(servers) + " |",
        "|---|" + "---|" * len(servers),
    ]
    by = {(row["server"], row["turn"]): row for row in r["rows"]}
    turns = sorted({row["turn"] for row in r["rows"]})
    for turn in turns:
        cells = []
        for s in servers:
            row = by.get((s, turn))
            prev = f"; {row['of_previous']:.0%}" if row and row.get("of_previous") is not None else ""
            cells.append(
                ""
                if not row
                else f"{row['prompt_tokens']} / {row['cached_tokens']} "
                f"({(row['cached_share'] or 0):.0%}{prev}) / {fmt(row['ttft_s'])}"
            )
        lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    lines.append("")
    sides = r.get("sides") or []
    if sides:
        lines.append(
            "Side requests: "
            + "; ".join(
                f"{s}: median TTFT {fmt(_median([x['ttft_s'] for x in sides if x['server'] == s]))} s" for s in servers
            )
            + "."
        )
        lines.append("")
    later = [row["cached_share"] or 0 for row in r["rows"] if row["server"] == OURS and row["turn"] >= 2]
    if later:
        targets.append(
            (
                "replay: ≥ 90% of prompt tokens from cache from turn 2 on (ours, worst turn)",
                f"{min(later):.0%}",
                min(later) >= 0.90,
            )
        )
    return lines


def families_tables(families: dict, targets: list) -> list[str]:
    """The replay on each model family whose cache cannot be cut anywhere, with its own targets."""
    lines = []
    for family, r in families.items():
        table = replay_table(r, [])
        table[0] = f"## Replay on a {family}-type model ({r['model']['params_m']}M; prefix: {r['prefix_cache']})"
        lines += table
        ours = {row["turn"]: row for row in r["rows"] if row["server"] == OURS}
        later = [row["cached_share"] or 0 for turn, row in ours.items() if turn >= 2]
        if later:
            targets.append(
                (
                    f"{family}: ≥ 90% of prompt tokens from cache from turn 2 on (ours, worst turn)",
                    f"{min(later):.0%}",
                    min(later) >= 0.90,
                )
            )
        if 1 in ours and 2 in ours and ours[1]["ttft_s"]:
            ratio = ours[2]["ttft_s"] / ours[1]["ttft_s"]
            targets.append((f"{family}: turn-2 TTFT ≤ 0.10x turn 1's (ours)", fmt(ratio, 3), ratio <= 0.10))
    return lines


def _median(values):
    from .stats import median

    return median(values)


def draw(results: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    charts = []
    m = results["model"]
    blas_machine = f"{results['meta']['blas'].split(' (')[0]}, {results['meta']['machine']}"
    subtitle = f"{m['params_m']}M float32 llama, {blas_machine}" if m else blas_machine

    if d := results.get("decode"):
        fig, ax = plt.subplots(figsize=(9, 3.8))
        names = list(d["median_tps"])
        values = [d["median_tps"][n] or 0 for n in names]
        lows = [max(0, v - min(x for x in d["tps"][n] if x is not None)) for n, v in zip(names, values, strict=False)]
        highs = [max(0, max(x for x in d["tps"][n] if x is not None) - v) for n, v in zip(names, values, strict=False)]
        ax.barh(range(len(names)), values, xerr=[lows, highs], color=["#888", "#2a7", "#2a7", "#c63"][: len(names)])
        ax.set_yticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s, one stream (median, min–max)")
        ax.set_title(f"Decode speed\n{subtitle}", fontsize=9)
        charts.append(save(fig, out / "decode.png"))

    if t := results.get("ttft"):
        fig, ax = plt.subplots(figsize=(8, 4))
        rows = t["summary"]
        labels = [f"{r['server']}\n{r['size']} tok" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["cold_s"] or 0 for r in rows], 0.4, label="cold", color="#c63")
        ax.bar([i + 0.2 for i in x], [r["warm_s"] or 0 for r in rows], 0.4, label="warm", color="#2a7")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time to first token, s (log)")
        ax.legend()
        ax.set_title(f"TTFT, cold vs warm system prompt\n{subtitle}", fontsize=9)
        charts.append(save(fig, out / "ttft.png"))

    if c := results.get("concurrency"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for server, style, color in ((OURS, "o-", "#2a7"), (THEIRS, "o-", "#c63"), (ENGINE, "o--", "#999")):
            rows = [r for r in c["summary"] if r["server"] == server]
            if rows:
                ax.plot([r["streams"] for r in rows], [r["tps"] for r in rows], style, label=server, color=color)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.set_title(f"Aggregate decode throughput\n{subtitle}", fontsize=9)
        charts.append(save(fig, out / "concurrency.png"))

    if r := results.get("replay"):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        for i, (server, color) in enumerate(((OURS, "#2a7"), (THEIRS, "#c63"))):
            rows = [x for x in r["rows"] if x["server"] == server]
            turns = [x["turn"] for x in rows]
            top.bar(
                [t - 0.2 + 0.4 * i for t in turns],
                [100 * (x["cached_share"] or 0) for x in rows],
                0.4,
                label=server,
                color=color,
            )
            bottom.plot(turns, [x["ttft_s"] for x in rows], "o-", label=server, color=color)
        top.set_ylabel("prompt from cache, %")
        top.set_ylim(0, 105)
        top.legend(fontsize=8, loc="upper left")
        bottom.set_ylabel("TTFT, s")
        bottom.set_xlabel("turn")
        top.set_title(f"Claude-Code-shaped replay (billing header changing per turn)\n{subtitle}", fontsize=9)
        charts.append(save(fig, out / "replay.png"))
    return charts


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
