"""The platform's error base classes, on the ground floor (this module imports nothing from
``foveation``, so every layer, ``config`` included, can derive its errors from them).

Every error a user of the platform can act on derives from :class:`FoveationError`, so the jobs'
command lines (``jobs._cli.run_job``) need one handler, not a list of types per job that drifts
as modules add errors: it prints the message on one line and exits non-zero, while anything
else (a bug) keeps its traceback. Bad input is an :class:`InputError`, whose message reads
``"<input>: <what was expected>"`` (``patches.fovs: must be strictly increasing``,
``s3://b/x.svs: truncated TIFF ...``). A run that could not start or finish (training, ingest,
a sweep) is a :class:`FoveationError` of its own module that also stays a ``RuntimeError``.
"""

from __future__ import annotations


class FoveationError(Exception):
    """An error the platform reports to its user: the message names what failed and why, and
    says what to do where it can. The jobs print it without a traceback."""


class InputError(FoveationError, ValueError):
    """Bad input (a config value, a data file, a checkpoint, an image, a slide, an argument):
    the message reads ``"<input>: <what was expected>"``. A ``ValueError``, as every input
    error of the platform was before it had a base, so ``except ValueError`` still sees it."""


class DataError(InputError):
    """Bad input data (a raw slide set, a slide list, an annotation, a manifest, a folder of
    slides): names the file (or prefix) and what was expected. Here rather than in ``data``
    because ingest, training, evaluation and prediction all raise or catch it."""


def failure_lines(failed: dict[str, str], verb: str, reasons: bool, record: str) -> list[str]:
    """A batch job's summary lines for the items that ``failed`` (id -> why): one per item,
    ``"  <verb> <id>: <why>"``, or, where the job's log already said each as it came
    (``reasons=False``), one line naming them and where the reasons are kept (``record``)."""
    if reasons:
        return [f"  {verb} {key}: {why}" for key, why in sorted(failed.items())]
    if not failed:
        return []
    return [f"  failed (each said above, and in {record}): {', '.join(sorted(failed))}"]
