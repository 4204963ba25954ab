"""The entry point of `python -m pipeline` and of the `pipeline` console script.

A signal can come at any moment, the first tenth of a second of importing included, and must
never end in a traceback or a silent kill: until the CLI has loaded there is nothing to save, so
it leaves at once with one line and 128 + the signal; from then on the CLI turns signals into
exceptions its commands map to their exit codes."""

import os
import signal
from types import FrameType


def _leave(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"error: interrupted while starting; nothing was done\n")
    os._exit(128 + signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored (nohup): stays ignored
            signal.signal(signum, _leave)
    from pipeline.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
