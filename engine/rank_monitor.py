"""Each rank of a worker group as the front process hears it: heartbeats on stderr, and which rank ended."""

import re
import socket
import time
from typing import Any

from .config import HEARTBEAT, HEARTBEAT_S, EngineConfig, hostfile_hosts

# What mlx.launch writes when one rank of the group ends; the first one named is the one that failed.
RANK_ENDED = re.compile(r"Node with rank (\d+) (?:exited|was killed)")


class RankMonitor:
    """Reads the worker's stderr for each rank's heartbeat (when, CPU seconds, CPU share) and the rank that ended."""

    STALE_S = 3 * HEARTBEAT_S  # a rank silent this long is shown as stalled

    def __init__(self, config: EngineConfig) -> None:
        self.hosts = (
            hostfile_hosts(config.hostfile, config.backend)
            if config.hostfile
            else [socket.gethostname()] * config.ranks
        )
        self.lost: int | None = None
        self.beats: dict[int, tuple[float, float, float | None]] = {}  # rank: (when, CPU seconds, CPU share)

    def reset(self) -> None:
        """A new worker (group) is starting."""
        self.lost = None
        self.beats.clear()

    def is_heartbeat(self, line: str) -> bool:
        """Take the line if it is a heartbeat."""
        if not line.startswith(HEARTBEAT):
            return False
        try:
            rank_text, cpu_text = line.removeprefix(HEARTBEAT).split()
            rank, cpu = int(rank_text), float(cpu_text)
        except ValueError:
            return True  # a line cut by another rank's output
        now = time.monotonic()
        when, last_cpu, share = self.beats.get(rank, (now, cpu, None))
        self.beats[rank] = (now, cpu, (cpu - last_cpu) / (now - when) if now > when else share)
        return True

    def ended(self, line: str) -> bool:
        """Whether the line says, for the first time since the start, that a rank ended."""
        if (found := RANK_ENDED.search(line)) and self.lost is None:
            self.lost = int(found[1])
            return True
        return False

    def name(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"

    def silent(self) -> str | None:
        """The rank heard from least recently, and for how long, when there are several."""
        if len(self.beats) < 2:
            return None
        rank, (when, _, _) = min(self.beats.items(), key=lambda item: item[1][0])
        return f"{self.name(rank)} silent for {time.monotonic() - when:.1f} s"

    def states(self, state: str, pid: int | None, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Each rank's host, pid, state and share of a core in use (from its heartbeat).

        The state is the group's, but "gone" for the rank whose end took the group down and
        "stalled" for a rank whose heartbeat stopped (stopped, or starved of CPU).
        """
        members = info.get("ranks")
        if not members:  # one worker, or a group still starting
            alone = len(self.hosts) == 1
            members = [{"rank": r, "host": h, "pid": pid if alone else None} for r, h in enumerate(self.hosts)]
        now = time.monotonic()
        states = []
        for m in members:
            when, _, cpu = self.beats.get(m["rank"], (now, 0.0, None))
            rank_state = state
            if m["rank"] == self.lost:
                rank_state = "gone"
            elif state == "ready" and now - when > self.STALE_S:
                rank_state = "stalled"
            states.append({**m, "state": rank_state, "cpu": cpu})
        return states
