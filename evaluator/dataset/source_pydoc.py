"""The default source: sections of the CPython 3.11 documentation, from Debian's `python3.11-doc`.

The package ships the reST sources of the HTML docs under `_sources/` as `*.rst.txt`. Each section
(any heading level) becomes one candidate document: its title, a blank line, then its own prose up
to the next heading, lightly cleaned of markup:

- code is dropped: literal blocks (after `::`), doctest blocks (`>>>`), tables, and directives
  whose body is code or navigation (`code-block`, `index`, `toctree`, ...);
- prose directives keep their body (`note`, `warning`, `seealso`, the descriptions of functions,
  classes and so on, without their signatures); version notes are rendered the way Sphinx renders
  them ("New in version 3.2.", "Changed in version 3.3: ...");
- inline markup keeps its text: ``:func:`len` `` -> `len()`, ``:ref:`label` `` -> the title of the
  section it points at, ``*word*`` -> `word`, ``:pep:`8` `` -> `PEP 8`;
- each paragraph, and each list item, becomes one line; they are separated by a blank line.

`build` then selects exactly `n_docs` of these sections and cuts them to a common length so that
the whole comes to `target_tokens` under a tokenizer trained on the training split; the datasheet
that it writes spells out every rule.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evaluator.dataset.build import (
    EOS_TOKEN,
    VAL_PER_MILLE,
    BuiltDocument,
    SourceDescription,
    encode_all,
    is_validation,
    progress_display,
    train_tokenizer,
    truncate_text,
    write_dataset,
)
from evaluator.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_SOURCE_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DEBIAN_CHANGELOG = Path("/usr/share/doc/python3.11-doc/changelog.Debian.gz")
SOURCE_SUFFIX = ".rst.txt"

# Files that are not prose: the changelog is a list of issue titles; `includes/` holds fragments
# that other pages include, so their text would appear twice.
EXCLUDED = ("whatsnew/changelog.rst.txt", "includes/")

# Directives whose body is prose and is kept (re-parsed as reST); every other directive is
# dropped with its body (code, tables, navigation, index entries, authorship, ...).
_ADMONITIONS = {
    "note",
    "warning",
    "important",
    "caution",
    "tip",
    "hint",
    "attention",
    "danger",
    "seealso",
    "impl-detail",
    "epigraph",
    "glossary",
}
_TITLED = {"admonition", "topic", "sidebar"}  # the argument is a title: kept as a paragraph
_DESCRIPTIONS = {
    "function",
    "method",
    "class",
    "attribute",
    "data",
    "exception",
    "decorator",
    "decoratormethod",
    "classmethod",
    "staticmethod",
    "abstractmethod",
    "coroutinemethod",
    "coroutinefunction",
    "awaitablefunction",
    "describe",
    "object",
    "opcode",
    "pdbcommand",
    "cmdoption",
    "option",
    "envvar",
    "c:function",
    "c:member",
    "c:type",
    "c:var",
    "c:macro",
    "c:struct",
    "c:data",
}
_VERSION_NOTES = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
}

_ADORNMENT = re.compile(r"""^([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])\1{2,}\s*$""")
_EXPLICIT = re.compile(r"^\.\.(?:\s|$)")
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.-]+)::(?:\s+(.*))?$")
_LABEL = re.compile(r"^\.\.\s+_([^:]+):\s*$")
_OPTION = re.compile(r"^:[\w -]+:(?:\s|$)")
_GRID_TABLE = re.compile(r"^\+[-=+]+\+$")
_SIMPLE_TABLE = re.compile(r"^=+(?: +=+)+$|^=+$")
_BULLET = re.compile(r"^(?:[-*+•]|#\.|\d+\.|\(?\d+\))\s+")
_SOURCE_LINK = re.compile(r"^\*\*Source code:\*\*")
_FIELD = re.compile(r"^:[\w -]+:\s")  # a field list: page metadata such as :Author:


@dataclass(frozen=True)
class Section:
    """One candidate document before inline cleaning: ids and raw reST paragraphs."""

    doc_id: str
    title: str
    paragraphs: tuple[str, ...]


@dataclass
class _FileParse:
    sections: list[Section]
    labels: dict[str, str]  # reST label -> raw title of the section it precedes
    doc_title: str | None  # the page's first heading, for :doc: references


def source_version(changelog: Path = DEBIAN_CHANGELOG) -> str:
    """The Debian package version, from the first line of its changelog: `3.11.2-6+deb12u9`."""
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as handle:
            first = handle.readline()
    except OSError:
        return "unknown (no Debian changelog found)"
    match = re.match(r"^\S+ \(([^)]+)\)", first)
    return match.group(1) if match else "unknown"


def source_files(source_dir: Path) -> list[Path]:
    if not source_dir.is_dir():
        raise DataError(
            f"{source_dir}: no such directory; install Debian's python3.11-doc "
            "(apt-get install python3.11-doc) or pass --source-dir"
        )
    files = sorted(
        path
        for path in source_dir.rglob(f"*{SOURCE_SUFFIX}")
        if not path.relative_to(source_dir).as_posix().startswith(EXCLUDED)
    )
    if not files:
        raise DataError(f"{source_dir}: no *{SOURCE_SUFFIX} files found")
    return files


def read_sections(source_dir: Path, files: list[Path], on_file=None) -> list[tuple[str, str]]:
    """Every section of every file as (doc_id, cleaned text), in file order then document order.

    Two passes: the first collects section labels and page titles, so that the second can write
    `:ref:`/`:doc:` references as the titles they point at, like the HTML does.
    """
    parses: list[_FileParse] = []
    labels: dict[str, str] = {}
    doc_titles: dict[str, str] = {}
    for path in files:
        rel = path.relative_to(source_dir).as_posix().removesuffix(SOURCE_SUFFIX)
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        parse = _parse_file(rel, source)
        parses.append(parse)
        labels.update(parse.labels)
        if parse.doc_title is not None:
            doc_titles[rel] = parse.doc_title
        if on_file is not None:
            on_file()
    inline = _InlineCleaner(labels, doc_titles)
    documents = []
    for parse in parses:
        for section in parse.sections:
            doc_id = section.doc_id
            title = inline.clean(section.title, doc_id)
            body = [inline.clean(p, doc_id) for p in section.paragraphs]
            text = "\n\n".join(part for part in [title, *body] if part)
            documents.append((doc_id, text))
    return documents


# --- block structure ---------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, parent_indent: int) -> int:
    """Index after the block starting at `start` whose lines are indented beyond `parent_indent`."""
    end = start
    for index in range(start, len(lines)):
        if lines[index].strip() and _indent(lines[index]) <= parent_indent:
            break
        end = index + 1
    return end


def _dedent(lines: list[str]) -> list[str]:
    margin = min((_indent(line) for line in lines if line.strip()), default=0)
    return [line[margin:] for line in lines]


def _slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", _plain_title(title).lower()).strip("-")
    return slug[:60].rstrip("-") or "section"


def _plain_title(title: str) -> str:
    """A title without markup, good enough for ids: roles and quotes dropped, text kept."""
    title = re.sub(r"(?::[\w.+-]+)+:`!?~?([^`<]*?)\s*(?:<[^>]*>)?`", r"\1", title)
    return title.replace("`", "").replace("*", "")


def _is_heading(lines: list[str], index: int) -> bool:
    line = lines[index]
    if not line.strip() or line[0] == " " or index + 1 >= len(lines):
        return False
    if _ADORNMENT.match(line) or _EXPLICIT.match(line):
        return False
    under = lines[index + 1]
    return bool(_ADORNMENT.match(under)) and len(under.rstrip()) >= min(len(line.rstrip()), 3)


def _parse_file(rel: str, source: str) -> _FileParse:
    lines = source.expandtabs(8).splitlines()
    sections: list[Section] = []
    labels: dict[str, str] = {}
    pending_labels: list[str] = []
    slugs_seen: dict[str, int] = {}
    title: str | None = None
    paragraphs: list[str] = []

    def close_section() -> None:
        if title is None:
            return  # text before the first heading: module directives, labels; not a section
        slug = _slug(title)
        slugs_seen[slug] = slugs_seen.get(slug, 0) + 1
        if slugs_seen[slug] > 1:
            slug = f"{slug}-{slugs_seen[slug]}"
        sections.append(Section(f"{rel}#{slug}", title, tuple(paragraphs)))

    index = 0
    while index < len(lines):
        line = lines[index]
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1).strip().lower())
            index += 1
            continue
        overline = _ADORNMENT.match(line) and index + 2 < len(lines) and _is_heading(lines, index + 1)
        if overline or _is_heading(lines, index):
            if overline:
                index += 1
            close_section()
            title = lines[index].strip()
            paragraphs = []
            for name in pending_labels:
                labels[name] = title
            pending_labels = []
            index += 2
            continue
        if line.strip():
            pending_labels = []  # a label that precedes a paragraph or directive names no section
        block_end = _next_block_end(lines, index)
        paragraphs.extend(_clean_blocks(lines[index:block_end]))
        index = block_end
    close_section()
    doc_title = sections[0].title if sections else None
    return _FileParse(sections, labels, doc_title)


def _next_block_end(lines: list[str], start: int) -> int:
    """End of the top-level chunk at `start`: up to the next heading or label at column 0."""
    index = start + 1
    while index < len(lines):
        if _LABEL.match(lines[index]) or _is_heading(lines, index):
            break
        if _ADORNMENT.match(lines[index]) and index + 2 < len(lines) and _is_heading(lines, index + 1):
            break
        index += 1
    return index


def _clean_blocks(lines: list[str]) -> Iterator[str]:
    """The prose paragraphs of a run of reST body lines (no headings), one string each."""
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        indent = _indent(line)
        if not stripped:
            index += 1
            continue
        if _EXPLICIT.match(stripped):
            end = _block_end(lines, index + 1, indent)
            yield from _directive(stripped, lines[index + 1 : end])
            index = end
            continue
        if _GRID_TABLE.match(stripped):
            index = _block_end_plain(lines, index)
            continue
        if _SIMPLE_TABLE.match(stripped):
            index = _simple_table_end(lines, index)
            continue
        if _ADORNMENT.match(stripped):  # a transition line
            index += 1
            continue
        if stripped.startswith(">>>"):
            index = _block_end_plain(lines, index)
            continue
        bullet = _BULLET.match(stripped)
        if bullet:
            # A list item: its text continues on lines indented past the marker.
            end = _block_end(lines, index + 1, indent)
            item = [stripped[bullet.end() :], *_dedent(lines[index + 1 : end])]
            paragraphs = list(_clean_blocks(item))
            if paragraphs:
                yield f"{bullet.group(0).strip()} {paragraphs[0]}"
                yield from paragraphs[1:]
            index = end
            continue
        # A paragraph: lines at this indent up to a blank line, an indentation change or a list.
        end = index + 1
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) == indent:
            if _EXPLICIT.match(lines[end].strip()) or _BULLET.match(lines[end].strip()):
                break
            end += 1
        paragraph_lines = [line.strip() for line in lines[index:end]]
        if all(line == "|" or line.startswith("| ") for line in paragraph_lines):  # a line block
            paragraph_lines = [line[1:].strip() for line in paragraph_lines]
        paragraph = " ".join(paragraph_lines)
        if end < len(lines) and lines[end].strip() and _indent(lines[end]) > indent:
            # Indented lines right after (a definition list's definition): blocks of their own.
            body_end = _block_end(lines, end, indent)
            body = _dedent(lines[end:body_end])
        else:
            body_end, body = end, []
        if paragraph.endswith("::"):
            paragraph = _strip_literal_marker(paragraph)
            body_end = _block_end(lines, body_end, indent)  # the literal block, skipped
            body = []
        if paragraph and not _SOURCE_LINK.match(paragraph) and not _FIELD.match(paragraph):
            yield paragraph
        yield from _clean_blocks(body)
        index = body_end


def _block_end_plain(lines: list[str], start: int) -> int:
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    return end


def _simple_table_end(lines: list[str], start: int) -> int:
    """A simple table ends at a border line followed by a blank line (or the end)."""
    index = start + 1
    while index < len(lines):
        if _SIMPLE_TABLE.match(lines[index].strip()) and (index + 1 == len(lines) or not lines[index + 1].strip()):
            return index + 1
        index += 1
    return index


def _strip_literal_marker(line: str) -> str:
    """reST's `Paragraph::` renders as `Paragraph:`; `Paragraph ::` and a bare `::` vanish."""
    if line == "::":
        return ""
    if line.endswith(" ::"):
        return line[:-3].rstrip()
    return line[:-1]


