"""mkdocs hooks: the pages in docs/ are written for GitHub's Markdown; two differences from
Python-Markdown (which mkdocs uses) are bridged here, before mkdocs reads each page.

1. **A list right after a paragraph line.** GitHub starts a list there; Python-Markdown needs
   a blank line first and otherwise runs the items into the paragraph ("text - item - item").
   A blank line is inserted before such a list (outside code blocks).

2. **Links to files outside docs/.** On GitHub a link such as
   ``[examples/compile_step.py](../examples/compile_step.py)`` opens the file in the
   repository; the site holds only docs/, so mkdocs would report it as broken (an error under
   ``--strict``). Each one is rewritten before mkdocs checks the links: to
   ``<repo_url>/blob/main/<path>`` when mkdocs.yml sets ``repo_url``, otherwise to the link's
   text followed by the repository path in code (nothing to click, nothing broken). Links in
   fenced code blocks are left alone; a link to a file that exists nowhere is still an error.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

# [text](target) or [text](target#anchor), not images (![...]), target without a scheme
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s+\S")
_TABLE_OR_HTML = re.compile(r"^\s*[|<>#]")


def _list_breaks(lines: list[str]) -> list[str]:
    """A blank line before a list item whose previous line is paragraph text."""
    out: list[str] = []
    in_fence = False
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
        prev = out[-1] if out else ""
        if (not in_fence and _ITEM.match(line) and prev.strip() and not prev[0].isspace()
                and not _ITEM.match(prev) and not _TABLE_OR_HTML.match(prev)
                and not _FENCE.match(prev)):
            out.append("")
        out.append(line)
    return out


def _outside(target: str, page_dir: str) -> str | None:
    """The repository path ``target`` points to, if it lies outside docs/; else None."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
        return None  # a URL (https:, mailto:) or an absolute link: mkdocs judges those
    joined = posixpath.normpath(posixpath.join("docs", page_dir, target))
    return joined if not joined.startswith("docs/") and joined != "docs" else None


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    repo_url = (config.get("repo_url") or "").rstrip("/")
    page_dir = posixpath.dirname(page.file.src_uri)
    out, in_fence = [], False
    for line in _list_breaks(markdown.split("\n")):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence:
            def fix(m: re.Match) -> str:
                path = _outside(m["target"], page_dir)
                if path is None:
                    return m[0]
                if not (root / path).exists():
                    raise PluginError(f"{page.file.src_uri}: link to {m['target']!r}: "
                                      f"{path} does not exist in the repository")
                if repo_url:
                    return f"[{m['text']}]({repo_url}/blob/main/{path}{m['anchor'] or ''})"
                text = m["text"]
                return text if path in text else f"{text} (`{path}`)"
            line = _LINK.sub(fix, line)
        out.append(line)
    return "\n".join(out)
