"""MkDocs hooks for the documentation site (mkdocs.yml names this file).

The study pages and guides link to files outside ``docs/`` (the notebooks, scripts) with paths
that work when the Markdown is read on a Git host, for example ``../../notebooks/x.ipynb`` from
``docs/guides/``. MkDocs only knows files under ``docs/``, so in strict mode those links fail.
These hooks copy each such file into the site under ``repo/`` and point the link there, so the
same Markdown works in both places. A link to a file that does not exist is left alone, and the
strict build reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

# inline links and images: [text](target) or ![alt](target), the target up to a space or ")"
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_PREFIX = "repo"


def _outside_target(page_uri: str, target: str, docs: Path, root: Path) -> str | None:
    """The repository-relative path of ``target`` when it leaves ``docs/`` for a file that exists."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.split("#", 1)[0]
    if not path:
        return None
    docs_rel = docs.relative_to(root).as_posix()
    resolved = posixpath.normpath(posixpath.join(docs_rel, posixpath.dirname(page_uri), path))
    if resolved.startswith("..") or resolved == docs_rel or resolved.startswith(docs_rel + "/"):
        return None
    return resolved if (root / resolved).is_file() else None


def _roots(config) -> tuple[Path, Path]:
    docs = Path(config["docs_dir"]).resolve()
    return docs, Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    """Add every repository file that a page links to from outside ``docs/`` under ``repo/``."""
    docs, root = _roots(config)
    wanted: set[str] = set()
    for f in files.documentation_pages():
        text = Path(f.abs_src_path).read_text(encoding="utf-8")
        for m in _LINK.finditer(text):
            rel = _outside_target(f.src_uri, m.group(2), docs, root)
            if rel is not None:
                wanted.add(rel)
    for rel in sorted(wanted):
        files.append(File.generated(config, f"{_PREFIX}/{rel}", abs_src_path=str(root / rel)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Point the links that leave ``docs/`` at the copies under ``repo/``."""
    docs, root = _roots(config)

    def repl(m):
        target = m.group(2)
        rel = _outside_target(page.file.src_uri, target, docs, root)
        if rel is None:
            return m.group(0)
        anchor = target[len(target.split("#", 1)[0]):]
        new = posixpath.relpath(f"{_PREFIX}/{rel}", posixpath.dirname(page.file.src_uri) or ".")
        return f"{m.group(1)}{new}{anchor}{m.group(3)}"

    return _LINK.sub(repl, markdown)


def on_nav(nav, config, files):
    """Pages under ``docs/`` that mkdocs.yml's nav does not list (a study page added since) go in a
    last section, so that a new page is on the site without an edit here."""
    from mkdocs.structure.nav import Section

    listed = {p.file.src_uri for p in nav.pages}
    extra = [f.page for f in files.documentation_pages() if f.src_uri not in listed and f.page is not None]
    if extra:
        section = Section("More pages", extra)
        for page in extra:
            page.parent = section
        nav.items.append(section)
        nav.pages.extend(extra)
    return nav
