"""On the PYTHONPATH of every node of the multi-node test cluster (``tests/integration/
test_multinode.py``): each Ray process there (raylet-started workers, actors, Train workers)
sees the driver's working directory as another machine would: not there. Listing it (Python's
import system scans it: Ray puts the driver's directory on every worker's ``sys.path``) says
FileNotFoundError, as a missing directory does; opening, creating, renaming or removing a file
under it is refused and recorded in ``FOVEATION_VIOLATIONS``. On one machine every node shares
the disk, so a local path handed from the driver to a worker would silently work here and fail
on a real cluster; with this hook it fails here too, and the test that ran it fails on the
record."""

import os
import sys

_FORBIDDEN = os.environ.get("FOVEATION_FORBIDDEN_DIR")
_LOG = os.environ.get("FOVEATION_VIOLATIONS")
_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove"}

if _FORBIDDEN and _LOG:
    _PREFIX = os.path.realpath(_FORBIDDEN) + os.sep

    def _guard(event, args):
        if event not in _EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return  # a file descriptor
        full = os.path.abspath(path) + os.sep
        if not full.startswith(_PREFIX):
            return
        if event in ("os.listdir", "os.scandir") or full == _PREFIX:
            raise FileNotFoundError(2, "No such file or directory (not on this node)", path)
        with open(_LOG, "a") as f:  # outside the driver's directory: not refused
            f.write(f"pid {os.getpid()}: {event} {path}\n")
        raise PermissionError(f"{path}: under the driver's directory, not on this node")

    sys.addaudithook(_guard)
