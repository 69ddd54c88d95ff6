"""Prometheus metrics, named after vLLM's with the `mlx_tui:` prefix, one registry per engine."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .events import Done, Event, Started

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("mlx_tui:prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("mlx_tui:generation_tokens", "Generated tokens.", registry=r)
        self.cache_queries = Counter(
            "mlx_tui:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.cache_hits = Counter(
            "mlx_tui:prefix_cache_hits", "Prompt tokens served from the prefix cache.", registry=r
        )
        self.requests = Counter(
            "mlx_tui:request_success", "Finished requests by stop reason.", ["finished_reason"], registry=r
        )
        self.failures = Counter("mlx_tui:request_failure", "Failed requests by error kind.", ["kind"], registry=r)
        self.repetitions = Counter("mlx_tui:repetition_stops", "Generations ended by the repetition guard.", registry=r)
        self.running = Gauge("mlx_tui:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("mlx_tui:num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.ttft = Histogram(
            "mlx_tui:time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.breaker = Gauge(
            "mlx_tui:circuit_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r
        )
        self.restarts = Counter("mlx_tui:worker_restarts", "Engine worker restarts.", registry=r)
        self.cache_bytes = Gauge(
            "mlx_tui:prefix_cache_bytes",
            "Bytes held by the prefix cache (snapshots: part of ram).",
            ["tier"],
            registry=r,
        )
        self.cache_snapshots = Gauge(
            "mlx_tui:prefix_cache_snapshots", "State snapshots of layers that cannot be cut, held in RAM.", registry=r
        )
        self.totals = {  # counters kept from the worker's running totals in its stats, by where they stand there
            ("cache", "disk_write_errors"): Counter(
                "mlx_tui:prefix_cache_disk_write_errors",
                "Prefix cache entries the disk tier failed to write.",
                registry=r,
            ),
            ("cache", "disk_dropped"): Counter(
                "mlx_tui:prefix_cache_disk_writes_dropped",
                "Prefix cache entries dropped from a full disk write queue.",
                registry=r,
            ),
            ("cache", "disk_rejected"): Counter(
                "mlx_tui:prefix_cache_disk_rejected",
                "Disk cache files refused: damaged, foreign or not signed by this cache.",
                registry=r,
            ),
            ("speculation", "drafts"): Counter(
                "mlx_tui:spec_decode_num_drafts", "Verify passes that carried a speculative draft.", registry=r
            ),
            ("speculation", "draft_tokens"): Counter(
                "mlx_tui:spec_decode_num_draft_tokens", "Speculatively drafted tokens.", registry=r
            ),
            ("speculation", "accepted_tokens"): Counter(
                "mlx_tui:spec_decode_num_accepted_tokens", "Drafted tokens accepted and generated.", registry=r
            ),
        }
        self._seen: tuple = (None, {})

    def observe(self, event: Event) -> None:
        if isinstance(event, Started):
            self.prompt_tokens.inc(event.prompt_tokens)
            self.cache_queries.inc(event.prompt_tokens)
            self.cache_hits.inc(event.cached_tokens)
        elif isinstance(event, Done):
            self.generation_tokens.inc(event.usage.generated_tokens)
            self.requests.labels(event.stop_reason).inc()
            self.ttft.observe(event.timings.queued_s + event.timings.prefill_s)
            if event.note == "repetition":
                self.repetitions.inc()

    def observe_stats(self, stats: dict, pid: int | None) -> None:
        """Count from the worker's running totals (a new worker starts them at 0)."""
        worker, seen = self._seen
        if pid != worker:
            seen = {}
        for key, counter in self.totals.items():
            now = stats.get(key[0], {}).get(key[1], 0)
            counter.inc(max(0, now - seen.get(key, 0)))
            seen[key] = now
        self._seen = (pid, seen)

    def text(self) -> bytes:
        return generate_latest(self.registry)
