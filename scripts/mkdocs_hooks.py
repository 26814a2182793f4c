"""mkdocs hook: links from the guide pages to files outside ``docs/``.

The pages in docs/ are written to be read on GitHub too, where a link such as
``[examples/compile_step.py](../examples/compile_step.py)`` opens the file in the repository.
The site holds only docs/, so mkdocs would report such a link as broken (an error under
``--strict``). This hook rewrites each one before mkdocs checks the links: to
``<repo_url>/blob/main/<path>`` when mkdocs.yml sets ``repo_url``, otherwise to the link's text
followed by the repository path in code (nothing to click, nothing broken). Links inside
fenced code blocks are left alone. A link to a file that exists nowhere is still an error.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

# [text](target) or [text](target#anchor), not images (![...]), target without a scheme
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


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
    for line in markdown.split("\n"):
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
