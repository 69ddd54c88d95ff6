"""The command line: dashboard mode (a busy port is reported, not fatal; `--serve` refuses it) and its settings."""

import socket

import pytest
from test_tui_app import ready, shown, until

from mlx_tui.tui.app import MlxTui
from mlx_tui.tui.cli import listen, local_backend, main, parse_args


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_refuses_a_busy_port(busy_port, capsys):
    assert main(["--serve", "--port", str(busy_port)]) == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_the_dashboard_runs_without_the_api_when_its_port_is_busy(busy_port):
    args = parse_args(["--port", str(busy_port)])
    backend = local_backend(args, *listen(args))
    app = MlxTui(backend)
    try:
        async with app.run_test() as pilot:
            await until(pilot, lambda: "not served: cannot listen on" in shown(app, "#engine-info"))
            await ready(pilot)
    finally:
        await backend.stop()


@pytest.mark.parametrize("setting", ["sometimes", "0", "65"])
def test_speculate_takes_off_auto_or_a_draft_length(setting, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--speculate", setting])
    assert "--speculate takes off, auto or a draft length from 1 to 64" in capsys.readouterr().err
    assert parse_args(["--speculate", "3"]).speculate == "3"


@pytest.mark.parametrize("setting", ["often", "-5", "1001"])
def test_stream_interval_takes_auto_or_milliseconds(setting, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--stream-interval", setting])
    assert "--stream-interval takes auto or milliseconds from 0 to 1000" in capsys.readouterr().err
    assert parse_args(["--stream-interval", "0"]).stream_interval == "0"
