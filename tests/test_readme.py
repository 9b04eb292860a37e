"""The README's promises that can drift: the Quick start commands, CI's command, the configuration reference."""

import re
from pathlib import Path

from s2t.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each Quick start command is one line"
    assert commands[0].endswith("s2t run")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quick_start_commands()[1] in ci_lines


def test_configuration_reference_is_current():
    section = README.split("<!-- config-reference:start", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    table = section.split("-->\n", 1)[1]
    assert table == reference_markdown(), "regenerate the README table from s2t.config.reference_markdown()"
