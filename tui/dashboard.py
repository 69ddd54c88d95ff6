"""The first screen: what the engine is doing, live."""

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical
from textual.widgets import Input, ProgressBar, Static

from . import format as fmt
from .changes import Changes
from .chart import Chart
from .requests import RequestsTable
from .state import State

WORKER_STYLES = {"ready": "green", "loading": "yellow", "restarting": "yellow", "stopping": "yellow"}
BREAKER_STYLES = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def grid() -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    return table


def dot(text: str, style: str) -> Text:
    return Text.assemble(("● ", style), (text, style))


def bar(used: float, budget: float, width: int) -> Text:
    """A gauge of `used` against `budget`, then the two figures, in `width` columns."""
    figures = f" {fmt.size(used)} / {fmt.size(budget)}"
    cells = max(4, width - len(figures))
    fraction = min(1.0, used / budget) if budget else 0.0
    filled = round(fraction * cells)
    style = "red" if fraction > 0.9 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (cells - filled), "dim"), figures)


def rank_label(rank: dict) -> str:
    """A rank's number and host, the share of a core it uses, and its state where it stands out."""
    label = f"{rank['rank']} {rank['host'] or fmt.DASH}"
    if rank.get("cpu") is not None:
        label += f" {rank['cpu']:.0%}"
    if rank["state"] in ("stalled", "gone"):
        label += f" {rank['state']}"
    return label


