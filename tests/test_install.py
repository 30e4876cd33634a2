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


def run_cli(args: list[str], extra_path: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The opt-in comes from the test alone: one set in the shell running pytest must not mask a refusal.
    inherited = {k: v for k, v in os.environ.items() if k != hf_adapter.ALLOW_UNTESTED_ENV}
    env = dict(inherited, OMP_NUM_THREADS="1", **(env or {}))
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


# ------------------------------------------------------------------ a newer transformers, opted in
@pytest.fixture
def newer_transformers_metadata(tmp_path) -> Path:
    """A site dir with transformers 99.0.0's metadata only: the installed package itself still imports."""
    dist = tmp_path / "transformers-99.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 99.0.0\n")
    return tmp_path


def test_the_refusal_of_a_newer_transformers_names_the_opt_in(future_transformers):
    proc = run_cli(["info"], future_transformers)
    assert proc.returncode == 2, proc.stderr
    assert f"set {hf_adapter.ALLOW_UNTESTED_ENV}=1" in proc.stderr and proc.stderr.count("\n") == 1


def test_the_opt_in_runs_a_newer_transformers_with_one_warning(newer_transformers_metadata):
    proc = run_cli(["info", "--json"], newer_transformers_metadata, env={hf_adapter.ALLOW_UNTESTED_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)  # the model loaded and answered
    warnings = [line for line in proc.stderr.splitlines() if "99.0.0" in line]
    assert len(warnings) == 1, proc.stderr  # once, though the CLI and the engine both check
    assert "newer than the tested range" in warnings[0] and "pip install 'transformers" in warnings[0]


def test_the_opt_in_does_not_admit_an_older_transformers(tmp_path):
    dist = tmp_path / "transformers-5.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.0.0\n")
    proc = run_cli(["info"], tmp_path, env={hf_adapter.ALLOW_UNTESTED_ENV: "1"})
    assert proc.returncode == 2, proc.stderr
    assert "transformers 5.0.0 is installed" in proc.stderr and hf_adapter.ALLOW_UNTESTED_ENV not in proc.stderr


# ------------------------------------------------------------------ pip keeps the user's torch
def test_upper_bounds_say_why():
    """An upper bound forces other tools' releases out of a user's venv: each one names the internals it guards."""
    text = (ROOT / "pyproject.toml").read_text()
    unexplained = [line.strip() for line in text.splitlines()
                   if re.match(r'\s*"[^"]*<', line) and "# internals:" not in line]
    assert not unexplained, "an upper bound without '# internals: why':\n" + "\n".join(unexplained)


def readme_gpu_install_line() -> str:
    """The Quick start's install line for a machine that already has its own torch."""
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("# GPU machine"))
    return lines[marker + 1]


@pytest.mark.parametrize("users_torch", ["2.11.0+cu130", "2.99.0+cu140"])  # the oldest supported; a future one
def test_pip_install_keeps_the_torch_a_venv_already_has(tmp_path, users_torch):
    """What pip's resolver decides for `pip install -e .` (the README's GPU line) in a venv with another torch.

    Metadata-only wheels (tests/fake_dists.py) stand in for every package, so no network and no
    gigabytes: the venv gets a fake torch at `users_torch`, the find-links folder offers dg-edit (with
    pyproject.toml's requirements) and torch 2.13.0, and `pip install --dry-run --report` must not
    plan to install any torch. With an upper bound on torch below the user's, pip would plan 2.13.0.
    """
    from fake_dists import dg_edit_requirements, fake_index, fake_wheel

    torch_req = next(r for r in dg_edit_requirements(ROOT / "pyproject.toml") if r.name == "torch")
    assert [s.operator for s in torch_req.specifier] == [">="], f"torch takes a lower bound only, not {torch_req}"
    line = readme_gpu_install_line()
    assert line.startswith("pip install ") and "torch" not in line, line  # the README line installs dg-edit alone
    wheels = tmp_path / "wheels"
    fake_index(wheels, ROOT / "pyproject.toml", extra_torch=["2.13.0"])
    users = tmp_path / "users"
    users.mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = venv / "bin" / "python"
    # This machine's pip config (find-links, index, a torch cap) must not decide; PIP_CONFIG_FILE=/dev/null skips it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip", "--python", str(target)]
    subprocess.run([*pip, "install", "-q", "--no-index", str(fake_wheel(users, "torch", users_torch))],
                   check=True, env=env, capture_output=True)
    report = tmp_path / "report.json"
    proc = subprocess.run([*pip, "install", "--dry-run", "--no-index", "--find-links", str(wheels),
                           "--report", str(report), "dg-edit"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "dg-edit" in planned  # the resolver did run
    assert "torch" not in planned, f"pip would replace torch {users_torch} with {planned['torch']}"


# ------------------------------------------------------------------ CI's notice of newer releases
def run_newer_releases(pip_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, **pip_env)
    return subprocess.run([sys.executable, str(ROOT / "tests" / "newer_releases.py")], capture_output=True,
                          text=True, timeout=120, env=env)


def test_ci_notices_a_transformers_the_bounds_leave_out(tmp_path):
    from fake_dists import fake_wheel

    fake_wheel(tmp_path, "transformers", "99.0.0")
    fake_wheel(tmp_path, "torch", "2.13.0")
    proc = run_newer_releases({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "NOTICE: transformers 99.0.0 is out and pyproject.toml admits transformers" in proc.stdout, proc.stdout
    assert "NOTICE: torch" not in proc.stdout, proc.stdout  # 2.13.0 is what CI runs: nothing to notice


def test_ci_notice_without_a_registry_says_so_and_passes():
    proc = run_newer_releases({"PIP_INDEX_URL": "http://127.0.0.1:9/simple"})  # nothing listens on port 9
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("could not ask the registry") == 2, proc.stdout