def _directive(first_line: str, body_lines: list[str]) -> Iterator[str]:
    match = _DIRECTIVE.match(first_line)
    if not match:
        return  # a comment, label, footnote or substitution definition
    name, argument = match.group(1), (match.group(2) or "").strip()
    name = name.removeprefix("py:")
    body = _dedent(body_lines)
    while body and _OPTION.match(body[0].strip()):
        body = body[1:]
    if name in _ADMONITIONS:
        if argument:
            body = [argument, *body]
        yield from _clean_blocks(body)
    elif name in _TITLED:
        if argument:
            yield argument
        yield from _clean_blocks(body)
    elif name in _DESCRIPTIONS:
        yield from _clean_blocks(body)
    elif name in _VERSION_NOTES or name == "deprecated-removed":
        yield from _version_note(name, argument, body)


def _version_note(name: str, argument: str, body: list[str]) -> Iterator[str]:
    version, _, text = argument.partition(" ")
    if name == "deprecated-removed":
        removed, _, text = text.partition(" ")
        lead = f"Deprecated since version {version}, will be removed in version {removed}"
    else:
        lead = _VERSION_NOTES[name].format(version)
    paragraphs = list(_clean_blocks([text, *body] if text else body))
    if not paragraphs:
        yield f"{lead}."
        return
    yield f"{lead}: {paragraphs[0]}"
    yield from paragraphs[1:]


