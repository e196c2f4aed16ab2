"""The README is the operator's manual: it must list every setting and every close code we use."""

from __future__ import annotations

import re
from pathlib import Path

from collab import closecodes

ROOT = Path(__file__).resolve().parents[1]


def test_readme_configuration_table_matches_the_settings():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from settings_table import table

    readme = (ROOT / "README.md").read_text()
    assert table() in readme, "run: python scripts/settings_table.py --write"


def test_readme_lists_every_close_code():
    readme = (ROOT / "README.md").read_text()
    for code in closecodes.DESCRIPTIONS:
        assert re.search(rf"^\| {code} \|", readme, re.M), code


def test_readme_quick_start_is_make_serve_and_make_test():
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
