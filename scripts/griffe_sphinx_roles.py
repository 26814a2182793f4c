"""Griffe extension for the API reference: the docstrings' reST markup, in Markdown.

adoptim's docstrings follow torch's conventions: Google-style sections with reST inline markup
(``:class:`PowerClip```, ``:meth:`moments```, a paragraph ending in ``::`` before a literal
block). mkdocstrings renders Markdown, where those would show as written. Before rendering,
this extension rewrites, in every docstring of the package:

* a role whose target is public API (a name in ``adoptim.__all__``, or a public member of
  one) into a cross-reference to its entry on the API page, under its public name
  (``adoptim.ADOPT.moments``, not the module it is defined in, which may move);
* any other role into inline code (its target is internal and has no page);
* ``text::`` before a literal block into ``text:``.

A role in a docstring on the API page whose target does not exist in the package raises, so
``mkdocs build --strict`` fails on a missing reference as it does on a broken link.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::(?=\n)")  # "text::" at the end of a line
_BARE_LITERAL = re.compile(r"^\s*::\s*$", re.M)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "adoptim":
            return
        # canonical path (where it is defined) -> public path (how users import it)
        public: dict[str, str] = {}
        for name in pkg.exports or ():
            target = pkg[name]
            target = target.final_target if target.is_alias else target
            public[target.path] = f"adoptim.{name}"
            for mname in target.members:
                if not mname.startswith("_"):
                    public[f"{target.path}.{mname}"] = f"adoptim.{name}.{mname}"
        on_api_page = set(public)

        for obj in _walk(pkg):
            if obj.docstring is None:
                continue
            obj.docstring.value = self._convert(obj, obj.docstring.value, public,
                                                obj.path in on_api_page)

    @staticmethod
    def _resolve(obj, target: str) -> str | None:
        """The canonical path of ``target`` as written in ``obj``'s docstring, or None."""
        scopes = [obj] + ([obj.parent] if obj.parent is not None else [])
        for scope in scopes:
            try:
                path = scope.resolve(target.split(".")[0])
            except (griffe.NameResolutionError, ValueError, KeyError, AttributeError):
                continue
            path = ".".join([path, *target.split(".")[1:]])
            found = SphinxRoles._lookup(obj, path)
            if found is not None:
                return found
        return SphinxRoles._lookup(obj, target)

    @staticmethod
    def _lookup(obj, path: str) -> str | None:
        if not path.startswith("adoptim"):
            return None
        try:
            found = obj.modules_collection[path]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        try:
            return found.final_target.path if found.is_alias else found.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None

    def _convert(self, obj, text: str, public: dict[str, str], strict: bool) -> str:
        def role(m: re.Match) -> str:
            target = m[1]
            short = target.rsplit(".", 1)[-1] if not target.startswith("adoptim") else target
            path = self._resolve(obj, target)
            if path is None and strict:
                raise griffe.ExtensionError(
                    f"{obj.path}: the docstring refers to {m[0]}, which is not in the package")
            if path in public:
                return f"[`{short}`][{public[path]}]"
            return f"`{target}`"

        text = _ROLE.sub(role, text)
        text = _BARE_LITERAL.sub("", text)
        return _LITERAL.sub(r"\1:", text)
