"""The README's examples work and its names are current: every ```python block runs (demo model, small settings, in
a folder holding ``photo.jpg``), every option the command-line section names exists, the input/output options it
lists are exactly ``adapt``'s, and the module paths it names exist."""

import re
import runpy
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main

from ttrv_edge.cli import app
from ttrv_edge.config import TTRVConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def _section(heading: str) -> str:
    """The README text from ``heading`` to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = README.index(heading + "\n")
    rest = README[start + len(heading) + 1 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


def _options(command: str | None = None) -> set[str]:
    """The options of ``command``, or of every command and of ``ttrv-edge`` itself (``--help`` included)."""
    group = typer.main.get_command(app)
    commands = [group.commands[command]] if command else [group, *group.commands.values()]
    found = {opt for c in commands for p in c.params for opt in [*p.opts, *p.secondary_opts] if opt.startswith("--")}
    return found | {"--help"}


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 2 and all("TTRVModel" in block for block in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    shutil.copy(ROOT / "examples" / "scene.png", tmp_path / "photo.jpg")  # PIL reads it by content, not by name
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"readme_block_{index + 1}.py"
    script.write_text(PYTHON_BLOCKS[index], encoding="utf-8")
    runpy.run_path(str(script), run_name="__readme__")


def test_command_line_section_names_only_real_options():
    section = _section("### Command line")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section))
    assert named and not named - _options(), sorted(named - _options())
    config_flags = {"--" + f.name.replace("_", "-") for f in fields(TTRVConfig)}
    listed = re.search(r"\*\*Inputs and outputs:\*\*(.*?)\n- \*\*", section, flags=re.DOTALL).group(1)
    listed_flags = set(re.findall(r"--[a-z][a-z0-9-]*", listed))
    adapt_flags = {o for o in _options("adapt") if not o.startswith("--no-")} - config_flags - {"--help"}
    assert listed_flags == adapt_flags


def test_layout_names_existing_modules_and_no_old_paths():
    tree = re.search(r"```\n(.*?)```", _section("## Layout"), flags=re.DOTALL).group(1)
    folders: list[str] = []
    for line in tree.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = folders[:depth]
        path = ROOT.joinpath(*folders, name)
        assert path.exists(), path
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    for old in ("TTRVAdapter", "onnx_runner", "onnx_graphs", "ttrv_edge/memory.py", "onnx_commands"):
        assert old not in README and old not in (ROOT / "docs" / "method.md").read_text(), old
