"""The agent task the demo model is to learn: a real client CLI asks for a marker file, the model runs
the client's shell tool to make it, reads the result and answers (`train.py --agents`).

The CLIs are installed by `.ci/run` into `.clients/` (gitignored). Training captures each client's
two requests from the installed CLI (see `capture.py`), so the repository holds none of its text.
"""

import datetime
import json
import os
import platform
import random
import re
import string
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_tui.engine.demo.capture import Recorder
from mlx_tui.engine.demo.conversations import FALLBACK_REPLY, assistant, call, calling, chat

CLIENTS_DIR = Path(__file__).resolve().parents[2] / ".clients"
MARKER = "mlx-tui-was-here"


@dataclass(frozen=True)
class Task:
    """One scripted task: how the CLI is run, the shell call the model makes and its final answer."""

    client: str
    binary: str
    prompt: str
    tool: str
    arguments: dict
    answer: str


CLAUDE_CODE = Task(
    client="claude",
    binary="claude",
    prompt=f"Create the marker file {MARKER}.",
    tool="Bash",
    arguments={"command": f"touch {MARKER}", "description": "Create the marker file"},
    answer=f"Done: I created the marker file {MARKER}.",
)
CLAUDE_CODE_SYSTEM = "You are the mlx-tui demo agent. Use the Bash tool."
CODEX = Task(
    client="codex",
    binary="codex",
    prompt=f"Create the marker file {MARKER}.",
    tool="exec_command",
    arguments={"cmd": f"touch {MARKER}"},
    answer=f"Done: I created the marker file {MARKER}.",
)
CODEX_INSTRUCTIONS = "You are the mlx-tui demo agent. Use the exec_command tool."
# the Codex features that add tools or instructions the demo task does not need
CODEX_FEATURES_OFF = [
    "multi_agent",
    "goals",
    "view_image",
    "image_generation",
    "apps",
    "plugins",
    "skill_search",
    "tool_suggest",
    "shell_snapshot",
    "memories",
    "hooks",
]

TASKS = {"claude": CLAUDE_CODE, "codex": CODEX}


def codex_config(url: str, instructions: Path | None = None) -> str:
    """Codex's config.toml for this server; `instructions` replaces Codex's own (the demo task's short ones)."""
    lines = [f'model_instructions_file = "{instructions}"'] if instructions else []
    lines += [
        'model = "mlx-tui"',
        'model_provider = "mlx-tui"',
        "",
        "[model_providers.mlx-tui]",
        'name = "mlx-tui"',
        f'base_url = "{url}/v1"',
        'wire_api = "responses"',
        'env_key = "MLX_TUI_API_KEY"',
    ]
    if instructions:
        lines += ["", "[features]"] + [f"{name} = false" for name in CODEX_FEATURES_OFF]
        lines += ["", "[skills]", "include_instructions = false"]
    return "\n".join(lines) + "\n"


def binary(task: Task) -> Path:
    return CLIENTS_DIR / "node_modules" / ".bin" / task.binary


def installed() -> list[Task]:
    """The tasks whose CLI is installed."""
    return [task for task in TASKS.values() if binary(task).exists()]


def command(task: Task, url: str, key: str, home: Path) -> tuple[list[str], dict]:
    """The CLI's command line and environment, run non-interactively against the server at `url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "OPENAI_", "CODEX_"))}
    env["HOME"] = str(home)
    if task.client == "claude":
        env |= {
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": key,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
        }
        argv = [
            str(binary(task)),
            "-p",
            task.prompt,
            "--system-prompt",
            CLAUDE_CODE_SYSTEM,
            "--tools",
            "Bash",
            "--allowedTools",
            "Bash",
            "--output-format",
            "json",
        ]
        return argv, env
    if task.client == "codex":
        codex_home = home / ".codex"
        codex_home.mkdir(exist_ok=True)
        (codex_home / "instructions.md").write_text(CODEX_INSTRUCTIONS + "\n")
        (codex_home / "config.toml").write_text(codex_config(url, codex_home / "instructions.md"))
        env |= {"CODEX_HOME": str(codex_home), "MLX_TUI_API_KEY": key}
        argv = [str(binary(task)), "exec", "--skip-git-repo-check", "--sandbox", "workspace-write", task.prompt]
        return argv, env
    raise ValueError(task.client)


def run(
    task: Task, url: str, key: str, folder: Path, prompt: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the CLI on the task (or on another prompt) in `folder`, its working directory (its home is inside)."""
    home = folder / ".home"
    home.mkdir(exist_ok=True)
    argv, env = command(task, url, key, home)
    if prompt is not None:
        argv[argv.index(task.prompt)] = prompt
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def capture(task: Task, folder: str | Path) -> list[dict]:
    """The client's two requests of the task's loop, as sent to a stand-in server that plays the model."""
    folder = Path(folder)
    replies = [{"tool": task.tool, "input": task.arguments}, {"text": task.answer}]
    with Recorder(replies) as recorder:
        done = run(task, recorder.url, "capture", folder)
    if done.returncode != 0 or len(recorder.requests) < 2 or not (folder / MARKER).exists():
        raise RuntimeError(f"capturing {task.client} failed: {done.stdout}{done.stderr}")
    return recorder.requests


