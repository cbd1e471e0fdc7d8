"""`shoal download`: fetch an S1 or S2-Pro checkpoint from the Hugging Face hub into the directory shoal looks in.

Which of the two a repository holds is read off its file list: S1's five files (openaudio-s1-mini), or S2-Pro's
config, weight index, weight shards, tokenizer and codec (fishaudio/s2-pro).

The files land in a hidden `.<name>.partial` directory beside the target and move into place only once all of
them are there with the sizes the hub announced, so an interrupted download never leaves a checkpoint that looks
complete. Running the command again resumes it (huggingface_hub keeps `.incomplete` files in the partial dir).

Authentication is huggingface_hub's own: it reads `HF_TOKEN` (or the token `hf auth login` saved) by itself;
shoal never touches it. Every failure is one ShoalError line that says what to do next.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import BadRequest, CheckpointError, NotFound, ShoalError, Unauthorized, Unavailable
from shoal.layout import (CHECKPOINT_FILES, CODEC_CONFIG_FILE, MODEL_NAMES, S2_CHECKPOINT_FILES, checkpoint_files,
                          checkpoint_search_paths)

DEFAULT_REPO = "fishaudio/openaudio-s1-mini"
S2_REPO = "fishaudio/s2-pro"
#: Files fetched when the repository has them; only a kind's checkpoint files (and S2's shards) are required.
OPTIONAL_FILES = (CODEC_CONFIG_FILE, "special_tokens_map.json")
WEIGHT_SHARD_SUFFIX = ".safetensors"
#: Seconds to wait for the hub's answer to a metadata request; there are no retries on them, so an unreachable
#: hub fails in about this long at worst (a dead DNS fails at once).
METADATA_TIMEOUT = 10.0
#: Headroom over the announced sizes when checking free disk space.
SPACE_MARGIN = 1.05


@dataclass(frozen=True)
class RemoteCheckpoint:
    """What the hub says a repository holds: the commit to download and the size of each file to fetch."""

    repo: str
    commit: str
    sizes: dict[str, int | None]
    kind: str = "s1"

    @property
    def total_bytes(self) -> int:
        return sum(size or 0 for size in self.sizes.values())


def run_download(repo: str | None, directory: str | os.PathLike | None) -> int:
    """Download `repo` (default openaudio-s1-mini) into `directory` (default `checkpoints/<repo name>`)."""
    repo = repo or DEFAULT_REPO
    target = Path(directory).expanduser() if directory else default_directory(repo)
    remote = fetch_remote_checkpoint(repo, target)
    if _already_there(target, remote):
        print(f"{target} already holds {repo} at {remote.commit[:10]}: nothing to download")
        print(next_step(target))
        return 0
    check_free_space(target, remote)
    print(f"downloading {len(remote.sizes)} files ({_gb(remote.total_bytes)}) from {repo} into {target}")
    partial = partial_directory(target)
    download_files(remote, partial, target)
    verify_checkpoint_files(partial, remote.sizes, remote.kind)
    move_into_place(partial, target)
    print(f"downloaded {repo}, an {MODEL_NAMES[remote.kind]} checkpoint ({_gb(remote.total_bytes)}), to {target}")
    print(next_step(target))
    return 0


def default_directory(repo: str) -> Path:
    """`checkpoints/<repo name>`: for the default repo, the first place `shoal serve` and `shoal say` look."""
    return Path("checkpoints") / repo.rstrip("/").split("/")[-1]


def partial_directory(target: Path) -> Path:
    """Where files collect before moving into place: beside the target (same filesystem, so the move is a
    rename), hidden, and with a name no checkpoint search looks at."""
    return target.parent / f".{target.name}.partial"


def next_step(target: Path) -> str:
    """The command to run next: plain `shoal serve` when the target is what shoal finds by default (the first of
    its default places that exists)."""
    found = next((p for p in checkpoint_search_paths(None) if p.is_dir()), None)
    if found is not None and target.resolve() == found.resolve():
        return "next: shoal serve   (or: shoal say \"Hello!\" -o hello.wav)"
    return f"next: shoal serve --checkpoint {target}"


# -- the hub ---------------------------------------------------------------------------------------------------
def fetch_remote_checkpoint(repo: str, target: Path) -> RemoteCheckpoint:
    """Ask the hub which commit to fetch and how big each file is; check that access is granted (gated repos
    answer metadata requests to anyone but refuse files) before anything is written to disk."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    try:
        info = HfApi().model_info(repo, files_metadata=True, timeout=METADATA_TIMEOUT)
        present = {s.rfilename: s.size for s in info.siblings or ()}
        kind, required = remote_kind(repo, present)
        wanted = [*required, *(name for name in OPTIONAL_FILES if name in present)]
        get_hf_file_metadata(hf_hub_url(repo, required[0], revision=info.sha), timeout=METADATA_TIMEOUT)
    except ShoalError:
        raise
    except Exception as exc:
        raise explain_hub_error(exc, repo, target) from exc
    return RemoteCheckpoint(repo, info.sha, {name: present[name] for name in wanted}, kind)


