"""Kill points for the crash tests: the process kills itself (SIGKILL) at a named point, once.

``LOCALBOT_KILL_AT`` names the point and ``LOCALBOT_KILL_ONCE`` a file that marks it as used
(created just before the kill, so the restarted process runs on).  Unset, nothing happens.  The
points are the moments the durability guarantee is about:

- ``received``: the platform handed the message over; nothing is stored yet;
- ``stored``: the message is stored, its answer not started;
- ``streaming``: part of the answer is shown on the platform (and its id recorded);
- ``replied``: the whole answer is stored, its final delivery not done.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

POINTS = ("received", "stored", "streaming", "replied")


@dataclass(frozen=True, slots=True)
class KillPoints:
    point: str | None = None
    once_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KillPoints:
        point = env.get("LOCALBOT_KILL_AT") or None
        if point is not None and point not in POINTS:
            raise ValueError(f"LOCALBOT_KILL_AT must be one of {', '.join(POINTS)}")
        once = env.get("LOCALBOT_KILL_ONCE")
        return cls(point, Path(once) if once else None)

    def reached(self, name: str) -> None:
        """Die here if this is the chosen point (and it was not used yet)."""
        if name != self.point:
            return
        if self.once_file is not None:
            try:
                os.close(os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
