"""The README stays true: every config key is documented, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from sparkembed.config import EmbedConfig

ROOT = Path(__file__).resolve().parents[1]


def config_keys() -> list[str]:
    keys = []
    for section, field in EmbedConfig.model_fields.items():
        for name in field.annotation.model_fields:  # type: ignore[union-attr]
            if (section, name) != ("auth", "key"):  # never set by users
                keys.append(f"{section}.{name}")
    return keys


def test_every_config_key_is_in_the_readme_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in readme.split("### Configuration reference")[1]]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert quickstart is not None
    commands = [line.split("#")[0].strip() for line in quickstart.group(1).splitlines() if line.strip()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./scripts/test.sh\n" in ci