def remote_kind(repo: str, present: dict[str, int | None]) -> tuple[str, list[str]]:
    """(kind, the files to fetch) of a repository from its file list: S1's files, else S2-Pro's plus every
    top-level weight shard; CheckpointError naming what is missing when it is neither."""
    if all(name in present for name in CHECKPOINT_FILES):
        return "s1", list(CHECKPOINT_FILES)
    shards = sorted(n for n in present if n.endswith(WEIGHT_SHARD_SUFFIX) and "/" not in n)
    if all(name in present for name in S2_CHECKPOINT_FILES) and shards:
        return "s2", [*S2_CHECKPOINT_FILES, *shards]
    s1_missing = [name for name in CHECKPOINT_FILES if name not in present]
    s2_missing = [name for name in S2_CHECKPOINT_FILES if name not in present] + \
        ([] if shards else [f"*{WEIGHT_SHARD_SUFFIX} shards"])
    raise CheckpointError(f"{repo} is neither an S1 checkpoint (it has no {', '.join(s1_missing)}) nor an S2-Pro "
                          f"one (no {', '.join(s2_missing)}); use {DEFAULT_REPO} or {S2_REPO}")


def download_files(remote: RemoteCheckpoint, partial: Path, target: Path) -> None:
    """Fetch each file of the pinned commit into `partial`, with huggingface_hub's progress bars."""
    from huggingface_hub import hf_hub_download

    try:
        partial.mkdir(parents=True, exist_ok=True)
        for name, size in remote.sizes.items():
            print(f"  {name} ({_gb(size or 0)})", flush=True)  # a line per file where tqdm draws no bar (no tty)
            hf_hub_download(remote.repo, name, revision=remote.commit, local_dir=partial,
                            etag_timeout=METADATA_TIMEOUT)
    except Exception as exc:
        raise explain_hub_error(exc, remote.repo, target, partial) from exc


