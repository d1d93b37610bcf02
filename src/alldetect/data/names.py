"""Parse C-NMC-2019 file names: ``UID_<subject>_<image>_<cell>_<all|hem>.bmp``.

A subject starting with ``H`` is a healthy donor (``UID_H10_14_1_hem.bmp``); other subjects are
ALL patients (``UID_11_10_1_all.bmp``). Some copies drop the ``UID_`` prefix or change case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})

_CNMC_NAME = re.compile(
    r"^(?:UID_)?(?P<subject>H?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)$",
    re.IGNORECASE | re.ASCII,  # ASCII: \d is 0-9 alone, so "UID_１" (a fullwidth one) is not patient 1 in disguise
)


@dataclass(frozen=True)
class CellName:
    subject: str
    image: str
    cell: str
    label: str  # "all" or "hem"


def parse_cell_name(name: str) -> CellName | None:
    """Parse a C-NMC cell file name (with or without folder and suffix); None if it is not one.

    >>> parse_cell_name("UID_H10_14_1_hem.bmp")
    CellName(subject='H10', image='14', cell='1', label='hem')
    >>> parse_cell_name("1234.bmp") is None
    True
    """
    match = _CNMC_NAME.match(PurePath(name).stem)
    if match is None:
        return None
    subject = match["subject"].upper()
    return CellName(subject, match["image"], match["cell"], match["label"].lower())


def is_image_file(path: PurePath) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
