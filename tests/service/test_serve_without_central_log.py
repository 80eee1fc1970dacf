"""``serve`` says so when it cannot open its central log.

A log ``serve`` cannot open (left owned by root, say) used to cost every
warning and traceback of the engine without a word: ``configure_logging``
returned None and ``serve`` went on. Now it is one ``warning:`` line on
stderr (the journal under systemd), and the service still runs.
"""

from __future__ import annotations

from pathlib import Path

from tests.lab import Lab
from tests.service.test_serve_process import Serve, write_config


def test_serve_warns_in_one_line_when_the_central_log_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "nas" / "CONFOCAL_01").mkdir(parents=True)
    (tmp_path / "nas" / "CONFOCAL_01" / ".exlab-nas").write_text("mounted\n")
    (tmp_path / "lab" / "CONFOCAL_01").mkdir(parents=True)  # not a missing disk: no line of its own
    lab = Lab(tmp_path, tmp_path / "lab", tmp_path / "nas", tmp_path / "state")
    config = write_config(lab)
    central = lab.state / "exlab-sync.log"
    central.mkdir(parents=True)  # opening it fails for any user, root included
    serve = Serve(config)
    try:
        code, _took = serve.stop()
    finally:
        serve.kill()
    assert code == 0
    assert serve.proc.stderr is not None
    assert serve.proc.stderr.read().strip() == (
        f"warning: cannot open the central log {central}: Is a directory; serve runs on, but its warnings "
        "and tracebacks are not kept (check the file's owner and mode)"
    )