# --- inline markup -----------------------------------------------------------------------------

_INLINE = re.compile(
    r"""
      ``(?P<literal>.+?)``
    | (?P<role>(?::[\w.+-]+)+:)`(?P<role_text>(?:\\.|[^`\\])+?)`
    | `(?P<link>[^`]+?)`__?
    | `(?P<interpreted>[^`]+?)`
    | \*\*(?P<strong>\S(?:.*?\S)?)\*\*
    | (?<![\w*\\])\*(?P<emphasis>[^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])
    | \|(?P<substitution>[\w .-]+)\|_{0,2}
    | \s?\[(?:\#[\w-]*|\d+|\*)\]_
    """,
    re.VERBOSE,
)
_TARGET = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
_CALLABLE_ROLES = {"func", "meth", "c:func", "py:func", "py:meth"}
_NUMBERED_ROLES = {"pep": "PEP {}", "rfc": "RFC {}", "issue": "bpo-{}", "gh": "gh-{}"}


class _InlineCleaner:
    def __init__(self, labels: dict[str, str], doc_titles: dict[str, str]) -> None:
        self.labels = labels
        self.doc_titles = doc_titles
        self._resolving: set[str] = set()

    def clean(self, text: str, doc_id: str) -> str:
        page = doc_id.partition("#")[0]
        cleaned = _INLINE.sub(lambda match: self._replace(match, page), text)
        cleaned = cleaned.replace(" --- ", " \u2014 ").replace(" -- ", " \u2013 ")  # as Sphinx's smartquotes
        cleaned = re.sub(r"\\ ", "", cleaned)  # reST's escaped space joins words
        cleaned = re.sub(r"\\(.)", r"\1", cleaned)
        return re.sub(r"[ \t]+", " ", cleaned).strip()

    def _replace(self, match: re.Match, page: str) -> str:
        groups = match.groupdict()
        if groups["literal"] is not None:
            return groups["literal"]
        if groups["role"] is not None:
            return self._role(groups["role"].strip(":"), groups["role_text"], page)
        for key in ("link", "interpreted"):
            if groups[key] is not None:
                target = _TARGET.match(groups[key])
                return target.group("title") if target and target.group("title") else groups[key]
        for key in ("strong", "emphasis", "substitution"):
            if groups[key] is not None:
                return groups[key]
        return ""  # footnote reference

    def _role(self, role: str, text: str, page: str) -> str:
        text = text.replace("\\`", "`")
        target = _TARGET.match(text)
        if target and target.group("title"):
            return target.group("title")
        if role in ("ref", "std:ref"):
            return self._title_of(self.labels.get(text.lower()), page) or text.replace("-", " ")
        if role == "doc":
            path = text.lstrip("/") if text.startswith("/") else _join_page(page, text)
            return self._title_of(self.doc_titles.get(path), page) or text
        if role in _NUMBERED_ROLES:
            number = text.split("#")[0]
            return _NUMBERED_ROLES[role].format(number)
        if role == "abbr":
            return text.split(" (")[0]
        if role in ("samp", "file", "menuselection", "guilabel", "kbd"):
            text = re.sub(r"(?<!\\)[{}]", "", text).replace("-->", "\u2023")
        if text.startswith("!"):
            text = text[1:]
        elif text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        if role in _CALLABLE_ROLES and not text.endswith(")"):
            text += "()"
        return text

    def _title_of(self, raw_title: str | None, page: str) -> str | None:
        """A referenced title, itself cleaned (titles contain roles); cycles fall back to raw."""
        if raw_title is None or raw_title in self._resolving:
            return raw_title
        self._resolving.add(raw_title)
        try:
            return self.clean(raw_title, page)
        finally:
            self._resolving.discard(raw_title)


