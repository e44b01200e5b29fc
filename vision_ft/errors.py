"""User-facing errors.

Every error a user can cause by what they wrote (config, data, paths, adapters)
is a :class:`VisionFTError`. The CLI prints its message without a traceback and
exits with status 2; the message names the key or file to fix.
"""

from __future__ import annotations


class VisionFTError(Exception):
    """An error the user can fix; the message says how."""


class ConfigError(VisionFTError, ValueError):
    """A config value is unknown, missing or inconsistent."""


class DataError(VisionFTError, ValueError):
    """Data on disk is missing, malformed or inconsistent with the config."""


class BackboneError(VisionFTError, RuntimeError):
    """Backbone weights cannot be built or loaded as configured."""


class AdapterError(VisionFTError, ValueError):
    """An adapter or checkpoint does not fit the model it is loaded into."""


class TrainingError(VisionFTError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


class WriteError(VisionFTError, OSError):
    """An output file could not be written (disk full, permissions); what was there is unchanged."""


def first_line(e: BaseException, *, root_cause: bool = False, lines: int = 2) -> str:
    """The first ``lines`` lines of an exception's message (at most 300 characters), for one-line errors.

    ``root_cause`` first follows ``__cause__`` / ``__context__`` to the innermost exception (the one a
    wrapper such as jsonargparse's hides). An empty message gives the exception's type name.
    """
    seen = set()
    while root_cause and (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return " ".join(text[:lines])[:300] if text else type(e).__name__
