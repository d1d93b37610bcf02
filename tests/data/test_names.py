import pytest

from alldetect.data.names import CellName, parse_cell_name


@pytest.mark.parametrize("name, expected", [
    ("UID_11_10_1_all.bmp", CellName("11", "10", "1", "all")),
    ("UID_H10_14_1_hem.bmp", CellName("H10", "14", "1", "hem")),
    ("UID_h22_3_12_HEM.png", CellName("H22", "3", "12", "hem")),
    ("11_10_1_all.bmp", CellName("11", "10", "1", "all")),  # copies without the UID_ prefix
    ("some/folder/UID_57_29_1_all.bmp", CellName("57", "29", "1", "all")),
    ("UID_57_29_1_all", CellName("57", "29", "1", "all")),  # Patient_ID without suffix
])
def test_parses_every_cnmc_name_form(name, expected):
    assert parse_cell_name(name) == expected


@pytest.mark.parametrize("name", ["1234.bmp", "UID_11_10_all.bmp", "UID_11_10_1_xyz.bmp", "cell.png", ""])
def test_other_names_are_not_cell_names(name):
    assert parse_cell_name(name) is None

