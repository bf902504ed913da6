"""Model sources on the Hugging Face Hub: ``org/repo[:QUANT]`` and picking a repo's GGUF files.

Pure functions over names: which file a quant tag means (case-insensitively, as llama-server's
``-hf`` does), the shards of a split GGUF (``-00001-of-00003.gguf``) fetched whole, and the
vision projector (``mmproj-*.gguf``) beside it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from gateway.hub.errors import HubError

#: ``org/repo``: the Hub's repo id rules (letters, digits, ``-_.``; no ``--`` or ``..``).
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
#: The quant llama-server picks when none is given, then the next best guesses.
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q4_1", "Q8_0")

Kind = Literal["gguf", "folder"]


@dataclass(frozen=True)
class HubSource:
    """Where a model's files are on the Hub: a GGUF (``file`` or ``quant``) or a whole folder."""

    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str = "main"
    kind: Kind = "gguf"

    def __post_init__(self) -> None:
        check_repo(self.repo)
        if self.file is not None and self.quant is not None:
            raise HubError(f"{self.repo}: give a file or a quant, not both")

    @property
    def label(self) -> str:
        """How the user writes it: ``org/repo:Q4_K_M``, ``org/repo/file.gguf``, ``org/repo``."""
        name = self.repo
        if self.file is not None:
            name += f"/{self.file}"
        elif self.quant is not None:
            name += f":{self.quant}"
        return name if self.revision == "main" else f"{name}@{self.revision}"


def check_repo(repo: str) -> str:
    if not _REPO.match(repo) or "--" in repo or ".." in repo:
        raise HubError(f"{repo!r} is not a Hugging Face repo id (write it as org/repo)")
    return repo


def parse_spec(spec: str, *, revision: str = "main", kind: Kind = "gguf") -> HubSource:
    """``org/repo``, ``org/repo:QUANT``, ``org/repo/path/file.gguf``, each with ``@revision``."""
    text = spec.strip().removeprefix("hf.co/").removeprefix("huggingface.co/")
    quant = ""
    if "@" in text:
        text, _, revision = text.partition("@")
        revision, _, quant = revision.partition(":")  # org/repo@v1:Q4_K_M (a ref has no ':')
    text, _, before = text.partition(":")
    if before and quant:
        raise HubError(f"{spec!r}: two quant tags")
    quant = quant or before
    parts = text.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if not revision:
        raise HubError(f"{spec!r}: empty revision after '@'")
    return HubSource(check_repo(repo), file, quant or None, revision, kind)


def looks_like_hub_spec(spec: str) -> bool:
    """Whether ``--model`` could name a Hub repo (``org/repo[:QUANT]``, ``org/repo/file.gguf``)
    rather than a file on this machine (the caller tries the local path first)."""
    if spec.startswith(("/", ".", "~")):
        return False
    try:
        source = parse_spec(spec)
    except HubError:
        return False
    # "dir/model.gguf" is a local file, not a repo named model.gguf
    return not (source.file is None and source.repo.lower().endswith(".gguf"))


@dataclass(frozen=True)
class Selection:
    """The files one model needs (a split GGUF's shards in order) and a projector beside it."""

    files: tuple[str, ...]
    mmproj: str | None = None

    @property
    def primary(self) -> str:
        """The file to load (a split GGUF's first shard: llama.cpp finds the rest beside it)."""
        return self.files[0]


def _quant_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    m = _SPLIT.match(base)
    stem = m["stem"] if m else base.removesuffix(".gguf").removesuffix(".GGUF")
    return stem.upper()


#: How a whole quant tag begins (``Q4_K_M``, ``IQ3_XS``, ``F16``, ``BF16``, ``TQ1_0``): only such a
#: tag may follow an ``_`` (``model_Q4_K_M``); ``K_M`` is the end of a tag, never a tag.
_TAG_START = re.compile(r"^(?:[IT]?Q\d|B?F\d)")


def _matches(name: str, quant: str) -> bool:
    """``Model-Q4_K_M.gguf`` (or ``model.q4_k_m-00001-of-00002.gguf``) is quant ``q4_k_m``: the
    whole tag, so ``K_M`` matches neither Q4_K_M nor Q5_K_M."""
    stem, tag = _quant_of(name), quant.upper()
    seps = ("-", ".", "_") if _TAG_START.match(tag) else ("-", ".")
    return any(stem.endswith(sep + tag) for sep in seps) or stem == tag


def _group(names: Iterable[str], first: str) -> tuple[str, ...]:
    """``first``'s split group (every shard, checked complete) or ``first`` alone."""
    folder, _, base = first.rpartition("/")
    m = _SPLIT.match(base)
    if m is None:
        return (first,)
    count = int(m["count"])
    prefix = f"{folder}/" if folder else ""
    want = [f"{prefix}{m['stem']}-{i:05d}-of-{m['count']}.gguf" for i in range(1, count + 1)]
    have = {n.lower(): n for n in names}
    missing = [w for w in want if w.lower() not in have]
    if missing:
        raise HubError(f"split GGUF {first}: shard {missing[0]} is missing from the repo")
    return tuple(have[w.lower()] for w in want)


def _is_model_gguf(name: str) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")


def _first_shards(names: Iterable[str]) -> list[str]:
    out = []
    for n in names:
        m = _SPLIT.match(n.rsplit("/", 1)[-1])
        if _is_model_gguf(n) and (m is None or int(m["part"]) == 1):
            out.append(n)
    return sorted(out)


def select_gguf(source: HubSource, names: Iterable[str]) -> Selection:
    """The GGUF files ``source`` means among a repo's ``names`` (a one-line error if none)."""
    names = list(names)
    mmproj = sorted(n for n in names if n.rsplit("/", 1)[-1].lower().startswith("mmproj"))
    candidates = _first_shards(names)
    if source.file is not None:
        found = next((n for n in names if n == source.file), None)
        if found is None:
            raise HubError(f"{source.repo}: no file {source.file!r} in the repo")
        return Selection(_group(names, found), mmproj[0] if mmproj else None)
    if source.quant is not None:
        picked = [n for n in candidates if _matches(n, source.quant)]
        if not picked:
            have = ", ".join(sorted({_tag(n) for n in candidates})) or "no GGUF files"
            raise HubError(f"{source.repo}: no GGUF for quant {source.quant!r} (it has: {have})")
    else:
        picked = []
        for quant in DEFAULT_QUANTS:
            picked = [n for n in candidates if _matches(n, quant)]
            if picked:
                break
        picked = picked or candidates
        if not picked:
            raise HubError(f"{source.repo}: the repo has no GGUF file")
    first = picked[0]
    return Selection(_group(names, first), _projector(mmproj, first))


def _tag(name: str) -> str:
    stem = _quant_of(name)
    return re.split(r"[-.]", stem)[-1] if re.search(r"[-.]", stem) else stem


def _projector(mmproj: list[str], model: str) -> str | None:
    """The projector to pair with ``model``: one in its folder, F16 or the first one."""
    folder = model.rpartition("/")[0]
    here = [m for m in mmproj if m.rpartition("/")[0] == folder] or mmproj
    return next((m for m in here if "f16" in m.lower()), here[0] if here else None)
