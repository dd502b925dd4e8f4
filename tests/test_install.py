"""Installs that fit their targets: triton stays optional, and the device distribution (runtime-dist/,
``ttrv-edge-runtime``) answers with an exported model without torch, transformers, peft or triton.

.ci/run also installs runtime-dist/ into a fresh virtual environment and answers an image with a real export; these
tests check the same things without a network: metadata, the files the wheel holds, imports with torch blocked.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from ttrv_edge.kernels import dispatch, reference

from ttrv_edge import __version__, kernels
from ttrv_edge.runtime import cli

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "runtime-dist"
HEAVY = ("torch", "transformers", "peft", "triton", "accelerate", "optimum", "typer", "rich")
RUNTIME_DEPENDENCIES = {"numpy", "pillow", "onnxruntime", "tokenizers", "jinja2"}
IMPORT_NAMES = {"numpy": "numpy", "PIL": "pillow", "onnxruntime": "onnxruntime", "tokenizers": "tokenizers",
                "jinja2": "jinja2"}  # fmt: skip
DIST_MODULES = {
    "ttrv_edge/__init__.py",
    "ttrv_edge/io/__init__.py",
    "ttrv_edge/io/answers.py",
    "ttrv_edge/io/images.py",
    "ttrv_edge/runtime/__init__.py",
    "ttrv_edge/runtime/cli.py",
    "ttrv_edge/runtime/preprocess.py",
    "ttrv_edge/runtime/runner.py",
} | {f"ttrv_edge/runtime/families/{path.name}" for path in (ROOT / "ttrv_edge/runtime/families").glob("*.py")}


def _toml(path: Path) -> dict:
    if tomllib is None:
        pytest.skip("tomllib is in the standard library from Python 3.11")
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _project(path: Path) -> dict:
    return _toml(path)["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


# --- triton is optional -------------------------------------------------------------------------------------------


def test_triton_comes_only_from_the_gpu_and_dev_extras():
    project = _project(ROOT / "pyproject.toml")
    assert "triton" not in {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert "triton" in {_name(r) for r in extras["gpu"]} and "triton" in {_name(r) for r in extras["dev"]}


def _import_time_nodes(tree: ast.AST):
    """The statements that run when the module is imported: not function bodies (class bodies do run)."""
    work = list(ast.iter_child_nodes(tree))
    while work:
        node = work.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        work.extend(ast.iter_child_nodes(node))


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or "", *(f"{node.module or ''}.{alias.name}" for alias in node.names)]
    return []


def test_nothing_imports_triton_when_the_package_is_imported():
    offenders = []
    for path in sorted([*(ROOT / "ttrv_edge").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        triton_module = path.parent.name == "kernels" and path.stem.endswith("_triton")
        for node in _import_time_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported(node):
                if not triton_module and (name.split(".")[0] == "triton" or name.endswith("_triton")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert offenders == []


@pytest.fixture
def without_triton(monkeypatch):
    """triton as if it were not installed: importing it (or our Triton modules) raises ImportError."""
    blocked = [m for m in sys.modules if m.split(".")[0] == "triton" or m.endswith("_triton")]
    for name in {"triton", "triton.language", *blocked}:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(dispatch, "TRITON_OPS_AVAILABLE", None)
    dispatch._triton_imports.cache_clear()
    yield
    dispatch._triton_imports.cache_clear()


def test_without_triton_auto_runs_torch_and_triton_is_a_clear_error(without_triton, monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is not what is missing here
    assert not dispatch.triton_available()
    assert dispatch.resolve_backend("auto", torch.zeros(1)) == "torch"
    assert dispatch.resolve_backend("auto", FakeCuda()) == "torch"
    with pytest.raises(ValueError, match=r"triton is not importable.*ttrv-edge\[gpu\]"):
        dispatch.resolve_backend("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="not importable"):
        kernels.group_rewards(torch.zeros(2, 3, dtype=torch.long), backend="triton")

    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 7, generator=generator), torch.tensor([0, 3, 6, 2])
    for got, want in zip(kernels.logprob_entropy(logits, targets), reference.logprob_entropy(logits, targets, 1.0)):
        torch.testing.assert_close(got, want)
    hidden, weight = torch.randn(4, 5, generator=generator), torch.randn(7, 5, generator=generator)
    got = kernels.linear_logprob_entropy(hidden, weight, targets)
    want = reference.linear_logprob_entropy(hidden, weight, targets, None, 1.0, chunk_rows=reference.DEFAULT_ROW_CHUNK)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ids = torch.tensor([[0, 1, 1, -1], [2, 2, 2, 2]])
    for a, b in zip(kernels.group_rewards(ids), reference.group_rewards(ids, 0.75, -1)):
        torch.testing.assert_close(a, b)
    logp, mask = torch.randn(2, 3, generator=generator), torch.ones(2, 3)
    loss, _stats = kernels.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(loss, reference.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask,
                                                         0.2, 0.2, None, 0.0, "token-mean")[0])  # fmt: skip


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = readme.split("Run the tests:", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


# --- the device distribution ---------------------------------------------------------------------------------------


def test_device_distribution_metadata_has_no_heavy_dependency():
    project = _project(DIST / "pyproject.toml")
    assert project["name"] == "ttrv-edge-runtime"
    assert {_name(r) for r in project["dependencies"]} == RUNTIME_DEPENDENCIES
    assert not {_name(r) for r in project["dependencies"]} & {*HEAVY, "optimum-quanto", "torchvision"}
    assert "optional-dependencies" not in project
    main = _project(ROOT / "pyproject.toml")
    assert project["scripts"]["ttrv-edge-answer"] == main["scripts"]["ttrv-edge-answer"]
    assert main["version"] == __version__  # the runtime's version is read from ttrv_edge.__version__
    setuptools = _toml(DIST / "pyproject.toml")["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "ttrv_edge.__version__"}


def test_device_distribution_links_the_main_package_files():
    src = DIST / "src"
    files = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    assert set(files) == DIST_MODULES
    for relative, path in files.items():
        assert path.is_symlink() and path.resolve() == (ROOT / relative).resolve(), relative


def _dist_imports() -> tuple[set[str], set[str]]:
    """(project modules, third-party distributions) imported anywhere in the distribution's files, at any depth."""
    modules = {m.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for m in DIST_MODULES}
    project, third_party = set(), set()
    for relative in DIST_MODULES:
        name = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        package = name.split(".") if relative.endswith("__init__.py") else name.split(".")[:-1]
        for node in ast.walk(ast.parse((ROOT / relative).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "ttrv_edge":
                    project.add(target)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(IMPORT_NAMES.get(top, top))
    return project - modules, third_party


def test_device_distribution_imports_only_its_own_modules_and_dependencies():
    missing, third_party = _dist_imports()
    assert missing == set(), f"imported but not in runtime-dist: {missing}"
    assert third_party <= RUNTIME_DEPENDENCIES, third_party - RUNTIME_DEPENDENCIES


def test_device_wheel_runs_with_torch_blocked(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline uses the installed setuptools")
    source = tmp_path / "runtime-dist"
    shutil.copytree(DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # links become files
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w",
         str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("ttrv_edge_runtime-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == DIST_MODULES
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        requires = {
            _name(line.split(":", 1)[1].strip()) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
        }
        assert requires == RUNTIME_DEPENDENCIES
        assert (
            "ttrv-edge-answer = ttrv_edge.runtime.cli:entry_point"
            in archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        )
        archive.extractall(tmp_path / "site")

    site = tmp_path / "site"
    code = (
        "import json, sys\n"
        f"for name in {HEAVY!r}: sys.modules[name] = None  # importing any of them now raises ImportError\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import ttrv_edge.io.answers, ttrv_edge.io.images, ttrv_edge.runtime.preprocess, ttrv_edge.runtime.runner\n"
        "from ttrv_edge.runtime.cli import main\n"
        f"outside = [m.__file__ for n, m in sys.modules.items() if n.startswith('ttrv_edge') and m is not None"
        f" and not m.__file__.startswith({str(site)!r})]\n"
        f"codes = [main(['--help']), main([{str(tmp_path)!r}, {str(tmp_path / 'x.png')!r}])]\n"
        f"heavy = sorted(n for n, m in sys.modules.items() if m is not None and n.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'codes': codes, 'outside': outside, 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"codes": [0, 2], "outside": [], "heavy": []}
    assert done.stderr.strip() == f"error: {tmp_path / 'x.png'}: no such file"


# --- the device entry point ----------------------------------------------------------------------------------------


REPORT = {"answer": "B", "display": "B. square", "text": "B", "seconds": 0.25}


def test_answer_entry_point_passes_the_options_and_prints_the_answer(monkeypatch, capsys, tmp_path):
    from ttrv_edge.runtime import runner

    calls = []

    def fake_report(directory, image, question, **options):
        calls.append((directory, image, question, options))
        return REPORT

    monkeypatch.setattr(runner, "answer_report", fake_report)
    argv = [str(tmp_path), "photo.jpg", "--question", "Which shape is red?", "--choices", "circle, square"]
    assert cli.main([*argv, "--int8", "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert capsys.readouterr().out == "B. square  (text: 'B', 0.25 s)\n"
    directory, image, question, options = calls[0]
    assert (directory, image) == (tmp_path, Path("photo.jpg"))
    assert (question.text, question.choices) == ("Which shape is red?", ("circle", "square"))
    assert options == {"int8": True, "max_new_tokens": 4, "threads": 1}
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == REPORT
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    assert cli.main([str(tmp_path), "p.jpg", "--labels", str(tmp_path / "labels.txt")]) == 0
    assert calls[-1][2].labels == ("cat", "dog") and calls[-1][3] == {"int8": False, "max_new_tokens": 16, "threads": 0}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [([], "required"), (["d", "i.png", "--choices", "a"], "--choices"), (["d", "i.png", "--numeric", "--choices",
     "a,b"], "at most one"), (["d", "i.png", "--max-new-tokens", "x"], "invalid int")],
)  # fmt: skip
def test_answer_entry_point_errors_are_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err and captured.err.count("\n") == 1
    assert captured.out == ""