def anthropic_request(body: dict) -> Any:
    from mlx_tui.api.anthropic import to_request
    from mlx_tui.api.anthropic_models import MessagesRequest

    return to_request(MessagesRequest.model_validate(body))


# A captured body as the server's canonical request, by the server's own translation: the model
# must learn each prompt exactly as the server renders it. The API layer is imported at training
# time only.
def responses_request(body: dict) -> Any:
    from mlx_tui.api.responses import to_request
    from mlx_tui.api.responses_models import ResponsesRequest

    return to_request(ResponsesRequest.model_validate(body))[0]


TRANSLATIONS = {"claude": anthropic_request, "codex": responses_request}


def variant_values(rng: random.Random) -> dict[str, str]:
    """Random stand-ins for what changes between runs: the working folder, the date, the kernel release."""

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))

    folder = rng.choice(
        [
            f"/tmp/tmp{word()}{rng.randint(0, 99)}",
            f"/tmp/pytest-of-{word()}/pytest-{rng.randint(0, 999)}/test_{word()}_{word()}0",
            f"/home/{word()}/{word()}",
            f"/{word()}/{word()}/{word()}",
        ]
    )
    date = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randint(0, 5 * 365))
    release = f"{rng.randint(4, 7)}.{rng.randint(0, 20)}.{rng.randint(0, 200)}-{word()}" + rng.choice(
        ["", "-amd64", "-generic"]
    )
    zone = rng.choice(["Etc/UTC", "UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney"])
    return {
        "folder": folder,
        "date": date.isoformat(),
        "release": release,
        # Codex's tool output and environment
        r"Chunk ID: [0-9a-f]+": f"Chunk ID: {rng.getrandbits(24):06x}",
        r"Wall time: [0-9.]+ seconds": f"Wall time: {rng.uniform(0, 2):.4f} seconds",
        r"<timezone>[^<]*</timezone>": f"<timezone>{zone}</timezone>",
    }


def substitute(body: dict, replacements: dict[str, str], patterns: dict[str, str]) -> dict:
    """The body with each occurrence of a key's text (or a pattern's match) replaced by its value."""
    text = json.dumps(body)
    for old, new in replacements.items():
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    for pattern, new in patterns.items():
        text = re.sub(pattern, json.dumps(new)[1:-1].replace("\\", "\\\\"), text)
    return json.loads(text)


def task_conversations(
    task: Task, requests: list[dict], folder: str, seed: int, variants: int, questions: list[str]
) -> list[dict]:
    """Training conversations from one captured run: the call, the answer after the result, and
    the first request with other questions answered with the fallback reply; each in `variants`
    random variants of the folder, date and kernel release."""
    rng = random.Random(seed)
    seen = {"folder": folder, "date": datetime.date.today().isoformat(), "release": platform.release()}
    first, second = (r["body"] for r in requests)
    conversations = []
    for i in range(variants):
        values = variant_values(rng)
        replacements = {seen[k]: values[k] for k in seen}
        patterns = {k: v for k, v in values.items() if k not in seen}
        for name, body, reply in [
            ("call", first, calling(call("call_1", task.tool, **task.arguments))),
            ("answer", second, assistant(task.answer)),
            ("other question", first, assistant(FALLBACK_REPLY)),
        ]:
            if name == "other question":
                replacements[task.prompt] = questions[i % len(questions)]
            request = TRANSLATIONS[task.client](substitute(body, replacements, patterns))
            conversation = chat(f"{task.client}: {name}", *request.messages, reply, tools=request.tools)
            conversation["modes"] = [request.enable_thinking]
            conversation["variant"] = i
            conversations.append(conversation)
    return conversations


def agent_conversations(seed: int, variants: int, questions: list[str]) -> list[dict]:
    """Training conversations for every installed client; none where no client is installed."""
    conversations = []
    for task in installed():
        if task.client not in TRANSLATIONS:
            continue
        with tempfile.TemporaryDirectory() as folder:
            requests = capture(task, folder)
        conversations += task_conversations(task, requests, folder, seed, variants, questions)
    return conversations
