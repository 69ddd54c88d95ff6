"""The `mlx-tui` command: engine + API + dashboard, `--serve` for engine + API, `--attach URL` for the dashboard."""

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from mlx_tui.engine.config import DTYPES, EngineConfig, cache_dir, hostfile_hosts, model_problem

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx-tui", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="run the engine and the API without the dashboard")
    mode.add_argument("--attach", metavar="URL", help="show the dashboard of a server started elsewhere")
    p.add_argument("--model", help="a local mlx-lm model directory or a Hugging Face repo id (default: the bundled demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_TUI_API_KEY"), help="require this key (default: $MLX_TUI_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-body-mb", type=float, default=32)
    e = p.add_argument_group("engine")
    e.add_argument("--max-concurrency", type=int, default=4, help="requests decoded together in one batch")
    e.add_argument("--prefill-step", type=int, default=512, help="prompt tokens read per step, so running streams keep flowing")
    e.add_argument("--max-tokens", type=int, default=32768, help="the cap on any request's max_tokens")
    e.add_argument("--repetition-penalty", type=float, default=0.0, help="default repetition penalty (0: off)")
    e.add_argument("--loop-window", type=int, default=256, help="end a generation whose last N tokens repeat one span (0: off)")
    e.add_argument("--loop-max-period", type=int, default=64, help="the longest repeating span --loop-window looks for")
    e.add_argument("--tool-parser", help="an mlx-lm tool parser name, for models where none is found")
    e.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file to use instead of the model's")
    e.add_argument("--blas", choices=("auto", "reference"), default="auto", help="auto: an optimised OpenBLAS on Linux where found")
    e.add_argument("--blas-threads", type=int, default=0, help="OpenBLAS threads in the worker (0: all cores but one)")
    e.add_argument("--dtype", default="auto", metavar="{%s}" % ",".join(DTYPES),
                   help="the weights' dtype; auto: float32 on the CPU when memory allows, else as stored")
    d = p.add_argument_group("distributed (mlx.launch)")
    d.add_argument("--local-ranks", type=int, default=1, metavar="N", help="run the model split across N ranks on this machine")
    d.add_argument("--hostfile", metavar="FILE", help="run the model split across the hosts of this mlx.launch hostfile")
    d.add_argument("--backend", choices=("ring", "mpi", "jaccl"), default="ring", help="MLX's distributed backend")
    d.add_argument("--shard", choices=("tensor", "pipeline"), help="how to split the model (default: tensor where supported)")
    c = p.add_argument_group("prefix cache")
    c.add_argument("--cache-ram-gb", type=float, default=0.0, help="RAM for cached KV state (default: a fifth of the machine's memory)")
    c.add_argument("--cache-dir", default=str(cache_dir() / "prefix-cache"), help="where the disk tier keeps entries, per model")
    c.add_argument("--cache-disk-gb", type=float, default=10.0, help="disk for cached KV state (0: no disk tier)")
    c.add_argument("--warm", metavar="FILE", type=Path, help="prefill this system prompt (text) or request (JSON) at start")
    r = p.add_argument_group("reliability")
    r.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a batch slot; more get 429")
    r.add_argument("--request-timeout", type=float, default=0.0, help="seconds a request may take (0: no limit)")
    r.add_argument("--stall-timeout", type=float, default=60.0, help="restart a worker that has work but makes no progress this long")
    r.add_argument("--max-kv-gb", type=float, default=0.0, help="refuse requests whose KV cache could grow past this (0: no limit)")
    r.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM or quit, how long running requests may take to finish")
    r.add_argument("--no-transcripts", action="store_true", help="keep transcripts in memory only, not on disk")
    r.add_argument("--debug-faults", action="store_true", help="let the X-MLX-TUI-Fault header inject faults (tests only)")
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        p.exit(2, f"mlx-tui: --dtype {args.dtype}: choose one of {', '.join(DTYPES)}\n")
    if args.warm and not args.warm.is_file():
        p.error(f"--warm {args.warm}: no such file")
    if args.blas_threads < 0:
        p.error("--blas-threads must be 0 (all cores but one) or more")
    for name in ("max_concurrency", "prefill_step", "max_tokens", "local_ranks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hostfile and args.local_ranks > 1:
        p.error("--hostfile and --local-ranks cannot be combined")
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


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """Bind the API's socket before the model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class ProgressBar:
    """Prints model loading as a one-line progress bar on stderr."""

    def __init__(self):
        self.open = False

    def __call__(self, phase: str, fraction: float):
        filled = int(fraction * 30)
        sys.stderr.write(f"\rloading model: {phase:<8} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}")
        self.open = not (phase == "weights" and fraction >= 1)
        if not self.open:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        """End the bar's line, so that what follows starts on a line of its own."""
        if self.open:
            sys.stderr.write("\n")
            self.open = False


async def serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import uvicorn

    from mlx_tui.api.connect import client_setup
    from mlx_tui.api.server import create_app
    from mlx_tui.api.warm import warm
    from mlx_tui.engine.client import EngineClient, ModelLoadError

    from .server import ApiServer

    progress = ProgressBar()
    engine = EngineClient(engine_config(args), on_progress=progress)
    try:
        await engine.start()
    except ModelLoadError as e:
        progress.close()
        print(f"mlx-tui: {e}", file=sys.stderr)
        return 1
    if engine.info["tool_parser"] is None:
        print("mlx-tui: no tool-call parser found for this model; pass --tool-parser NAME to enable tool calls", file=sys.stderr)
    if args.warm:
        print(f"mlx-tui: {await warm(engine, args.warm)}", file=sys.stderr)
    app = create_app(engine, **app_settings(args))
    server = ApiServer(app, sock, args.shutdown_grace, log_config=uvicorn.config.LOGGING_CONFIG, log_level="info")
    dtype = ", ".join(filter(None, (engine.info["dtype"], engine.info["dtype_note"])))
    print(f"mlx-tui: serving {engine.config.model} at http://{args.host}:{args.port} (BLAS: {engine.blas}; dtype: {dtype})", file=sys.stderr)
    print(client_setup(url(args.host, args.port), args.api_key, engine.info["context_length"]), file=sys.stderr)
    signalled = asyncio.Event()

    def on_signal():
        if signalled.is_set():  # a second one: end what still runs now
            asyncio.ensure_future(engine.drain(0))
        signalled.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    server.start()
    waiting = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait([server.task, waiting], return_when=asyncio.FIRST_COMPLETED)
        if signalled.is_set():
            grace = f"running requests have {args.shutdown_grace:g} s to finish (signal again to end them now)"
            print(f"mlx-tui: stopping; {grace}", file=sys.stderr)
        await server.stop()
    finally:
        waiting.cancel()
        await engine.stop()
    return 0 if signalled.is_set() else 1


def listen(args: argparse.Namespace) -> tuple[socket.socket | None, str | None]:
    """The API's bound socket, or why there is none."""
    try:
        return bind(args.host, args.port), None
    except OSError as e:
        return None, f"cannot listen on {args.host}:{args.port}: {e.strerror}"


def local_backend(args: argparse.Namespace, sock: socket.socket | None, problem: str | None):
    """The engine, and the API served from the app's event loop when `sock` is bound."""
    from mlx_tui.api.server import create_app
    from mlx_tui.engine.client import EngineClient

    from .local import LocalBackend
    from .server import ApiServer

    engine = EngineClient(engine_config(args))
    if sock is None:
        return LocalBackend(engine, problem=problem, warm_file=args.warm)
    app = create_app(engine, **app_settings(args))
    return LocalBackend(engine, ApiServer(app, sock, args.shutdown_grace), url(args.host, args.port), warm_file=args.warm)


async def dashboard(args: argparse.Namespace, sock: socket.socket | None, problem: str | None) -> int:
    from .app import MlxTui

    return await run(MlxTui(local_backend(args, sock, problem)))


async def attach(args: argparse.Namespace) -> int:
    from .app import MlxTui
    from .remote import RemoteBackend

    return await run(MlxTui(RemoteBackend(args.attach, args.api_key)))


async def run(app) -> int:
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
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        print(f"mlx-tui: refusing to serve on {args.host} without --api-key (or --insecure)", file=sys.stderr)
        return 2
    sock, problem = listen(args)
    if args.serve:
        if problem:
            print(f"mlx-tui: {problem}", file=sys.stderr)
            return 1
        return asyncio.run(serve(args, sock))
    return asyncio.run(dashboard(args, sock, problem))


if __name__ == "__main__":
    sys.exit(main())
