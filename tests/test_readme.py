"""The README says what runs: every setting of the server is in its settings table, under its flag and variable."""

from __future__ import annotations

from pathlib import Path

from vlm_tools.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_settings_table() -> None:
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `--"))
    missing = []
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flag = str(extra.get("flag") or "--" + name.replace("_", "-"))
        if name == "api_key":  # read from the variable --api-key-env names, and said there
            flag = "--api-key-env"
        for needle in (f"`{flag}`", f"`VLM_TOOLS_{name.upper()}`" if name != "api_key" else "VLM_TOOLS_API_KEY"):
            if needle not in table:
                missing.append(needle)
    assert not missing, f"not in README's settings table: {missing}"
