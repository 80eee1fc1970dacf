"""``python -m tests.torture --rounds 20 --kills 100 --report docs/reliability.md``: the long run.

``--transports mount,rsync_ssh,rclone`` adds rclone sftp rounds (default: mount and rsync_ssh).

Prints each fault as it is injected, then the report; ``--report`` also writes it.
Needs root (loop mounts, chattr, the sshd fixture's users).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from tests.torture.harness import TRANSPORTS, report, torture


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs of the service over all rounds")
    parser.add_argument("--runs", type=int, default=4, help="runs per round")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--transports", default="mount,rsync_ssh", help=f"rounds alternate these, of {','.join(TRANSPORTS)}"
    )
    parser.add_argument("--parallel", type=int, default=1, help="rounds played at once")
    parser.add_argument("--report", type=Path, help="write the report here (e.g. docs/reliability.md)")
    args = parser.parse_args(argv)
    transports = tuple(args.transports.split(","))
    if not transports or not set(transports) <= set(TRANSPORTS):
        parser.error(f"--transports: a comma-separated list of {', '.join(TRANSPORTS)}")
    # SIGTERM (and SIGINT, which a background shell job ignores) end the run through its cleanup:
    # servers stopped by PID, loop file systems unmounted.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    tally = torture(
        rounds=args.rounds,
        kills=args.kills,
        seed=args.seed,
        runs=args.runs,
        transports=transports,
        parallel=args.parallel,
    )
    command = "python -m tests.torture " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = report(tally, command=command.strip(), seed=args.seed)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 1 if tally.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
