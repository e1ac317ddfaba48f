"""Real FIT files from public repositories (a corpus beside the checkout in CI): every one is refused with a reason.

``real-no-imu/`` holds device recordings without IMU messages (NoImuData),
``damaged/`` files that are truncated, never finalized, fail their CRC or use
undefined messages (CorruptFile). The corpus sits beside the checkout in CI;
on a user's machine it is absent and these tests skip.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from har_edge.agent.decode.fit import decode_fit, fit_file_complete
from har_edge.agent.errors import CorruptFile, InputError, NoImuData

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "fit"
EXPECTED = {"real-no-imu": NoImuData, "damaged": CorruptFile}


def _entries() -> list:
    index = CORPUS / "INDEX.json"
    if not index.is_file():
        return [pytest.param(None, id="corpus-absent")]
    return [pytest.param(e, id=e["file"].split("/", 1)[1]) for e in json.loads(index.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("entry", _entries())
def test_corpus_file_is_refused_with_a_reason(entry: dict | None, caplog: pytest.LogCaptureFixture) -> None:
    if entry is None:
        pytest.skip(f"the FIT corpus is not at {CORPUS} (it sits beside the checkout in CI only)")
    path = CORPUS / entry["file"]
    expected = EXPECTED[entry["file"].split("/", 1)[0]]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="har_edge.agent.decode"), pytest.raises(InputError) as info:
        decode_fit(path)
    assert isinstance(info.value, expected), f"{entry['file']} ({entry['problem']}): {info.value!r}"
    message = str(info.value)
    assert path.name in message
    assert time.monotonic() - started < 30
    # the fast reader handled it: no fallback because of a bug of ours
    assert "fast FIT reader failed" not in caplog.text
    if expected is NoImuData:
        assert "IMU logging" in message
        assert fit_file_complete(path)
