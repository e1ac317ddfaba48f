"""Release versions, ordered the way semver orders them.

``1.10.0 > 1.9.2 > 1.9.2-rc.2 > 1.9.2-rc.1``; build metadata (``+abc``) does not
order. ``1.2`` is read as ``1.2.0``. Anything else is not a release version
and is ignored (with a debug log) when looking for the newest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEMVER = re.compile(r"^v?(?P<core>\d+(?:\.\d+){0,2})(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.-]+))?$")


@dataclass(frozen=True, order=True)
class VersionKey:
    core: tuple[int, int, int]
    is_release: bool  # a pre-release orders before its release
    pre: tuple[tuple[int, int | str], ...]

    @property
    def prerelease(self) -> bool:
        return not self.is_release


def _pre_part(p: str) -> tuple[int, int | str]:
    # numeric identifiers order before alphanumeric ones, and numerically among themselves
    return (0, int(p)) if p.isdigit() else (1, p)


def parse_version(text: str) -> VersionKey | None:
    m = _SEMVER.match(text.strip())
    if not m:
        return None
    nums = [int(x) for x in m["core"].split(".")]
    nums += [0] * (3 - len(nums))
    pre = m["pre"]
    return VersionKey(
        core=(nums[0], nums[1], nums[2]),
        is_release=pre is None,
        pre=tuple(_pre_part(p) for p in pre.split(".")) if pre else (),
    )


def newer_than(a: str, b: str) -> bool:
    """True when version ``a`` orders after ``b``; a text that is no version orders before every version."""
    ka, kb = parse_version(a), parse_version(b)
    if ka is None:
        return False
    return kb is None or ka > kb
