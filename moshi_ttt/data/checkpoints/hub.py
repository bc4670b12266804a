"""Hugging Face Hub references (`hf://owner/repo[@revision][/path]`) and downloads that work offline as online.

With the files in the local Hugging Face cache (`hf download owner/repo` on a machine with network), every
reference loads with `HF_HUB_OFFLINE=1` or without network. A probe for an optional file (config.json of a repo
that may have none, training_config.json of the older TTT layout) is answered from the cache then: a file that is
not in the cached snapshot of the revision is taken as absent, as a 404 would say online.
"""

from __future__ import annotations

import logging
import os
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import requests
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"
FORM = "hf://owner/repo[@revision][/path]"  # what a reference looks like, for messages
# Revisions that hold a "/" and need no quoting, as huggingface_hub's HfFileSystem reads them: pull requests and
# conversion branches. Any other revision with a "/" is written URL-encoded (hf://owner/repo@my%2Fbranch).
_SPECIAL_REVISION = re.compile(r"^(refs/pr/\d+|refs/convert/\w+)(?=/|$)")
_OFFLINE_ERRORS = (LocalEntryNotFoundError, OfflineModeIsEnabled, requests.ConnectionError, requests.Timeout)


@dataclass(frozen=True)
class HubRef:
    """One `hf://owner/repo[@revision][/path]` reference."""

    repo: str  # "owner/repo"
    revision: str | None = None  # branch, tag or commit hash; None: the repo's default branch ("main")
    path: str = ""  # a file or folder inside the repo; "" for the repo itself

    @classmethod
    def parse(cls, ref: str) -> HubRef:
        """Reads 'hf://owner/repo[@revision][/path]'.

        Raises:
            ValueError: for anything else (the message shows the expected form).
        """
        body = ref.removeprefix(HF_PREFIX).strip("/")
        owner, _, rest = body.partition("/")
        name, _, rest = rest.partition("/")
        revision = None
        if "@" in name:
            name, _, head = name.partition("@")
            special = _SPECIAL_REVISION.match(f"{head}/{rest}" if rest else head)
            if special:  # refs/pr/N: its slashes belong to the revision
                revision = special.group(1)
                rest = f"{head}/{rest}"[len(revision) :].strip("/")
            else:
                revision = unquote(head)
            if revision and any(part in ("", ".", "..") for part in revision.split("/")):
                raise ValueError(
                    f"{ref!r} has an empty, '.' or '..' part in its revision: name a branch, tag or commit"
                )
            if not revision:
                raise ValueError(
                    f"{ref!r} has nothing after '@': name a branch, tag or commit (hf://{owner}/{name}@main) or drop "
                    "the '@'"
                )
        parts = [part for part in rest.split("/") if part]  # hf://a/b//sub/ is hf://a/b/sub
        if any(part in (".", "..") for part in parts):
            raise ValueError(f"{ref!r} has a '.' or '..' in its path: name the folder inside the repo as it is")
        rest = "/".join(parts)
        if not ref.startswith(HF_PREFIX) or not owner or not name:
            raise ValueError(f"{ref!r} is not a Hub reference: write {FORM} (e.g. hf://kyutai/moshiko-pytorch-bf16)")
        try:
            validate_repo_id(f"{owner}/{name}")
        except HFValidationError as e:
            raise ValueError(
                f"{ref!r} does not name a Hub repo: owner and name take letters, digits, '-', '_' and '.' (no '--' "
                f"or '..', at most 96 characters); write {FORM}"
            ) from e
        return cls(f"{owner}/{name}", revision, rest)

    def __str__(self) -> str:
        if self.revision is None:
            revision = ""
        elif _SPECIAL_REVISION.fullmatch(self.revision):
            revision = f"@{self.revision}"
        else:
            revision = "@" + quote(self.revision, safe="")
        return f"{HF_PREFIX}{self.repo}{revision}" + (f"/{self.path}" if self.path else "")

    def at(self, path: str) -> HubRef:
        """The same repo and revision, another path."""
        return HubRef(self.repo, self.revision, path)

    def file(self, name: str) -> str:
        """The repo path of `name` inside this reference's folder."""
        return f"{self.path}/{name}" if self.path else name

    def download_command(self) -> str:
        """The Hub CLI command that puts this repo's revision into the local cache."""
        revision = f" --revision {self.revision}" if self.revision is not None else ""
        return f"hf download {self.repo}{revision}"


def offline_message(ref: HubRef, what: str) -> str:
    return (
        f"cannot download {what} from the Hugging Face Hub repo {ref.repo}"
        + (f" at revision {ref.revision}" if ref.revision else "")
        + " (no network, or offline mode) and it is not in the local Hugging Face cache "
        + f"({constants.HF_HUB_CACHE}). Pre-download the repo where there is network with "
        + f"`{ref.download_command()}` (then it loads offline, also with HF_HUB_OFFLINE=1, from the same cache: "
        + "HF_HOME or HF_HUB_CACHE), or with `--local-dir DIR` and load DIR instead"
    )


def _not_found_message(ref: HubRef, error: Exception) -> str:
    if isinstance(error, GatedRepoError):
        return f"Hub repo {ref.repo} is gated: accept its terms on huggingface.co and log in with `hf auth login`"
    return f"Hub repo {ref.repo} not found (or private: log in with `hf auth login`)"


