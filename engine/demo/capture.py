"""Record the requests a real client CLI sends, from a tiny stand-in server that plays a scripted tool loop.

Used at training time so that the demo model learns a client's prompts as that client sends them,
without the repository holding a copy of the client's text. Run by hand to look at them:

    .venv/bin/python -m mlx_tui.engine.demo.capture claude
"""

import json
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def anthropic_frames(reply: dict) -> list[tuple[str, dict]]:
    """An Anthropic SSE stream that answers with `reply`: {"text": ...} or {"tool": name, "input": {...}}."""
    message: dict[str, Any] = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": "capture",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    }
    if "tool" in reply:
        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": reply["tool"], "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(reply["input"])}
        stop = "tool_use"
    else:
        block, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": reply["text"]}, "end_turn"
    return [
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 1},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def responses_frames(reply: dict) -> list[tuple[str, dict]]:
    """An OpenAI Responses SSE stream that answers with `reply`: {"text": ...} or {"tool": name, "input": {...}}."""
    response = {
        "id": f"resp_{uuid.uuid4().hex[:24]}",
        "object": "response",
        "created_at": 0,
        "model": "capture",
        "status": "in_progress",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if "tool" in reply:
        item = {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex[:24]}",
            "call_id": f"call_{uuid.uuid4().hex[:24]}",
            "name": reply["tool"],
            "arguments": json.dumps(reply["input"]),
            "status": "completed",
        }
    else:
        item = {
            "type": "message",
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": reply["text"], "annotations": []}],
        }
    usage = {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 1,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 2,
    }
    done = dict(response, status="completed", output=[item], usage=usage)
    return [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": response}),
        (
            "response.output_item.done",
            {"type": "response.output_item.done", "sequence_number": 1, "output_index": 0, "item": item},
        ),
        ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": done}),
    ]


class Recorder:
    """A loopback HTTP server that records each POST body and answers the n-th with the n-th scripted reply."""

    def __init__(self, replies: list[dict]):
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self.path.startswith(("/v1/messages", "/v1/responses")) or "count_tokens" in self.path:
                    return self.reply_json({"input_tokens": 1})
                recorder.requests.append({"path": self.path, "body": body})
                reply = recorder.replies[min(len(recorder.requests), len(recorder.replies)) - 1]
                frames = (responses_frames if self.path.startswith("/v1/responses") else anthropic_frames)(reply)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for event, data in frames:
                    self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

            def do_GET(self) -> None:
                self.reply_json({"data": [], "object": "list"})

            def reply_json(self, data: Any) -> None:
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "Recorder":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    from mlx_tui.engine.demo import agents

    with tempfile.TemporaryDirectory() as folder:
        task = agents.TASKS[sys.argv[1]]
        print(json.dumps(agents.capture(task, folder), indent=1))
