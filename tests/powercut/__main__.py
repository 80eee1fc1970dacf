"""``python -m tests.powercut --labs 20 --seed 1``: the long run of real power cuts.

First the rig's self-check, then every hooked cut point (mount: 14 points x
retain_cache on/off where valid, and 6 cuts after ``restore`` / ``retry
--accept-local``; rsync_ssh: 6 points), then ``--labs`` labs alternating the
transports, each cut ``--chain`` times at random instants. Prints each
scenario as it ends, then the report (``--report FILE`` also writes it).
Exit status 1 when a rule broke, a job was stuck or a scenario could not be
played. Needs root (loop devices, ext4 mounts, the sshd fixture's users).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from tests.powercut.harness import TRANSPORTS, long_run, report


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.powercut", description=__doc__.splitlines()[0])
    parser.add_argument("--labs", type=int, default=20, help="labs cut at random instants")
    parser.add_argument("--chain", type=int, default=3, help="random cuts in a row per lab")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help=f"of {','.join(TRANSPORTS)}")
    parser.add_argument("--no-points", action="store_true", help="random cuts only")
    parser.add_argument("--report", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    transports = tuple(args.transports.split(","))
    if not transports or not set(transports) <= set(TRANSPORTS):
        parser.error(f"--transports: a comma-separated list of {', '.join(TRANSPORTS)}")
    # SIGTERM and SIGINT end the run through its cleanup: engines killed by PID, disks unmounted.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    tally = long_run(labs=args.labs, seed=args.seed, transports=transports, chain=args.chain, points=not args.no_points)
    command = "python -m tests.powercut " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = report(tally, command=command.strip(), seed=args.seed)
    print(text)
    if args.report:
        args.report.write_text(text)
    return 1 if tally.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
