"""The documentation site builds in strict mode: a broken link, a missing anchor, a page in
the nav that does not exist or an API name that does not resolve fails the build.

Needs the docs tools (``pip install -e ".[docs]"``; the test extra includes them, so CI runs
this); skips, saying so, without them. The build reads the source statically (griffe), so it
imports neither adoptim nor torch, and writes only to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")
MISSING = [m for m in TOOLS if importlib.util.find_spec(m.split(".")[0]) is None
           or importlib.util.find_spec(m) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING) or not (ROOT / "mkdocs.yml").is_file(),
    reason=f"the docs tools are not installed ({', '.join(MISSING)} missing): "
           'pip install -e ".[docs]"' if MISSING else "no mkdocs.yml (not a source checkout)")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


def _copy_tree(tmp_path: Path) -> Path:
    """The parts of the checkout the build reads, in a scratch folder we may break."""
    dst = tmp_path / "repo"
    for name in ("docs", "src", "scripts", "examples", "tests"):
        shutil.copytree(ROOT / name, dst / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "site"))
    shutil.copy2(ROOT / "mkdocs.yml", dst / "mkdocs.yml")
    return dst


def test_docs_build_strict(tmp_path):
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    api = (site / "api.html").read_text()
    # the public names, each with its own anchor, and no reST role left as text
    for name in ("adoptim.ADOPT", "adoptim.ADOPTW", "adoptim.PowerClip", "adoptim.adopt",
                 "adoptim.ADOPT.from_adam", "adoptim.ADOPT.moments"):
        assert f'id="{name}"' in api, name
    for role in (":class:", ":meth:", ":func:"):
        assert role not in api
    assert (site / "index.html").is_file()
    # a list right after a paragraph line (GitHub's Markdown) is a list on the site too, not
    # "text - item - item" in one paragraph (scripts/mkdocs_hooks.py)
    part1 = (site / "results" / "part1.html").read_text()
    assert "<li>AMSGrad converges for k = 10" in part1
    # the results pages' plots are copied with the site
    assert (site / "results" / "transfer" / "resnet" / "resnet_lr.png").is_file()


def test_docs_build_strict_fails_on_broken_links(tmp_path):
    """Each kind of broken link fails the strict build and is named in its output (so the
    test above can fail)."""
    repo = _copy_tree(tmp_path)
    index = repo / "docs" / "index.md"
    broken = {
        "no-such-page.md": "[gone](no-such-page.md)",
        "#no-such-section": "[gone](performance.md#no-such-section)",
        "results/no-such-plot.png": "![gone](results/no-such-plot.png)",
        "no_such_example.py": "[gone](../examples/no_such_example.py)",
    }
    index.write_text(index.read_text() + "\n" + "\n\n".join(broken.values()) + "\n")
    result = _build(repo / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0, f"the strict build passed\n{result.stdout}"
    out = result.stdout + result.stderr
    # the link outside docs/ stops the build first (it is rewritten before mkdocs checks)
    assert "no_such_example.py" in out, out
    index.write_text(index.read_text().replace(broken["no_such_example.py"], ""))
    result = _build(repo / "mkdocs.yml", tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    for target in ("no-such-page.md", "#no-such-section", "results/no-such-plot.png"):
        assert target in out, (target, out)


@pytest.mark.parametrize("breakage", ["api name", "role"])
def test_docs_build_strict_fails_on_missing_references(tmp_path, breakage):
    """An API entry or a docstring cross-reference to a name that does not exist fails."""
    repo = _copy_tree(tmp_path)
    if breakage == "api name":
        api = repo / "docs" / "api.md"
        api.write_text(api.read_text() + "\n::: adoptim.NoSuchName\n")
    else:  # a docstring on the API page refers to a method that does not exist
        opt = repo / "src" / "adoptim" / "optimizer.py"
        text = opt.read_text()
        assert "(read the moments with :meth:`moments`)" in text
        opt.write_text(text.replace("(read the moments with :meth:`moments`)",
                                    "(read the moments with :meth:`no_such_method`)", 1))
    result = _build(repo / "mkdocs.yml", tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0, f"{breakage}: the strict build passed\n{out}"
    assert ("NoSuchName" if breakage == "api name" else "no_such_method") in out, out
