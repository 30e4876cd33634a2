"""What a newcomer meets at install time: the supported transformers range, the adapter, the model check.

The checks run the real CLI in a subprocess, as a user starts it. A transformers release outside the
range is simulated by putting a fake `transformers` distribution (and a package that fails to import)
ahead of site-packages: the CLI must name the installed version, the supported range and the pip
command in one line, before it imports transformers or loads a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
from pathlib import Path

import pytest

from dg_edit import hf_adapter

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], extra_path: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "dg_edit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def future_transformers(tmp_path) -> Path:
    """A site dir holding transformers 99.0.0's metadata and a package that breaks when imported."""
    dist = tmp_path / "transformers-99.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 99.0.0\n")
    pkg = tmp_path / "transformers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('this transformers release changed everything')\n")
    return tmp_path


def pyproject_spec(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    line = next(d for d in deps if re.match(rf"{name}\b", d))
    return line[len(name):]


def test_the_range_checked_at_run_time_is_pyprojects():
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(hf_adapter.supported_range()) == SpecifierSet(pyproject_spec("transformers"))
    assert hf_adapter.check_transformers()  # the installed release is inside it


@pytest.mark.parametrize("argv", [
    ["infill", "examples/sample.py", "--at", "13:18"],
    ["info"],
    ["lsp"],
    ["serve", "--port", "0"],
])
def test_a_transformers_outside_the_range_is_one_line_with_its_fix(future_transformers, argv):
    proc = run_cli(argv, future_transformers)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line: no traceback, nothing imported that broke
    line = lines[0]
    assert "transformers 99.0.0 is installed" in line
    assert hf_adapter.supported_range() in line
    assert "pip install 'transformers" in line
    assert proc.stdout == ""


def test_a_model_that_is_not_diffusion_gemma_is_named(tiny_model_dir, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    proc = run_cli(["info", "--model", str(other)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "'llama'" in proc.stderr and "diffusion_gemma" in proc.stderr


# Reaching below transformers' public API anywhere but the adapter is how an upstream rename broke
# every fresh install: these are the internals dg-edit uses, and the one file allowed to use them.
INTERNALS = re.compile(
    r"past_key_values\s*=|\bcache\s*=\s*\w*cache\b|model \. model\b|DynamicCache"
    r"|activate_past_recording|batch_repeat_interleave|create_masks_for_generate"
    r"|create_diffusion_decoder_attention_mask|lazy_initialization|final_logit_softcapping|embed_tokens")


def code_lines(path: Path) -> dict[int, str]:
    """Each line's code tokens joined by spaces: strings and comments left out (docs may name internals)."""
    lines: dict[int, list[str]] = {}
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
                lines.setdefault(tok.start[0], []).append(tok.string)
    return {no: " ".join(parts) for no, parts in lines.items()}


def test_the_internals_scan_sees_code_not_prose(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""DynamicCache in a docstring."""\nout = model.model.decoder(x, past_key_values=c)  # x\n')
    assert [no for no, code in code_lines(sample).items() if INTERNALS.search(code)] == [2]


def test_only_the_adapter_touches_transformers_internals():
    offenders = []
    for folder in ("dg_edit", "lsp", "tui", "model", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "hf_adapter.py":
                continue
            for no, code in code_lines(path).items():
                if INTERNALS.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {code}")
    assert not offenders, "use dg_edit.hf_adapter instead:\n" + "\n".join(offenders)


# The core never imports the CLI: `dg_edit.cli` only dispatches; start-up code the front ends and
# `dg_edit.distributed` share lives in `dg_edit.startup`. Front ends may hand their `__main__` to the
# CLI's dispatch (`python -m dg_edit.serve`), nothing more.
CORE = ROOT / "dg_edit"
FRONT_END_FOLDERS = (ROOT / "dg_edit" / "serve", ROOT / "lsp", ROOT / "tui", ROOT / "model")


def cli_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, under a `__main__` guard) of each import of `dg_edit.cli` in `path`, relative ones included."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.parent.relative_to(ROOT).parts
    package = ("dg_edit", *package[1:]) if package[0] == "dg_edit" else ("dg_edit", *package)
    found: list[tuple[int, bool]] = []

    def is_main_guard(node: ast.AST) -> bool:
        return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)

    def visit(node: ast.AST, guarded: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        if any(name == "dg_edit.cli" or name.startswith("dg_edit.cli.") for name in names):
            found.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded or is_main_guard(node))

    visit(tree, False)
    return found


def test_the_cli_import_scan_sees_relative_and_guarded_imports(tmp_path):
    folder = ROOT / "dg_edit" / "serve"
    sample = folder / "app.py"  # the scan only reads the file; the package path comes from its folder
    assert cli_imports(sample) == [(next(no for no, line in enumerate(sample.read_text().splitlines(), 1)
                                         if "from ..cli import main" in line), True)]
    assert cli_imports(ROOT / "dg_edit" / "cli.py") == []
    assert cli_imports(ROOT / "tests" / "test_cli.py")[0][1] is False  # `from dg_edit.cli import split_at`


def test_the_core_never_imports_the_cli():
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        if path.name == "cli.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{no}" for no, _ in cli_imports(path)]
    for folder in FRONT_END_FOLDERS:
        for path in sorted(folder.rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}:{no}" for no, guarded in cli_imports(path)
                          if not guarded and path.name != "__main__.py"]
    assert not offenders, "start-up code belongs in dg_edit.startup, not dg_edit.cli:\n" + "\n".join(offenders)