def _join_page(page: str, relative: str) -> str:
    parts = page.split("/")[:-1] + relative.split("/")
    resolved: list[str] = []
    for part in parts:
        if part == "..":
            if resolved:
                resolved.pop()
        elif part and part != ".":
            resolved.append(part)
    return "/".join(resolved)


# --- selection and fitting to the totals -------------------------------------------------------

MIN_DOC_CHARS = 300
MIN_LETTER_SHARE = 0.75  # letters among non-space characters: drops code and table residue
SHINGLE_WORDS = 12  # validation candidates sharing any 12-word run with training are skipped
MIN_CAP_CHARS = 100
# The bisection's first upper bound: untruncated sections are long and slow to tokenize, and a
# cap of this size already holds well over 100 tokens per document; it doubles if not.
FIRST_UPPER_CAP_CHARS = 4096


@dataclass(frozen=True)
class Candidate:
    doc_id: str
    text: str
    title_chars: int


def eligible(sections: list[tuple[str, str]]) -> list[Candidate]:
    """Sections that are prose, in source order; of identical texts only the first is kept."""
    seen: set[str] = set()
    candidates = []
    for doc_id, text in sections:
        title, _, body = text.partition("\n\n")
        if len(text) < MIN_DOC_CHARS or text in seen or EOS_TOKEN in text:
            continue
        visible = len(text) - sum(map(str.isspace, text))
        if sum(map(str.isalpha, text)) < MIN_LETTER_SHARE * visible or not re.search(r"[.!?](?:\s|$)", body):
            continue
        seen.add(text)
        candidates.append(Candidate(doc_id, text, len(title)))
    return candidates


