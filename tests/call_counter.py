"""Count the calls of chosen functions during a real run, with a profile hook: the functions run
unchanged (nothing is replaced), so a count is what the code really did.

As a script, it runs the `spindle` command line under the hook and writes the counts of the config
functions (parse, validate, check_world_size) as JSON:

    python tests/call_counter.py COUNTS.json train CONFIG [options]
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType


@contextlib.contextmanager
def counting_calls(**functions: Callable) -> Iterator[Counter]:
    """Count, by the given names, the calls of ``functions`` on every thread of this process while
    the block runs."""
    # By identity: hashing a code object hashes its contents, which would slow every call down.
    watched = {id(function.__code__): name for name, function in functions.items()}
    counts: Counter = Counter(dict.fromkeys(functions, 0))

    def hook(frame: FrameType, event: str, argument: object) -> None:
        if event == "call" and id(frame.f_code) in watched:
            counts[watched[id(frame.f_code)]] += 1

    previous = sys.getprofile()
    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        yield counts
    finally:
        sys.setprofile(previous)
        threading.setprofile(None)  # type: ignore[arg-type]


def config_functions() -> dict[str, Callable]:
    from spindle.runtime import config

    return {"parse": config.config_from_dict, "validate": config.validate,
            "check_world_size": config.check_world_size}


def main(counts_path: str, arguments: list[str]) -> int:
    from spindle.launch.cli import main as cli_main

    sys.argv = [str(Path(sys.executable).with_name("spindle")), *arguments]  # as the console script sees it
    with counting_calls(**config_functions()) as counts:
        code = cli_main(arguments)
    Path(counts_path).write_text(json.dumps(dict(counts)), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
