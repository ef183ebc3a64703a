"""Memory-heavy steps of a build (export, engine build) run in a process of their own.

A process gives back everything it held when it exits; a long-lived one does not. Measured on SDXL
fp16 (5.1 GB of weights): after an in-process dynamo export the exporter's IR still referenced the
freed UNet's parameters, so 5.7 GB stayed resident into the next stage's export (11.2 GB peak instead
of 6.0 GB), and glibc kept the heap the engine builder had used (23.6 GB peak instead of 15.9 GB). A
child for each step starts empty, its peak is its own, and a child killed for memory is reported as
such instead of taking the build with it.

The parent pickles ``(module, function, args)`` to the child's stdin (``python -m atedm_export.isolated``);
the child calls ``module.function(*args)`` and prints one JSON line: the function's result and the
child's own peak resident bytes (``VmHWM``). User errors come back
as their one-line message.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .errors import AtedmError

_ERROR = "error: "


@dataclass(frozen=True)
class Isolated:
    result: Any
    peak_rss: int  # bytes


def run_isolated(function: Any, *args: Any, error: type[AtedmError] = AtedmError, what: str = "step",
                 env: dict[str, str] | None = None) -> Isolated:
    """``function(*args)`` in a fresh Python process (``env``: variables set for it, before it imports anything);
    its JSON-able result and peak memory, or ``error``."""
    job = pickle.dumps((function.__module__, function.__qualname__, args))
    done = subprocess.run([sys.executable, "-m", __name__], input=job, capture_output=True, check=False,
                          env={**os.environ, **env} if env else None)
    stdout, stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    if done.returncode == 0:
        return Isolated(**json.loads(stdout.strip().splitlines()[-1]))
    messages = [line[len(_ERROR):] for line in stderr.splitlines() if line.startswith(_ERROR)]
    if messages:
        raise error(messages[-1])
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise error(f"the {what} process was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else ""))
    last = stderr.strip().splitlines()[-1:] or ["no output"]
    raise error(f"the {what} process failed (exit {done.returncode}): {last[0]}")


def _child() -> int:
    module, name, args = pickle.loads(sys.stdin.buffer.read())
    function = importlib.import_module(module)
    for part in name.split("."):
        function = getattr(function, part)
    try:
        result = function(*args)
    except AtedmError as exc:
        print(f"{_ERROR}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission: the file and the reason, in one line
        print(f"{_ERROR}{exc.strerror or exc} ({exc.filename or 'no file'})", file=sys.stderr)
        return 2
    print(json.dumps({"result": result, "peak_rss": _peak_rss()}))
    return 0


def _peak_rss() -> int:
    """This process's own peak resident bytes.

    ``VmHWM`` starts afresh at ``exec``. ``ru_maxrss`` would not: Linux carries it over from the forked
    parent, so a child of a 1.2 GB process never reports less than 1.2 GB.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: the best there is


if __name__ == "__main__":
    sys.exit(_child())