class Panel(Static):
    """A panel drawn from the state by `show()`; its size is set by the layout, not by what it shows."""

    def __init__(self, state: State, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state

    def draw(self, table: Table) -> None:
        self.update(table, layout=False)  # a layout pass redraws the whole screen


class EnginePanel(Panel):
    """Model, address, uptime, worker, breaker, queue and memory."""

    def show(self) -> None:
        state = self.state
        info, w, b, stats = state.info, state.worker, state.breaker, state.stats
        t = grid()
        t.add_row("model", Text(str(info.get("model") or fmt.DASH), style="bold"))
        if info.get("api_problem"):
            t.add_row("API", Text(f"not served: {info['api_problem']}", style="bold red"))
        else:
            t.add_row("API", info.get("address") or fmt.DASH)
        if state.connection:
            c = state.connection
            if c.state == "connected":
                t.add_row("server", dot("connected", "green"))
            else:
                t.add_row("server", dot(f"unreachable: {c.error} (retrying in {c.retry_s}s)", "bold red"))
        t.add_row("uptime", fmt.duration(state.uptime_s))
        worker = dot(w.state, WORKER_STYLES.get(w.state, "bold red"))
        if w.state == "loading" and w.phase:
            worker.append(f" {w.phase}", style="dim")
        worker.append(f"  pid {w.pid or fmt.DASH} · {w.restarts} restarts", style="dim")
        t.add_row("worker", worker)
        if len(ranks := stats.get("rank_states") or []) > 1:
            t.add_row(
                "ranks",
                Text("  ").join(
                    dot(rank_label(r), WORKER_STYLES.get(r["state"] if w.state == "ready" else w.state, "bold red"))
                    for r in ranks
                ),
            )
        if w.message:
            t.add_row("", Text(w.message, style="red"))
        breaker = dot(b.state.replace("_", "-"), BREAKER_STYLES.get(b.state, "bold red"))
        breaker.append(f"  {b.failures} failures", style="dim")
        if (probe := b.probe_in(state.clock())) is not None:
            breaker.append(f" · next probe in {probe:.0f}s", style="dim")
        t.add_row("breaker", breaker)
        t.add_row("requests", f"{stats.get('running', 0)} running · {stats.get('waiting', 0)} waiting")
        memory = stats.get("memory", {})
        t.add_row("memory", f"{fmt.size(memory.get('active'))} · peak {fmt.size(memory.get('peak'))}")
        t.add_row("KV", f"{fmt.size(memory.get('running_kv'))} in the running batch")
        details: list[str] = [info[k] for k in ("dtype", "tool_parser") if info.get(k)]
        if info.get("context_length"):
            details.append(f"{info['context_length']:,} ctx")
        t.add_row("engine", " · ".join(details) or fmt.DASH)
        t.add_row("BLAS", Text(str(info.get("blas") or fmt.DASH), no_wrap=True, overflow="ellipsis"))
        self.draw(t)


class LatencyPanel(Panel):
    def show(self) -> None:
        state = self.state
        done = sum(r.phase == "done" for r in state.requests.values())
        failed = sum(r.phase == "error" for r in state.requests.values())
        t = grid()
        t.add_row("TTFT p50", fmt.seconds(state.ttft_p50))
        t.add_row("TTFT p95", fmt.seconds(state.ttft_p95))
        t.add_row("finished", f"{done} done · {failed} failed")
        t.add_row(
            "tokens",
            f"{fmt.number(state.stats.get('prompt_tokens_total'))} prompt · "
            f"{fmt.number(state.stats.get('generation_tokens_total'))} generated",
        )
        t.add_row("drafts", speculation(state.stats.get("speculation") or {}))
        self.draw(t)


class CachePanel(Panel):
    """Hit rates, and the cache's size against its budgets (the gauges fill the panel's width)."""

    def on_resize(self) -> None:
        self.show()

    def show(self) -> None:
        state = self.state
        c = state.cache
        t = grid()
        tokens = Text(fmt.percent(state.token_hit_rate), style="bold")
        if c.get("prompt_tokens"):
            tokens.append(f"  {c['reused_tokens']:,}/{c['prompt_tokens']:,} tokens", style="dim")
        t.add_row("token hits", tokens)
        hits = Text(fmt.percent(state.request_hit_rate), style="bold")
        if c.get("lookups"):
            hits.append(f"  {c['hits']:,}/{c['lookups']:,} requests", style="dim")
        t.add_row("request hits", hits)
        width = self.content_size.width - len("request hits") - 1
        t.add_row("RAM", bar(c.get("ram_bytes", 0), c.get("ram_budget", 0), width))
        if c.get("disk_budget"):
            t.add_row("disk", bar(c.get("disk_bytes", 0), c["disk_budget"], width))
        if failures := disk_failures(c):
            t.add_row("disk errors", Text(failures, style="bold red"))
        self.border_subtitle = f"prefix: {c['mode']}" if c.get("mode") else ""
        entries = f"{c.get('entries', 0)} · {c.get('evictions', 0)} evicted"
        if c.get("snapshots"):
            entries += f" · {c['snapshots']} snapshots ({fmt.size(c.get('snapshot_bytes'))})"
        t.add_row("entries", entries)
        self.draw(t)


def speculation(s: dict) -> Text:
    """How much of what speculation drafted was kept, and the tokens each verify pass gave."""
    mode = s.get("mode") or fmt.DASH
    if not s.get("drafts"):
        return Text(mode if mode.startswith("off") else "none yet", style="dim")
    kept = s["accepted_tokens"] / s["draft_tokens"]
    per_pass = (s["accepted_tokens"] + s["drafts"]) / s["drafts"]
    return Text.assemble((f"{kept:.0%} kept", "bold"), (f"  {per_pass:.1f} tokens a pass", "dim"))


def disk_failures(c: dict) -> str:
    """The disk tier's failed writes, dropped writes and refused files, where there are any."""
    counts = [
        (c.get(k, 0), what)
        for k, what in (
            ("disk_write_errors", "failed writes"),
            ("disk_dropped", "dropped"),
            ("disk_rejected", "refused"),
        )
    ]
    return " · ".join(f"{n:,} {what}" for n, what in counts if n)


class DashboardView(Container):
    BINDINGS = [
        Binding("space", "pause", "Pause charts"),
        Binding("slash", "filter", "Filter requests"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, state: State, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state

    def compose(self) -> ComposeResult:
        with Vertical(id="engine"):
            yield EnginePanel(self.state, id="engine-info")
            yield ProgressBar(total=1.0, show_eta=False, id="loading")
        yield Chart("decode", "tok/s", id="decode")
        yield Chart("prefill", "tok/s", id="prefill")
        yield LatencyPanel(self.state, id="latency")
        yield CachePanel(self.state, id="cache")
        with Vertical(id="requests"):
            yield Input(placeholder="filter requests (esc clears)", id="requests-filter")
            yield RequestsTable(self.state, id="requests-table")

    def on_mount(self) -> None:
        self.query_one("#engine").border_title = "Engine"
        self.query_one("#latency").border_title = "Latency"
        self.query_one("#cache").border_title = "Prefix cache"
        self.query_one("#requests").border_title = "Recent requests"
        self.show(Changes({"info", "stats", "worker", "breaker", "requests"}))

    @staticmethod
    def due(changes: Changes) -> bool:
        """Whether to draw now: stats and requests wait for the clock's next tick, so the
        dashboard draws them once a second however many events came."""
        return bool(changes.areas & {"info", "worker", "breaker", "connection", "clock"})

    def show(self, changes: Changes) -> None:
        state = self.state
        if changes.areas & {"info", "stats", "worker", "breaker", "connection", "clock"}:
            self.query_one(EnginePanel).show()
            loading = self.query_one("#loading", ProgressBar)
            loading.display = state.worker.state == "loading"
            loading.update(progress=state.worker.fraction)
        if "stats" in changes.areas:
            for chart, samples in (
                (self.query_one("#decode", Chart), state.decode_tps),
                (self.query_one("#prefill", Chart), state.prefill_tps),
            ):
                if not chart.paused:
                    chart.samples = tuple(samples)
            self.query_one(CachePanel).show()
        if changes.areas & {"stats", "requests"}:
            self.query_one(LatencyPanel).show()
        if "requests" in changes.areas:
            self.query_one(RequestsTable).show(changes.requests)

    def action_pause(self) -> None:
        for chart in self.query(Chart):
            chart.paused = not chart.paused

    def action_filter(self) -> None:
        field = self.query_one("#requests-filter", Input)
        field.display = True
        field.focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#requests-filter", Input)
        field.value = ""
        field.display = False
        self.query_one(RequestsTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one(RequestsTable).set_filter(event.value)