def hub_call(ref: HubRef, what: str, fn: tp.Callable[[], tp.Any]) -> tp.Any:
    """Runs a Hub download, turning network and missing-file failures into one readable error.

    Raises:
        FileNotFoundError: offline or unreachable Hub with the file not cached (with how to pre-download), or no
            such repo, revision or file.
    """
    try:
        return fn()
    except _OFFLINE_ERRORS as e:
        raise FileNotFoundError(offline_message(ref, what)) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(_not_found_message(ref, e)) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {ref.repo} has no revision {ref.revision!r}") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {ref.repo} has no {what}") from e


def hub_file(ref: HubRef, filename: str) -> Path:
    """Downloads (or finds in the local cache) one file of the reference's repo and revision.

    Raises:
        FileNotFoundError: see `hub_call`.
    """
    return Path(hub_call(ref, filename, lambda: hf_hub_download(ref.repo, filename, revision=ref.revision)))


def hub_file_or_none(ref: HubRef, filename: str) -> Path | None:
    """Like hub_file, but None when the repo has no such file: a 404 online; offline (or without network), a file
    that is not in the cached snapshot of the revision, once that snapshot is there.

    Raises:
        FileNotFoundError: the repo's revision is not in the local cache and cannot be reached, or no such repo.
    """
    try:
        return Path(hf_hub_download(ref.repo, filename, revision=ref.revision))
    except _OFFLINE_ERRORS as e:
        snapshot = cached_snapshot(ref)
        if snapshot is None:
            raise FileNotFoundError(offline_message(ref, filename)) from e
        logger.info("%s is not in the cached snapshot %s of %s: taken as absent (offline)", filename, snapshot, ref)
        return None
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(_not_found_message(ref, e)) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {ref.repo} has no revision {ref.revision!r}") from e


def hub_folder(ref: HubRef, subfolder: str) -> Path:
    """Downloads the files of one folder of the reference's repo and revision; returns the local folder.

    Raises:
        FileNotFoundError: see `hub_call`.
    """
    pattern = f"{subfolder}/*" if subfolder else "*"
    root = hub_call(
        ref,
        f"folder {subfolder or '/'}",
        lambda: snapshot_download(ref.repo, revision=ref.revision, allow_patterns=[pattern]),
    )
    folder = Path(root) / subfolder
    if not folder.is_dir():  # snapshot_download matched no file: the repo's revision has no such folder
        at = f" at revision {ref.revision}" if ref.revision else ""
        cached = " in the local Hugging Face cache" if constants.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"Hub repo {ref.repo}{at} has no folder {subfolder!r}{cached}: check the path after the repo name in {ref}"
        )
    return folder


def offline_commit(ref: HubRef) -> str | None:
    """The commit hash the reference's revision names in the local cache, when the Hub is offline (HF_HUB_OFFLINE):
    then every file comes from that snapshot, so "main", a tag and the hash are one revision. None online (the branch
    may have moved since the cache was filled) or when the revision is not cached."""
    if not constants.HF_HUB_OFFLINE:
        return None
    snapshot = cached_snapshot(ref)
    return snapshot.name if snapshot is not None else None


def cached_snapshot(ref: HubRef) -> Path | None:
    """The folder of the reference's revision in the local Hugging Face cache, None if it is not there.

    The cache layout is huggingface_hub's documented one: `<HF_HUB_CACHE>/models--owner--repo/refs/<branch or tag>`
    holds the commit hash of `snapshots/<commit hash>/`.
    """
    root = Path(constants.HF_HUB_CACHE) / f"models--{ref.repo.replace('/', '--')}"
    revision = ref.revision or constants.DEFAULT_REVISION
    pointer = root / "refs" / revision
    commit = pointer.read_text().strip() if pointer.is_file() else revision
    snapshot = root / "snapshots" / commit
    if snapshot.parent != root / "snapshots" or commit in ("", ".", ".."):  # a pointer or revision that leads away
        return None
    return snapshot if snapshot.is_dir() else None


def snapshot_of(directory: Path) -> Path | None:
    """The snapshot folder of the local Hugging Face cache that `directory` lies in (a checkpoint read from the
    Hub), else None."""
    cache = Path(os.path.abspath(constants.HF_HUB_CACHE))
    path = Path(os.path.abspath(directory))
    if not path.is_relative_to(cache):
        return None
    parts = path.relative_to(cache).parts  # models--owner--repo / snapshots / <commit> / ...
    return cache.joinpath(*parts[:3]) if len(parts) >= 3 and parts[1] == "snapshots" else None


def confined_ref(ref: object, directory: Path, field: str) -> tp.Any:
    """`ref`, a file or checkpoint that the config.json in `directory` names (its base, codec, tokenizer...), checked
    when the checkpoint came from the Hub: there it must be an hf:// reference or a relative path inside the repo, so
    that a config.json on the Hub cannot send the loader to the server's own files. Local checkpoints are the user's
    own: anything goes (None too).

    Raises:
        ValueError: for a Hub checkpoint, a non-string, absolute, URL or escaping `ref` (the message names no path).
    """
    snapshot = snapshot_of(directory)
    if ref is None or snapshot is None or (isinstance(ref, str) and ref.startswith(HF_PREFIX)):
        return ref
    target = Path(os.path.normpath(Path(os.path.abspath(directory)) / ref)) if isinstance(ref, str) else None
    if target is None or "://" in ref or Path(ref).is_absolute() or not target.is_relative_to(snapshot):
        raise ValueError(
            f"the config.json of a Hub checkpoint names {field} {ref!r}: only hf:// references or files inside its "
            "repo are read"
        )
    return ref
