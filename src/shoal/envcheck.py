"""A cheap check, at start-up, that this environment's packages are the ones that load.

The seed's own breakage: a venv whose `sys.path` also reaches another environment's site-packages, ahead of its
own (conda base leaking in through PYTHONPATH), so `import numpy` finds a foreign copy and torch or soundfile fail
with baffling errors, or worse, run on the wrong versions. `warn_if_polluted` finds that in a few milliseconds
from `sys.path` and `importlib.util.find_spec` alone (it imports nothing it inspects) and says so in one line;
`describe_import_failure` turns a dependency that cannot be imported into one line with the fix. `shoal doctor`
reads the same analysis (`scan_sys_path`) for its sys.path check and explains the rest.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

#: Import names of the dependencies a foreign environment shadows with the worst effects.
CORE_PACKAGES = ("numpy", "torch", "soundfile", "tiktoken", "tokenizers", "safetensors", "soxr", "av", "fastapi", "pydantic", "uvicorn")
FIX = "unset PYTHONPATH (and run `conda deactivate` if conda is active), then reactivate this environment"


@dataclass
class PathScan:
    """sys.path against this interpreter's own site-packages."""

    own: list[Path]
    #: Other environments' site-packages that come before this one's: their packages win every import.
    shadowing: list[str] = field(default_factory=list)
    #: Other environments' site-packages after this one's (not the base interpreter's, which a venv made with
    #: --system-site-packages reads on purpose): they fill in whatever this one lacks.
    foreign: list[str] = field(default_factory=list)


def scan_sys_path(path: list[str] | None = None) -> PathScan:
    path = sys.path if path is None else path
    own = own_site_dirs()
    first_own = next((i for i, e in enumerate(path) if e and _resolve(e) in own), len(path))
    others = [(i, e) for i, e in enumerate(path) if e and is_site_dir(e) and _resolve(e) not in own]
    return PathScan(own, shadowing=[e for i, e in others if i < first_own],
                    foreign=[e for i, e in others if i > first_own and not _is_base(e)])


