"""Saving an experiment folder: one atomic commit, one writer at a time.

A save writes every changed sample (and the integrated data) to a NEW file, ``<modality>/<sample>.g<N>.h5ad``
(N = the folder's generation, +1 per save), never over a file the current manifest names; then replaces the
manifest (which holds the sample table) in one ``os.replace``: that rename is the commit. Only after it are the
files of the previous generation removed. So a save killed at any point (even SIGKILL) leaves the folder as it
was before the save or as it is after it, never a mix: before the commit the old manifest names only old files;
after it the new manifest names only new ones. Files a killed save left behind (named by no manifest) are
removed by the next save.

One writer at a time: a save holds ``.expkit.lock`` (owner host, pid, user, time; created exclusively); another
save meanwhile is refused, naming the owner. A lock whose process is gone (same host) or older than
``STALE_LOCK_S`` (another host) is stale and taken over with a warning. A save is also refused when another
writer saved the folder after this experiment was loaded (its generation moved on): reload it, so no one's work
is silently overwritten.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .. import __version__
from .._logging import logger, progress
from ..errors import ExpkitError
from . import store
from .summary import summarize
from .table import SPATIAL_MODALITIES

if TYPE_CHECKING:  # pragma: no cover
    from .experiment import Experiment

LOCK = ".expkit.lock"
STALE_LOCK_S = 12 * 3600.0
STALE_TEMPORARY_S = 3600.0  # a temporary file older than this is left by a killed save, not a running one


class ConcurrentWriteError(ExpkitError):
    """Another writer holds the folder, or saved it after this experiment was loaded."""


# --------------------------------------------------------------------------------------------------- lock
def _owner() -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no user database in some containers
        user = "?"
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user, "time": store.now(),
            "since": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _stale(info: dict) -> bool:
    if info.get("host") == socket.gethostname():
        return not _alive(info.get("pid", -1))
    return time.time() - float(info.get("since", 0)) > STALE_LOCK_S


@contextmanager
def folder_lock(folder: Path) -> Iterator[dict]:
    """Hold the folder's writer lock (module doc) while the block runs."""
    path = folder / LOCK
    me = _owner()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if info and not _stale(info):
                raise ConcurrentWriteError(
                    f"experiment folder {str(folder)!r} is being saved by {info.get('user')}@{info.get('host')} "
                    f"(pid {info.get('pid')}) since {info.get('time')}; try again when it is done (if that "
                    f"process no longer exists, remove {str(path)!r})") from None
            logger.warning("taking over the stale lock of %s (owner %s@%s pid %s since %s)", folder,
                           info.get("user"), info.get("host"), info.get("pid"), info.get("time"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:  # pragma: no cover - another process keeps re-creating it
        raise ConcurrentWriteError(f"could not take the lock {str(path)!r}")
    try:
        yield me
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ staging
@contextmanager
def _without_shared_images(adata, sample: str, source) -> Iterator[None]:
    """A derived sample is written without the in-memory images it shares with its source sample."""
    entry = (adata.uns.get("spatial") or {}).get(sample) if source is not None else None
    if not isinstance(entry, dict) or not entry.get("images"):
        yield
        return
    images = entry["images"]
    entry["images"] = {}
    try:
        yield
    finally:
        entry["images"] = images


def _write_new(folder: Path, rel: str, write) -> Path:
    """Write a file under its new (unused) name: written to a temporary, renamed when complete."""
    target = folder / rel
    with store.staged(target) as tmp:
        write(tmp)
        os.replace(tmp, target)
    return target


def _stage_images(expm: "Experiment", modality: str, sample: str, adata) -> dict:
    """The sample's in-memory images copied into its chunked image store (once)."""
    if modality not in SPATIAL_MODALITIES or not adata.uns.get("spatial", {}).get(sample, {}).get("images"):
        return {}
    if expm._derived_from(modality, sample) is not None:
        return {}  # its images are the source sample's
    rel = store.image_file(modality, sample)
    if (expm.path / rel).is_file():
        return {"images": rel}
    from ..io.images import ImageStore

    target = expm.path / rel
    with store.staged(target) as tmp:
        tmp.unlink()
        ImageStore(tmp).fill_from_uns(adata, sample)
        os.replace(tmp, target)
    return {"images": rel}


def _stage_samples(expm: "Experiment", gen: int, mods: dict, written: list[Path]) -> list[str]:
    todo = sorted(expm._changed)
    with progress(len(todo), "saving") as advance:
        for modality, sample in todo:
            adata = expm._adatas[(modality, sample)]
            rel = store.sample_file(modality, sample, gen)
            source = expm._derived_from(modality, sample)

            def write(tmp, adata=adata, sample=sample, source=source):
                with _without_shared_images(adata, sample, source):
                    store.write_h5ad(adata, tmp)

            written.append(_write_new(expm.path, rel, write))
            entry = dict(mods.get(modality, {}).get(sample, {}))
            entry.update(file=rel, summary=summarize(adata), saved=store.now())
            entry.update(_stage_images(expm, modality, sample, adata))
            mods.setdefault(modality, {})[sample] = entry
            advance(sample)
    return todo


def _referenced(manifest: dict) -> set[str]:
    files = {e.get("file") for m in manifest.get("modalities", {}).values() for e in m.values()}
    files |= {e.get("images") for m in manifest.get("modalities", {}).values() for e in m.values()}
    if manifest.get("integrated"):
        files.add(manifest["integrated"].get("file"))
    return {f for f in files if f}


def _unreferenced(folder: Path, manifest: dict) -> list[Path]:
    """Sample, image and integrated files the manifest does not name (previous generations, killed saves)."""
    keep = _referenced(manifest)
    found = []
    from .table import MODALITIES

    patterns = [f"{m}/*.h5ad" for m in MODALITIES] + [f"images/{m}/*.h5" for m in MODALITIES] + ["integrated*.h5mu"]
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(folder)) not in keep:
                found.append(p)
    return found


# --------------------------------------------------------------------------------------------------- save
def save(expm: "Experiment") -> Path:
    """Write what changed as one atomic commit (module doc); returns the folder."""
    folder = expm.path
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder) as owner:
        disk_gen = _disk_generation(folder)
        if disk_gen is not None and disk_gen != expm._manifest.get("generation", 0):
            raise ConcurrentWriteError(
                f"experiment folder {str(folder)!r} was saved by another writer after this experiment was loaded "
                f"(generation {disk_gen}, this one has {expm._manifest.get('generation', 0)}); load it again and "
                f"redo the changes: saving would overwrite that work")
        manifest = dict(expm._manifest)
        gen = int(manifest.get("generation", 0)) + 1
        mods = {m: dict(v) for m, v in manifest.get("modalities", {}).items()}
        written: list[Path] = []
        try:
            todo = _stage_samples(expm, gen, mods, written)
            _stage_integrated(expm, manifest, gen, written)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        present = {(m, s) for m, s in zip(expm._table["modality"], expm._table["sample"])}
        for m in mods:
            for s in [s for s in mods[m] if (m, s) not in present]:
                mods[m].pop(s)
        manifest.update(modalities={m: v for m, v in mods.items() if v}, expkit_version=__version__,
                        modified=store.now(), generation=gen, table=expm._table.to_dict(orient="records"),
                        writer={k: owner[k] for k in ("host", "pid", "user", "time")})
        lines = [json.dumps({**e, "generation": gen}, default=str) for e in expm._history_pending()]
        manifest["history_tail"] = {"generation": gen, "lines": lines}  # committed with the manifest
        store.write_json_atomic(folder / store.MANIFEST, manifest)  # the commit
        repair_history(folder, manifest)
        store.write_text_atomic(folder / store.TABLE, expm._table.to_csv(sep="\t", index=False))
        for p in _unreferenced(folder, manifest):
            store.remove_quietly(p)
        for tmp in store.leftover_temporaries(folder, older_than=STALE_TEMPORARY_S):
            tmp.unlink(missing_ok=True)
    expm._manifest = manifest
    expm._changed.clear()
    expm._integrated_changed = False
    expm._history_saved()
    logger.info("saved experiment %s (%d sample file(s) written, generation %d)", folder, len(todo), gen)
    return folder