def select(candidates: list[Candidate], n_docs: int) -> tuple[list[Candidate], list[Candidate]]:
    """Exactly `n_docs` documents, split by `is_validation`, drawn in the order of a hash of the id.

    The hash order spreads the choice over the whole documentation instead of its first files.
    Training takes the first `n_docs * 0.9` training-side candidates; validation then takes the
    first validation-side ones that share no 12-word run with those (whole sections are compared,
    before truncation), so no copied paragraph lands on both sides.
    """
    n_val = round(n_docs * VAL_PER_MILLE / 1000)
    n_train = n_docs - n_val
    ordered = sorted(candidates, key=lambda c: hashlib.sha256(b"select\0" + c.doc_id.encode()).digest())
    train = [c for c in ordered if not is_validation(c.doc_id)][:n_train]
    train_shingles = {shingle for c in train for shingle in _shingles(c.text)}
    val: list[Candidate] = []
    for candidate in ordered:
        if len(val) == n_val:
            break
        if is_validation(candidate.doc_id) and train_shingles.isdisjoint(_shingles(candidate.text)):
            val.append(candidate)
    if len(train) < n_train or len(val) < n_val:
        raise DataError(
            f"the source has too few usable sections for {n_docs} documents "
            f"({len(train)} of {n_train} for training, {len(val)} of {n_val} for validation)"
        )
    source_order = {c.doc_id: index for index, c in enumerate(candidates)}
    return sorted(train, key=lambda c: source_order[c.doc_id]), sorted(val, key=lambda c: source_order[c.doc_id])


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


@dataclass(frozen=True)
class Fit:
    cap_chars: int
    tokenizer: Tokenizer
    train: list[BuiltDocument]
    val: list[BuiltDocument]

    @property
    def total_tokens(self) -> int:
        return sum(len(doc.tokens) for doc in (*self.train, *self.val))