def pollution(path: list[str] | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """One line naming the foreign site-packages that shadow or supply shoal's core packages, or None if clean.

    A foreign directory counts if it comes before this environment's own, or if a core package would load from
    it (already imported: where it did; else where `find_spec` finds it, which imports nothing)."""
    path = sys.path if path is None else path
    environ = os.environ if environ is None else environ
    scan = scan_sys_path(path)
    leaks = {entry: [] for entry in scan.shadowing}
    for name in CORE_PACKAGES:
        for entry in scan.shadowing:
            if _find_in(name, entry):
                leaks[entry].append(name)
        where = _location(name, path)
        entry = next((e for e in scan.foreign if where and _inside(where, e)), None)
        if entry is not None and name not in leaks.setdefault(entry, []):
            leaks[entry].append(name)
    if not leaks:
        return None
    parts = []
    for entry, names in leaks.items():
        source = " (from PYTHONPATH)" if _in_pythonpath(entry, environ) else ""
        holds = f" with its own {', '.join(names)}" if names else ""
        parts.append(f"{entry}{source}{holds}")
    order = "comes before" if scan.shadowing else "is on sys.path beside"
    return (f"another environment's site-packages {order} this one's: {'; '.join(parts)}. Imports may load the "
            f"wrong copies and fail. Fix: {FIX}; `shoal doctor` shows the details")


def warn_if_polluted(logger=None, path: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """Warn once if another environment leaks into this one (see `pollution`); silent on a clean environment.

    With a `logging.Logger` the warning goes to `logger.warning`, else one `shoal: warning: ...` line to stderr.
    Returns the message (None when clean). Never raises: a check that cannot run stays quiet."""
    try:
        message = pollution(path, environ)
    except Exception:  # the check must never be what stops shoal
        return None
    if message:
        if logger is not None:
            logger.warning(message)
        else:
            print(f"shoal: warning: {message}", file=sys.stderr, flush=True)
    return message


def describe_import_failure(exc: BaseException) -> str | None:
    """One line for an exception raised while importing a dependency (not shoal itself), or None.

    Any ImportError counts, and any other exception raised by a dependency's module-level code (a numpy built
    against another ABI raises AttributeError or RuntimeError there). The line names the module, where it was
    loaded from when that is another environment, and the fix."""
    module, origin = _failing_module(exc)
    if module is None and isinstance(exc, ImportError) and exc.name:
        module = exc.name.split(".")[0]
    if module is None or module in ("shoal", "__main__"):
        return None
    detail = f"{type(exc).__name__}: {_gist(str(exc))}".removesuffix(": ")
    if origin is None:
        origin = _location(module, sys.path)
    if origin and Path(origin).name == "__init__.py":
        origin = str(Path(origin).parent)
    scan = scan_sys_path()
    foreign = next((e for e in scan.shadowing + scan.foreign if origin and _inside(origin, e)), None)
    if foreign is not None:
        source = ", from PYTHONPATH" if _in_pythonpath(foreign, os.environ) else ""
        where = f" (loaded from {origin}: another environment's site-packages{source})"
        fix = FIX
    elif scan.shadowing:  # loaded from here, but what it imports may not be
        where = f" (from {origin}; another environment's site-packages comes first: {', '.join(scan.shadowing)})"
        fix = FIX
    else:
        where = f" (from {origin})" if origin else ""
        fix = f"reinstall it here: {sys.executable} -m pip install --force-reinstall {_distribution(module)}"
    return f"{module} cannot be imported: {detail[:300]}{where}. Fix: {fix}; then run `shoal doctor`"


# -- helpers (shoal.doctor uses these too) -------------------------------------------------------------------------
def own_site_dirs() -> list[Path]:
    """This interpreter's site-packages: its prefix's, and the user site (which only this Python reads)."""
    dirs = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    dirs.update(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return [_resolve(d) for d in dirs]


def is_site_dir(entry: str) -> bool:
    return Path(entry).name in ("site-packages", "dist-packages")


def _find_in(name: str, entry: str) -> bool:
    try:
        return importlib.machinery.PathFinder.find_spec(name, [entry]) is not None
    except Exception:
        return False


def _location(name: str, path: list[str]) -> str | None:
    """Where top-level module `name` was loaded from, or would be on `path`, without importing it."""
    module = sys.modules.get(name)
    try:
        if module is not None:
            return getattr(module, "__file__", None)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
    except Exception:
        return None
    if spec is None:
        return None
    return spec.origin if spec.has_location else next(iter(spec.submodule_search_locations or []), None)


def _failing_module(exc: BaseException) -> tuple[str | None, str | None]:
    """The outermost dependency whose module-level code is in the traceback: (top-level name, its file)."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name = str(frame.f_globals.get("__name__", ""))
        top = name.split(".")[0]
        if frame.f_code.co_name == "<module>" and top and top not in ("shoal", "__main__", "importlib",
                                                                        "_frozen_importlib"):
            module = sys.modules.get(top)
            origin = getattr(module, "__file__", None) if module is not None else None
            return top, origin or (frame.f_code.co_filename if name == top else None)
        tb = tb.tb_next
    return None, None


def _gist(message: str) -> str:
    """The informative line of a long import error (numpy's opens with a banner and ends with the cause)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = [line for line in lines if line.startswith("Original error was")]
    lines = cause or [line for line in lines if not line.startswith("IMPORTANT:")] or lines
    return lines[0] if lines else ""


def _distribution(module: str) -> str:
    try:
        from importlib import metadata

        return metadata.packages_distributions().get(module, [module])[0]
    except Exception:
        return module


def _resolve(path: str | os.PathLike) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(os.path.abspath(path))


def _inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    return _resolve(path).is_relative_to(_resolve(root))


def _is_base(entry: str) -> bool:
    """The base interpreter's own site-packages, which a venv made with --system-site-packages reads on purpose."""
    return sys.prefix != sys.base_prefix and _inside(entry, sys.base_prefix)


def _in_pythonpath(entry: str, environ: Mapping[str, str]) -> bool:
    parts = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return any(_resolve(p) == _resolve(entry) for p in parts)