def read_history(folder: Path) -> list[dict]:
    path = folder / store.HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line a user edited by hand: skipped, never fatal
            continue
    return out


def _last_generation(path: Path) -> int:
    """The generation of the log's last line (lines are appended in generation order): only the file's end is
    read, so opening a folder with a long history stays cheap."""
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 65536))
        lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("generation", 0))
        except (ValueError, TypeError, AttributeError):  # a partial first line of the window, or a hand edit
            continue
    return 0


def repair_history(folder: Path, manifest: dict) -> None:
    """Append the committed save's history lines when ``history.jsonl`` does not have them yet (the save was
    killed between its commit and the append, or this is the append itself)."""
    tail = manifest.get("history_tail") or {}
    if not tail.get("lines"):
        return
    if _last_generation(folder / store.HISTORY) < int(tail["generation"]):
        store.append_lines_atomic(folder / store.HISTORY, tail["lines"])


def _stage_integrated(expm, manifest: dict, gen: int, written: list[Path]) -> None:
    if expm._integrated is not None and expm._integrated_changed:
        rel = store.integrated_file(gen)
        written.append(_write_new(expm.path, rel, lambda tmp: store.write_h5mu(expm._integrated, tmp)))
        manifest["integrated"] = {"file": rel, "saved": store.now(), "stale": False,
                                  "summary": {m: summarize(a) for m, a in expm._integrated.mod.items()}}
    elif expm._changed and manifest.get("integrated"):
        manifest["integrated"] = {**manifest["integrated"], "stale": True}


def _disk_generation(folder: Path) -> int | None:
    path = folder / store.MANIFEST
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text()).get("generation", 0))
    except (OSError, ValueError, TypeError):
        return None
