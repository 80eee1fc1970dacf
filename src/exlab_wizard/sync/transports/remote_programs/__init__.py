"""Programs the rsync_ssh transport runs on the remote host, kept as real files.

``remote_hash.py`` (hash a remote run folder) and ``remote_watch.py`` (hash
files as a push completes them) are sent as ``python3 -c <source>``;
``keep_previous.sh`` as ``sh -c <source>``, each wrapped by
``rsync_ssh.remote_line`` into one line a csh login shell passes on too. They use the remote's standard
library only and must stay valid for the oldest python3 a NAS may carry: they
import nothing from this package. Each file's opening comment is its contract
(arguments, output, exit codes). The tests compile every one of them.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["PROGRAMS", "remote_program"]

#: The file names of the programs in this package.
PROGRAMS = ("keep_previous.sh", "remote_hash.py", "remote_watch.py")


def remote_program(name: str) -> str:
    """The source text of the program ``name`` (one of :data:`PROGRAMS`)."""
    if name not in PROGRAMS:
        raise ValueError(f"no remote program {name!r}")
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
