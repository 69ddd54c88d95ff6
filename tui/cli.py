"""The `mlx-tui` command: engine + API + dashboard, `--serve` for engine + API, `--attach URL` for the dashboard."""

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mlx_tui.engine.blas import missing_openblas, worker_blas
from mlx_tui.engine.config import (
    DTYPES,
    EngineConfig,
    cache_dir,
    draft_most,
    hostfile_hosts,
    model_problem,
    stream_interval_ms,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx-tui", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="run the engine and the API without the dashboard")
    mode.add_argument("--attach", metavar="URL", help="show the dashboard of a server started elsewhere")
    p.add_argument(
        "--model", help="a local mlx-lm model directory or a Hugging Face repo id (default: the bundled demo model)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key", default=os.environ.get("MLX_TUI_API_KEY"), help="require this key (default: $MLX_TUI_API_KEY)"
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-body-mb", type=float, default=32)
    e = p.add_argument_group("engine")
    e.add_argument("--max-concurrency", type=int, default=4, help="requests decoded together in one batch")
    e.add_argument(
        "--prefill-step", type=int, default=512, help="prompt tokens read per step, so running streams keep flowing"
    )
    e.add_argument("--max-tokens", type=int, default=32768, help="the cap on any request's max_tokens")
    e.add_argument("--repetition-penalty", type=float, default=0.0, help="default repetition penalty (0: off)")
    e.add_argument(
        "--loop-window", type=int, default=256, help="end a generation whose last N tokens repeat one span (0: off)"
    )
    e.add_argument("--loop-max-period", type=int, default=64, help="the longest repeating span --loop-window looks for")
    e.add_argument("--tool-parser", help="an mlx-lm tool parser name, for models where none is found")
    e.add_argument(
        "--constrain-tools",
        action="store_true",
        help="bind every tool call the model starts to its tool's schema with a grammar (costs a mask per token)",
    )
    e.add_argument(
        "--speculate",
        default="auto",
        metavar="{off,auto,N}",
        help="prompt-lookup speculative decoding: auto drafts up to 8 tokens a pass from the context, N up to N",
    )
    e.add_argument(
        "--stream-interval",
        default="auto",
        metavar="{auto,MS}",
        help="send a decoding stream's text every MS milliseconds (auto: 50 on the CPU backend, every token on a GPU)",
    )
    e.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file to use instead of the model's")
    e.add_argument(
        "--blas", choices=("auto", "reference"), default="auto", help="auto: an optimised OpenBLAS on Linux where found"
    )
    e.add_argument("--blas-threads", type=int, default=0, help="OpenBLAS threads in the worker (0: all cores)")
    e.add_argument(
        "--dtype",
        default="auto",
        metavar="{" + ",".join(DTYPES) + "}",
        help="the weights' dtype; auto: float32 on the CPU when memory allows, else as stored",
    )
    d = p.add_argument_group("distributed (mlx.launch)")
    d.add_argument(
        "--local-ranks", type=int, default=1, metavar="N", help="run the model split across N ranks on this machine"
    )
    d.add_argument(
        "--hostfile", metavar="FILE", help="run the model split across the hosts of this mlx.launch hostfile"
    )
    d.add_argument("--backend", choices=("ring", "mpi", "jaccl"), default="ring", help="MLX's distributed backend")
    d.add_argument(
        "--shard", choices=("tensor", "pipeline"), help="how to split the model (default: tensor where supported)"
    )
    c = p.add_argument_group("prefix cache")
    c.add_argument(
        "--cache-ram-gb",
        type=float,
        default=0.0,
        help="RAM for cached KV state (default: a fifth of the machine's memory)",
    )
    c.add_argument(
        "--cache-dir", default=str(cache_dir() / "prefix-cache"), help="where the disk tier keeps entries, per model"
    )
    c.add_argument("--cache-disk-gb", type=float, default=10.0, help="disk for cached KV state (0: no disk tier)")
    c.add_argument(
        "--warm", metavar="FILE", type=Path, help="prefill this system prompt (text) or request (JSON) at start"
    )
    r = p.add_argument_group("reliability")
    r.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a batch slot; more get 429")
    r.add_argument("--request-timeout", type=float, default=0.0, help="seconds a request may take (0: no limit)")
    r.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="restart a worker that has work but makes no progress this long",
    )
    r.add_argument(
        "--max-kv-gb", type=float, default=0.0, help="refuse requests whose KV cache could grow past this (0: no limit)"
    )
    r.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM or quit, how long running requests may take to finish",
    )
    r.add_argument("--no-transcripts", action="store_true", help="keep transcripts in memory only, not on disk")
    r.add_argument(
        "--debug-faults", action="store_true", help="let the X-MLX-TUI-Fault header inject faults (tests only)"
    )
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        p.exit(2, f"mlx-tui: --dtype {args.dtype}: choose one of {', '.join(DTYPES)}\n")
    if args.warm and not args.warm.is_file():
        p.error(f"--warm {args.warm}: no such file")
    if args.warm:
        from mlx_tui.api.warm import warm_request

        try:
            warm_request(args.warm)
        except (ValueError, OSError) as e:
            p.exit(2, f"mlx-tui: --warm {args.warm}: {e}\n")
    if args.chat_template and not Path(args.chat_template).is_file():
        p.exit(2, f"mlx-tui: --chat-template {args.chat_template}: no such file\n")
    if args.blas_threads < 0:
        p.error("--blas-threads must be 0 (all cores) or more")
    for name in ("max_concurrency", "prefill_step", "max_tokens", "local_ranks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hostfile and args.local_ranks > 1:
        p.error("--hostfile and --local-ranks cannot be combined")
    try:
        draft_most(args.speculate)
        stream_interval_ms(args.stream_interval, on_gpu=False)
    except ValueError as e:
        p.error(str(e))
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    config = EngineConfig(
        max_concurrency=args.max_concurrency,
        prefill_step=args.prefill_step,
        max_tokens=args.max_tokens,
        repetition_penalty=args.repetition_penalty,
        loop_window=args.loop_window,
        loop_max_period=args.loop_max_period,
        tool_parser=args.tool_parser,
        constrain_tools=args.constrain_tools,
        speculate=args.speculate,
        stream_interval=args.stream_interval,
        chat_template=args.chat_template,
        blas=args.blas,
        blas_threads=args.blas_threads,
        dtype=args.dtype,
        cache_ram_gb=args.cache_ram_gb,
        cache_dir=args.cache_dir if args.cache_disk_gb > 0 else None,
        cache_disk_gb=args.cache_disk_gb,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        stall_timeout=args.stall_timeout,
        max_kv_gb=args.max_kv_gb,
        ranks=args.local_ranks,
        hostfile=args.hostfile,
        backend=args.backend,
        shard=args.shard,
    )
    if args.no_transcripts:
        config.transcripts_dir = None
    if args.model:
        config.model = args.model
    return config


def app_settings(args: argparse.Namespace) -> dict:
    return {
        "api_key": args.api_key,
        "max_body_mb": args.max_body_mb,
        "allow_any_host": args.insecure,
        "debug_faults": args.debug_faults,
    }


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """Bind the API's socket before the model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def listen(args: argparse.Namespace) -> tuple[socket.socket | None, str | None]:
    """The API's bound socket, or why there is none."""
    try:
        return bind(args.host, args.port), None
    except OSError as e:
        return None, f"cannot listen on {args.host}:{args.port}: {e.strerror}"


def local_backend(args: argparse.Namespace, sock: socket.socket | None, problem: str | None) -> Any:
    """The engine, and the API served from the app's event loop when `sock` is bound."""
    from mlx_tui.api.embedded import ApiServer
    from mlx_tui.api.server import create_app
    from mlx_tui.engine.client import EngineClient

    from .local import LocalBackend

    engine = EngineClient(engine_config(args))
    if sock is None:
        return LocalBackend(engine, problem=problem, warm_file=args.warm)
    app = create_app(engine, **app_settings(args))
    return LocalBackend(
        engine, ApiServer(app, sock, args.shutdown_grace), url(args.host, args.port), warm_file=args.warm
    )


async def dashboard(args: argparse.Namespace, sock: socket.socket | None, problem: str | None) -> int:
    from mlx_tui.engine.demo.conversations import TOOLS

    from .app import MlxTui

    return await run(MlxTui(local_backend(args, sock, problem), example_tools=TOOLS))


async def attach(args: argparse.Namespace) -> int:
    from mlx_tui.engine.demo.conversations import TOOLS

    from .app import MlxTui
    from .remote import RemoteBackend

    return await run(MlxTui(RemoteBackend(args.attach, args.api_key), example_tools=TOOLS))


async def run(app: Any) -> int:
    """Run the app until it quits or gets SIGTERM (either way the terminal is restored), then stop its backend."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, app.exit)
    try:
        await app.run_async()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        print("mlx-tui: stopping…", file=sys.stderr)
        await app.backend.stop()
    return app.return_code or 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attach:
        return asyncio.run(attach(args))
    if args.model and (problem := model_problem(args.model)):
        print(f"mlx-tui: {problem}", file=sys.stderr)
        return 2
    if args.hostfile:
        try:
            hostfile_hosts(args.hostfile, args.backend)
        except ValueError as e:
            print(f"mlx-tui: {e}", file=sys.stderr)
            return 2
    from mlx_tui.api.server import loopback_host

    if not loopback_host(args.host) and not args.api_key and not args.insecure:
        print(f"mlx-tui: refusing to serve on {args.host} without --api-key (or --insecure)", file=sys.stderr)
        return 2
    if warning := missing_openblas(args.blas, worker_blas(args.blas)[0]):
        print(f"mlx-tui: warning: {warning}", file=sys.stderr)
    sock, problem = listen(args)
    if args.serve:
        if problem:
            print(f"mlx-tui: {problem}", file=sys.stderr)
            return 1
        from mlx_tui.api.headless import serve

        return asyncio.run(
            serve(
                engine_config(args), sock, url(args.host, args.port), app_settings(args), args.shutdown_grace, args.warm
            )
        )
    return asyncio.run(dashboard(args, sock, problem))


if __name__ == "__main__":
    sys.exit(main())
