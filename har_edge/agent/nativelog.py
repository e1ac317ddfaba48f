"""Quieting what native libraries print on file descriptor 2.

LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` once
per process, from C++, when the first interpreter allocates its tensors;
``TF_CPP_MIN_LOG_LEVEL`` does not reach that logger (measured with
ai_edge_litert 2.3.0). :func:`filtered_stderr` points fd 2 at a temporary file
around such a call, then writes back every line except the known banners, so
a real error from the runtime is still seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

BANNERS = ("Created TensorFlow Lite XNNPACK delegate for CPU",)


@contextmanager
def filtered_stderr(drop: tuple[str, ...] = BANNERS) -> Iterator[None]:
    """Run the block with fd 2 captured; lines holding one of ``drop`` are logged at DEBUG, the rest re-emitted."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to protect
        yield
        return
    try:
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the with below; creating it may fail
    except OSError:
        os.close(saved)
        yield
        return
    with tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().splitlines(keepends=True):
                text = line.decode("utf-8", "replace")
                if any(d in text for d in drop):
                    log.debug("runtime: %s", text.strip())
                else:
                    os.write(2, line)