def fit_to_tokens(
    train: list[Candidate],
    val: list[Candidate],
    target_tokens: int,
    vocab_size: int,
    on_step=None,
) -> Fit:
    """Truncate every document to one character cap, found by bisection, to hit `target_tokens`.

    The circularity (the tokenizer is trained on the training split, and the split's token count
    depends on the tokenizer) is resolved by retraining at every step: for a cap, each document is
    cut at its last sentence end within the cap, a tokenizer is trained on exactly the truncated
    training texts, and all documents are counted with it. The count grows with the cap, so
    bisection over the integer cap converges; the cap whose count is nearest the target wins.
    """
    cache: dict[tuple[int, ...], Fit] = {}

    def fit(cap: int) -> Fit:
        train_texts = [truncate_text(c.text, cap, c.title_chars) for c in train]
        val_texts = [truncate_text(c.text, cap, c.title_chars) for c in val]
        key = tuple(map(len, train_texts + val_texts))
        if key not in cache:
            tokenizer = train_tokenizer(train_texts, vocab_size)
            cache[key] = Fit(
                cap,
                tokenizer,
                _documents(train, train_texts, encode_all(tokenizer, train_texts)),
                _documents(val, val_texts, encode_all(tokenizer, val_texts)),
            )
        if on_step is not None:
            on_step()
        return cache[key]

    longest = max(len(c.text) for c in (*train, *val))
    low, high = MIN_CAP_CHARS, min(FIRST_UPPER_CAP_CHARS, longest)
    low_fit, high_fit = fit(low), fit(high)
    while high_fit.total_tokens < target_tokens:
        if high == longest:
            raise DataError(
                f"the selected sections hold only {high_fit.total_tokens:,} tokens, "
                f"fewer than the {target_tokens:,} asked for"
            )
        low, low_fit = high, high_fit
        high = min(2 * high, longest)
        high_fit = fit(high)
    while high - low > 1:
        middle = (low + high) // 2
        middle_fit = fit(middle)
        if middle_fit.total_tokens < target_tokens:
            low, low_fit = middle, middle_fit
        else:
            high, high_fit = middle, middle_fit
    return min((low_fit, high_fit), key=lambda f: (abs(f.total_tokens - target_tokens), f.cap_chars))


def bisection_steps() -> int:
    """How many caps `fit_to_tokens` usually tries (when the first upper bound holds), for the progress display."""
    return 2 + (FIRST_UPPER_CAP_CHARS - MIN_CAP_CHARS - 1).bit_length()


def _documents(candidates: list[Candidate], texts: list[str], tokens: list[tuple[int, ...]]) -> list[BuiltDocument]:
    return [BuiltDocument(c.doc_id, text, ids) for c, text, ids in zip(candidates, texts, tokens, strict=True)]


def build(
    out_dir: Path,
    dataset_id: str,
    *,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    n_docs: int = 1000,
    target_tokens: int = 100_000,
    vocab_size: int = 8192,
    tolerance: float = 0.01,
) -> dict[str, str]:
    """Build the dataset into `out_dir`; returns {file name: sha256}."""
    files = source_files(source_dir)
    with progress_display() as progress:
        reading = progress.add_task("reading the documentation sources", total=len(files))
        sections = read_sections(source_dir, files, on_file=lambda: progress.advance(reading))
        candidates = eligible(sections)
        train, val = select(candidates, n_docs)
        fitting = progress.add_task("fitting the length cap", total=bisection_steps())
        fit = fit_to_tokens(train, val, target_tokens, vocab_size, on_step=lambda: progress.advance(fitting))
        progress.update(fitting, completed=progress.tasks[fitting].total)
    if abs(fit.total_tokens - target_tokens) > tolerance * target_tokens:
        raise DataError(
            f"could not bring the dataset to {target_tokens:,} tokens within {tolerance:.0%}: "
            f"the nearest is {fit.total_tokens:,} (cap {fit.cap_chars} characters)"
        )
    options = f"--id {dataset_id} --docs {n_docs} --tokens {target_tokens} --vocab-size {vocab_size}"
    if source_dir != DEFAULT_SOURCE_DIR:
        options += f" --source-dir {source_dir}"
    description = SourceDescription(
        title=(
            "Sections of the CPython 3.11 documentation (real English technical prose), for the "
            "speedrun evaluator's tracks."
        ),
        source=_source_text(source_dir, len(files), len(sections)),
        licence=_LICENCE,
        selection=_selection_text(fit, len(candidates), n_docs, target_tokens),
        rebuild_command=f"evaluator data build --source pydoc {options}",
    )
    tokenizer_note = (
        f"Byte-level BPE trained with the `tokenizers` library on the {len(fit.train)} training "
        f"documents exactly as stored in `train.parquet` (never on validation text): vocabulary "
        f"{fit.tokenizer.get_vocab_size():,}, `{EOS_TOKEN}` = id {fit.tokenizer.token_to_id(EOS_TOKEN)} "
        "(the document separator, the only special token), no normaliser, GPT-2 style byte-level "
        "pre-tokenisation without a prefix space."
    )
    return write_dataset(
        out_dir, dataset_id, fit.train, fit.val, fit.tokenizer.to_str(pretty=True), tokenizer_note, description
    )


