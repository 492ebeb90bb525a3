"""Check every link inside a built HTML site: the target file exists and so does its anchor.

Usage: ``python docs/check_links.py docs/_build/html``. Links to other hosts
(``http:``, ``https:``, ``mailto:``) are listed but not followed, since the
build machines have no network. Exits with status 1 if any internal link is
broken.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    """Collect the ids and the outgoing links (href and src) of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif (name == "href" and tag in ("a", "link")) or (name == "src" and tag in ("img", "script")):
                self.links.append(value)


def check_site(root: Path) -> tuple[list[str], int, int]:
    """Return the broken internal links of the site under ``root``, the number checked and the external count."""
    pages: dict[Path, _Page] = {}
    for path in sorted(root.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = page

    broken: list[str] = []
    checked = external = 0
    for path, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                external += 1
                continue
            checked += 1
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            where = f"{path.relative_to(root.resolve())}: {link}"
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{where} (no file {target.relative_to(root.resolve())})")
            elif parts.fragment and target in pages and unquote(parts.fragment) not in pages[target].ids:
                broken.append(f"{where} (no anchor #{parts.fragment})")
    return broken, checked, external


def main(argv: list[str]) -> int:
    """Check the site given on the command line and print a summary."""
    if len(argv) != 2:
        print(__doc__)
        return 2
    root = Path(argv[1])
    if not (root / "index.html").is_file():
        print(f"Expected a built HTML site with an index.html in {root}, but found none. Build the docs first.")
        return 2
    broken, checked, external = check_site(root)
    for line in broken:
        print(f"broken: {line}")
    print(f"{checked} internal links checked, {len(broken)} broken; {external} external links not followed.")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
