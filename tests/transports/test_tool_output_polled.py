"""run_tool's ``stdout_every``: a chatty tool's output read a few times a second from memory, not line by line.

rsync prints a progress line a file; read through a pipe, its 20,000 lines for
20,000 files woke the event loop thousands of times (0.2-0.3 CPU-seconds of the
service on a two-core PC whose cores the push needs). Now its output goes to an
anonymous file in memory (never the disk: a full /tmp on a full instrument disk
must not stop the push that frees it), read every ``stdout_every`` seconds.
"""

from __future__ import annotations

import asyncio
import sys

from exlab_wizard.sync.transports._process import POLLED_TAIL_BYTES, run_tool

# What its output is, then 20,000 lines, one write each, then a last line after a pause.
CHATTY = (
    "import os, sys, time\n"
    "os.write(1, os.readlink('/proc/self/fd/1').encode() + b'\\n')\n"
    "for i in range(20000):\n"
    "    os.write(1, b'line %05d\\r' % i)\n"
    "time.sleep(0.3)\n"
    "os.write(1, b'the end\\n')\n"
    "sys.exit(int(sys.argv[1]))\n"
)


async def test_the_whole_output_reaches_the_callback_in_a_few_pieces_and_the_result_keeps_its_tail() -> None:
    pieces: list[bytes] = []
    result = await run_tool([sys.executable, "-c", CHATTY, "3"], on_stdout=pieces.append, stdout_every=0.1)
    whole = b"".join(pieces)
    where, _, lines = whole.partition(b"\n")
    assert where.startswith(b"/memfd:"), where  # in memory, never on a disk
    assert lines == b"".join(b"line %05d\r" % i for i in range(20000)) + b"the end\n"
    assert len(pieces) < 50  # not a piece a line
    assert result.returncode == 3
    assert len(result.stdout) == POLLED_TAIL_BYTES and whole.endswith(result.stdout)


async def test_a_tool_stopped_on_purpose_still_gives_what_it_printed() -> None:
    pieces: list[bytes] = []
    script = "import os, time\nos.write(1, b'before the stop\\n')\ntime.sleep(30)\n"
    result = await asyncio.wait_for(
        run_tool([sys.executable, "-c", script], on_stdout=pieces.append, stdout_every=0.1, stop_after=1.0), 20
    )
    assert result.stopped and not result.timed_out
    assert b"".join(pieces) == result.stdout == b"before the stop\n"