_LICENCE = """The Python documentation is Copyright © 2001-2023 Python Software Foundation, and is
distributed under the PSF License Agreement (see `license.rst.txt` in the source, or
<https://docs.python.org/3.11/license.html>); examples, recipes and other code in it are dual
licensed under the PSF License Agreement and the Zero-Clause BSD licence. This dataset is a
derived work: the section texts are shortened and stripped of markup and code as described
below. Attribution: "Python 3.11 documentation, © Python Software Foundation, from Debian's
python3.11-doc package"."""


def _source_text(source_dir: Path, n_files: int, n_sections: int) -> str:
    return f"""Debian's `python3.11-doc` package, version {source_version()}: the reST sources of the
CPython 3.11 documentation, installed under `{source_dir}` as `*.rst.txt`. The builder reads
{n_files} of them (all but `{"`, `".join(EXCLUDED)}`: a list of issue titles, and fragments that
other pages include) and splits them into {n_sections:,} sections: one candidate document per
section of any level, holding the section's title and its own text up to the next heading."""


def _selection_text(fit: Fit, n_eligible: int, n_docs: int, target_tokens: int) -> str:
    areas: dict[str, int] = {}
    for doc in (*fit.train, *fit.val):
        area = doc.doc_id.split("/")[0] if "/" in doc.doc_id else "(top level)"
        areas[area] = areas.get(area, 0) + 1
    spread = ", ".join(f"{area} {count}" for area, count in sorted(areas.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"""Cleaning (light, rule-based; the text is what a reader of the HTML page sees, minus code):

- dropped: literal blocks (after `::`), doctest blocks (`>>>`), tables, comments, labels,
  footnote and substitution definitions, "Source code:" links, field lists (page metadata such
  as `:Author:`), transition lines, and directives
  whose body is code, navigation or metadata (`code-block`, `index`, `toctree`, `module`,
  `availability`, `audit-event`, ...);
- kept: the bodies of prose directives (`note`, `warning`, `seealso`, `glossary`, and the
  descriptions of functions, classes, attributes and so on, without their signatures); version
  notes written as Sphinx writes them ("New in version 3.2.", "Changed in version 3.3: ...");
- inline markup keeps its text: roles lose their markup (`:func:` names get `()`, `~a.b`
  becomes `b`, `:ref:` and `:doc:` become the title they point at, `:pep:` becomes "PEP n"),
  emphasis, literals and link names keep their words, footnote references are dropped;
- each paragraph is one line, list items are paragraphs, paragraphs are separated by a blank line,
  and the section title is the first paragraph. The document id is
  `<page path>#<slug of the title>` (a `-2`, `-3` suffix for repeated titles in one page).

Selection (deterministic; no randomness anywhere):

1. Eligible sections: at least {MIN_DOC_CHARS} characters, a sentence end after the title, letters
   at least {MIN_LETTER_SHARE:.0%} of the non-space characters, and not an exact copy of an earlier
   section: {n_eligible:,} sections, in page order.
2. Eligible sections are ordered by `SHA-256("select\\0" + doc_id)`. The first
   {len(fit.train)} that the split rule puts in training are the training split; then the first
   {len(fit.val)} that it puts in validation and that share no run of {SHINGLE_WORDS} words with any
   selected training section are the validation split: {n_docs:,} documents exactly.
3. Every document is cut to at most {fit.cap_chars} characters, at its last sentence or paragraph
   end within that cap (never inside the title). The cap is the integer that brings the total
   nearest {target_tokens:,} tokens, found by bisection in which, at every step, the tokenizer is
   retrained on the cut training texts and all documents are counted with it. So the shipped
   tokenizer is trained on exactly the shipped training text.

Documents by area of the documentation: {spread}."""
