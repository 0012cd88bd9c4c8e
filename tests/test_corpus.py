"""The corpora: extraction from the installed packages, markup stripping, the document split."""

import importlib.metadata
import json

import pytest

from stq_compiler import corpus
from stq_compiler.corpus import CorpusError, Document, load_corpus, split_documents, strip_wikitext


@pytest.fixture(scope="module")
def documents():
    """Each corpus's documents, extracted once (the Wikipedia dump takes seconds to parse)."""
    return {"kjv": corpus.kjv_documents(), "wiki": corpus.wiki_documents()}


@pytest.mark.parametrize("name", corpus.CORPORA)
def test_split_is_disjoint_complete_and_sized(name, documents):
    splits = load_corpus(name)
    names = {split: {d.name for d in docs} for split, docs in splits.items()}
    assert not names["train"] & names["heldout"]
    assert not names["train"] & names["calibration"]
    assert not names["calibration"] & names["heldout"]
    documents = documents[name]
    assert set().union(*names.values()) == {d.name for d in documents}
    total = sum(len(d.text) for d in documents)
    held = sum(len(d.text) for d in splits["heldout"])
    # documents are whole, so the share overshoots its target by at most the last document dealt
    largest = max(len(d.text) for d in splits["heldout"])
    assert corpus.HELDOUT_SHARE * total <= held < corpus.HELDOUT_SHARE * total + largest
    assert sum(len(d.text) for d in splits["train"]) > 0.75 * total


@pytest.mark.parametrize("name", corpus.CORPORA)
def test_split_is_deterministic_and_independent_of_document_order(name, documents):
    documents = documents[name]
    forward = split_documents(documents)
    backward = split_documents(list(reversed(documents)))
    assert forward == split_documents(list(documents))
    assert {s: [d.name for d in docs] for s, docs in forward.items()} == {s: [d.name for d in docs] for s, docs in backward.items()}


def test_kjv_is_the_whole_bible_by_book(documents):
    books = documents["kjv"]
    assert len(books) == 66
    assert books[0].name == "Genesis" and books[0].text.startswith("In the beginning God created the heaven and the earth.")
    assert books[-1].name == "Revelation" and books[-1].text.endswith("Amen.")
    assert sum(len(book.text.splitlines()) for book in books) == 1189  # the KJV's chapters, a line each


def test_wikipedia_articles_are_text_with_little_markup_left(documents):
    articles = documents["wiki"]
    assert len(articles) > 90
    text = "\n".join(a.text for a in articles)
    assert sum(len(a.text) for a in articles) > 2_500_000
    # what the parser leaves of unbalanced or nested markup (module docstring): a few in 2.9 M characters
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&lt;", "'\'\'", "[http"):
        assert text.count(markup) <= 12, markup


def test_strip_wikitext_keeps_text_and_drops_markup_references_and_files():
    wikitext = (
        "{{Infobox|name=x}}\'\'\'Foo\'\'\' is a [[bar (thing)|bar]] in [[Baz]].<ref>Smith 2001, p. 3</ref>\n"
        "[[File:Foo.jpg|thumb|A caption]]\n"
        "== History ==\nIt was made in 1900.\n"
        "{| class=wikitable\n|-\n| a || b\n|}\n"
    )
    assert strip_wikitext(wikitext) == "Foo is a bar in Baz.\nHistory\nIt was made in 1900."


def test_missing_package_is_named(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CorpusError, match="'gensim' package is not installed"):
        corpus.wiki_path()


def test_corrupt_kjv_line_is_reported(tmp_path):
    path = tmp_path / "kjv.jsonl"
    path.write_text(json.dumps({"book": "Genesis", "chapter": 1, "verse": 1, "text": "x"}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"kjv.jsonl:2: not a KJV verse record"):
        corpus.kjv_documents(path)


def test_split_refuses_duplicate_names_and_bad_shares():
    docs = [Document("x", "a", "text"), Document("x", "a", "more")]
    with pytest.raises(CorpusError, match="unique"):
        split_documents(docs)
    with pytest.raises(ValueError, match="shares"):
        split_documents(docs[:1], heldout=0.6, calibration=0.5)
