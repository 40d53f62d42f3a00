from pathlib import Path

from lmcache.cli import config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_table_matches_the_keys() -> None:
    text = README.read_text()
    start = text.index("<!-- config-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == config_reference(), (
        "README config table is stale: regenerate with `lmcache config-reference`"
    )
