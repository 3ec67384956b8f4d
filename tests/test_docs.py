"""The README stays true to the code it describes."""

from __future__ import annotations

from pathlib import Path

from moments.core.config import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_is_the_settings_table():
    assert settings_table() in README.read_text(), "regenerate it with `moments config`"