def explain_hub_error(exc: BaseException, repo: str, target: Path, partial: Path | None = None) -> ShoalError:
    """One ShoalError line for whatever huggingface_hub, the network or the disk raised."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    by_hand = f"or download the files by hand from https://huggingface.co/{repo} into {target}"
    resume = f" (rerun to resume: finished files are kept in {partial})" if partial else ""
    status = _status(exc)
    if isinstance(exc, HFValidationError):
        return BadRequest(f"{repo!r} is not a hub repository name: use owner/name, e.g. {DEFAULT_REPO}")
    if _caused_by(exc, OfflineModeIsEnabled):
        return Unavailable(f"HF_HUB_OFFLINE is set, so the Hugging Face hub is not contacted: unset it, {by_hand}")
    if isinstance(exc, GatedRepoError) or status == 403:
        return Unauthorized(f"access to {repo} is gated: accept its licence at https://huggingface.co/{repo} "
                            "with your account, then set HF_TOKEN to a token of that account")
    if status == 401:
        return Unauthorized(f"the hub refused access to {repo} (HTTP 401): set HF_TOKEN to a valid token "
                            f"(https://huggingface.co/settings/tokens)")
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)) or status == 404:
        return NotFound(f"no repository {repo} on the Hugging Face hub (if it is private, set HF_TOKEN); "
                        f"the official checkpoints are {DEFAULT_REPO} (S1) and {S2_REPO} (S2-Pro)")
    if isinstance(exc, HfHubHTTPError):
        return Unavailable(f"the Hugging Face hub answered HTTP {status or '?'} for {repo}: try again later, "
                           f"{by_hand}{resume}")
    disk = _disk_error(exc)
    if disk is not None:
        return BadRequest(f"cannot write the checkpoint under {target.parent.resolve()}: "
                          f"{disk.strerror or disk}; free some space or pass --dir elsewhere{resume}")
    reason = _first_line(_innermost(exc))
    if _is_network_error(exc):
        return Unavailable(f"cannot reach the Hugging Face hub ({reason}): check the network (and HTTPS_PROXY), "
                           f"{by_hand}{resume}")
    return ShoalError(f"downloading {repo} failed ({type(exc).__name__}: {reason}); rerun with --debug for the "
                      f"traceback{resume}")


def _is_network_error(exc: BaseException) -> bool:
    """Whether a connection, DNS or timeout error is behind `exc`, whichever HTTP library huggingface_hub uses
    (httpx2 in 2.x, httpx in 1.x, requests before): only libraries already imported can have raised it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    kinds: list[type] = [ConnectionError, TimeoutError, socket.gaierror, LocalEntryNotFoundError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            kinds.append(kind)
    return _caused_by(exc, tuple(kinds))


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _caused_by(exc: BaseException, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _innermost(exc: BaseException) -> BaseException:
    return list(_chain(exc))[-1]


def _disk_error(exc: BaseException) -> OSError | None:
    """The local filesystem error behind `exc`, if any (no space, read-only, permission denied)."""
    local = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR)
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in local:
            return e
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# -- the disk --------------------------------------------------------------------------------------------------
def verify_checkpoint_files(directory: str | os.PathLike, sizes: dict[str, int | None] | None = None,
                            kind: str = "s1") -> Path:
    """Check that every file a `kind` checkpoint needs is in `directory` and non-empty (S2: the shards its index
    names too), and that each file in `sizes` has that many bytes. Raises CheckpointError naming every file at
    fault."""
    directory = Path(directory)
    expected = dict.fromkeys(checkpoint_files(directory, kind)) | dict(sizes or {})
    problems = []
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (actual := path.stat().st_size) == 0:
            problems.append(f"{name} is empty")
        elif size is not None and actual != size:
            problems.append(f"{name} has {actual} bytes, the hub says {size}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {'; '.join(problems)}; rerun `shoal download`")
    return directory


def _already_there(target: Path, remote: RemoteCheckpoint) -> bool:
    try:
        verify_checkpoint_files(target, remote.sizes, remote.kind)
    except CheckpointError:
        return False
    return True


def check_free_space(target: Path, remote: RemoteCheckpoint) -> None:
    """Refuse up front rather than fail after gigabytes: BadRequest if the target's filesystem is too full."""
    anchor = _nearest_existing(target)
    free = shutil.disk_usage(anchor).free
    needed = int(remote.total_bytes * SPACE_MARGIN)
    if free < needed:
        raise BadRequest(f"not enough disk space for {remote.repo} under {anchor.resolve()}: it needs "
                         f"{_gb(needed)}, {_gb(free)} is free; free some space or pass --dir elsewhere")


def move_into_place(partial: Path, target: Path) -> None:
    """Move the verified files into `target`: one rename if it does not exist yet, else file by file (each
    `os.replace` is atomic), leaving other files in `target` alone. The partial dir is removed afterwards."""
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            return
        for item in sorted(partial.iterdir()):
            os.replace(item, target / item.name)
        partial.rmdir()
    except OSError as exc:
        raise BadRequest(f"cannot move the downloaded files from {partial} to {target}: "
                         f"{exc.strerror or exc}") from exc


def _nearest_existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"

