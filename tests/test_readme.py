"""The README as a newcomer uses it: every ```python block runs as pasted, every install line
works from a clone, the set-up section has exactly two commands, the docstring examples run.

Each block runs alone in a fresh interpreter (a reader pastes one block, not the page). A block
that imports a package which is not installed (torch in the sanitizer run) is skipped with
that reason in the report, never silently. `python tests/test_readme.py --extract DIR` writes
the blocks to DIR/readme_block_NN.py (CI type-checks them with mypy).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```lang block."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == lang
    ]


PY_BLOCKS = _blocks("python")


def _imports(code: str) -> list[str]:
    names = re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", code, re.M)
    return sorted(set(names))


def test_readme_has_python_blocks():
    assert len(PY_BLOCKS) >= 4


@pytest.mark.parametrize(("line", "code"), PY_BLOCKS, ids=[f"line{n}" for n, _ in PY_BLOCKS])
def test_python_block_runs_as_pasted(line, code, tmp_path):
    missing = [m for m in _imports(code) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"README block at line {line} imports {', '.join(missing)}, not installed")
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(code, encoding="utf-8")
    res = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"README block at line {line} failed:\n{res.stderr[-3000:]}"


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", section, re.M))


def test_install_lines_work_from_a_clone():
    """Every `pip install` in the README installs the clone (`.` or `".[extra]"`)."""
    text = README.read_text(encoding="utf-8")
    lines = re.findall(r"pip install ([^`\n&]*)", text)
    assert lines
    extras = _extras()
    for arg in lines:
        # the last word that is not an option (-C..., -e, ...) is what gets installed
        target = [w for w in arg.split() if not w.startswith("-")][-1].strip()
        m = re.fullmatch(r'"?\.(?:\[([\w,]+)\])?"?', target)
        assert m, f"README: `pip install {arg}` does not install the clone"
        for extra in (m.group(1) or "").split(","):
            assert not extra or extra in extras, f"README: extra [{extra}] is not in pyproject"


def test_setup_section_has_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [code.strip() for lang, code in FENCE.findall(section) if lang == "bash"]
    assert commands == [
        "pip install . && python -m mha_ext",
        'pip install ".[test]" && python -m pytest',
    ]


def test_readme_refers_to_no_missing_document():
    text = README.read_text(encoding="utf-8")
    assert "SPEC" not in text
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to {target}, not in the repository"


@pytest.mark.parametrize("module", ["mha_ext._attention", "mha_ext._scores", "mha_ext.layers",
                                    "mha_ext.s2", "mha_ext.serving", "mha_ext.dask"])
def test_docstring_examples(module):
    if module == "mha_ext.dask":
        pytest.importorskip("dask")
    mod = importlib.import_module(module)
    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_main_job_reports_skipped_devices_and_aligns_its_table(tmp_path):
    import mha_ext

    res = subprocess.run(
        [sys.executable, "-m", "mha_ext"], cwd=tmp_path, capture_output=True, text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    if not mha_ext.cuda_available():
        assert any(line.startswith("  cuda  skipped: ") for line in lines), res.stdout
    table = lines[lines.index("timing (median of 7, ms; same process, same threads)") + 1 :]
    header, rows = table[0], table[1:]
    assert rows and all(len(r) == len(header) for r in rows), res.stdout
    for row in rows:  # the numbers end where their column headers end
        for name in ("mha_ext", "numpy", "speedup"):
            end = header.index(name) + len(name)
            assert row[end - 1] != " " and (end == len(row) or row[end] == " "), row


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--extract":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for i, (_, code) in enumerate(PY_BLOCKS):
            (out / f"readme_block_{i:02d}.py").write_text(code, encoding="utf-8")
        print(f"{len(PY_BLOCKS)} blocks -> {out}")
    else:
        sys.exit("usage: python tests/test_readme.py --extract DIR")
