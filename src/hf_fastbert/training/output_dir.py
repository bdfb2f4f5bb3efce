"""
A training run's output folder, written all at once: checked before any work ([`check_output_dir`]),
written in a partial folder beside it and swapped in when complete ([`staged_output_dir`]).
"""

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from ..constants import RUN_MANIFEST
from ..files import nearest_existing, sha256_file


logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(output_dir, overwrite_output_dir: bool = False, *, flag: str = "overwrite_output_dir=True"):
    """
    Raise unless a training run may write `output_dir`: a folder that does not exist yet, an empty one, or the output
    of a previous run holding nothing else (its `training_run.json` lists every file it made). Anything else (user
    files, another tool's output, a run's folder with files added since) is replaced only with `overwrite_output_dir`.
    The folder must be creatable and writable, and must not contain the current folder.

    Args:
        flag (`str`, *optional*): How the error message names the overwrite option (the CLI's
            `--overwrite-output-dir`).
    """
    path = Path(os.path.abspath(output_dir))
    if path.exists() and not path.is_dir():
        raise ValueError(f"the output folder {output_dir} is a file")
    if path.exists() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"the output folder {output_dir} contains the current folder: a run cannot replace it")
    if path.is_dir() and any(path.iterdir()) and not overwrite_output_dir:
        made, digests = None, {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            manifest = json.loads((path / RUN_MANIFEST).read_text())
            made, digests = set(manifest["files"]), dict(manifest.get("sha256") or {})
        if made is None:
            raise ValueError(
                f"the output folder {output_dir} is not empty and is not a previous training run's output: pick "
                f"another folder, or pass {flag} to replace everything in it"
            )
        others = sorted(set(os.listdir(path)) - made)
        if others:
            raise ValueError(
                f"the output folder {output_dir} holds files the previous training run did not write "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): move them, pick another folder, or "
                f"pass {flag} to replace everything in it"
            )
        changed = sorted(
            name for name, digest in digests.items() if (path / name).is_file() and sha256_file(path / name) != digest
        )
        if changed:  # `calibrate --save` wrote a new default speed, or a user edited the config
            raise ValueError(
                f"the output folder {output_dir} holds files changed since the previous training run wrote them "
                f"({', '.join(changed[:5])}): pick another folder, or pass {flag} to replace everything in it"
            )
    existing = nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"cannot write the output folder {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the output folder {output_dir}: the folder {existing} is not writable")


def _claim_partial_folder(holder: Path, output_dir) -> None:
    """Make `holder` (the main process). A leftover of an interrupted run is deleted, unless it holds checkpoints or
    a live run on this machine is using it."""
    owner_file = holder / "owner.json"
    if holder.exists():
        owner = {}
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(owner_file.read_text())
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and pid != os.getpid():
            if owner.get("host") != socket.gethostname():
                raise ValueError(
                    f"{holder} belongs to a training run on {owner.get('host')} writing {output_dir}: wait for it, or "
                    "delete that folder if no run is writing it"
                )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                raise ValueError(f"another training run (process {pid}) is writing {output_dir}: wait for it")
        if any(path.is_dir() for path in holder.rglob("checkpoint-*")):
            raise ValueError(
                f"an interrupted run left checkpoints in {holder}: resume from them or delete that folder first"
            )
        shutil.rmtree(holder)  # an interrupted run's leftovers: nothing in it was finished
    holder.mkdir(parents=True, exist_ok=True)
    owner_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _replace_folder(source: Path, target: Path, trash: Path) -> None:
    """Move `source` to `target`, replacing it: two renames, `target` missing only in between."""
    if target.exists():
        os.rename(target, trash)
    try:
        os.rename(source, target)
    except OSError:
        if trash.exists():
            os.rename(trash, target)
        raise


@contextlib.contextmanager
def staged_output_dir(output_dir, *, main_process: bool | None = None):
    """
    Context manager for writing a run's output folder all at once: yields an empty folder with the same name inside
    `.<name>.partial/` next to `output_dir`; when the block ends without error, that folder replaces `output_dir`
    (whose previous content is deleted) with `training_run.json` listing its files. Until then `output_dir` keeps
    its previous content, so an interrupted run never leaves a half-written model there. On an error the partial
    folder is deleted, unless it holds Trainer checkpoints (`checkpoint-*`), which are kept for resuming. A partial
    folder left by a killed run is deleted by the next run. Check `output_dir` first with [`check_output_dir`].

    With several processes (DDP) every process gets the same folder; only the main one creates and publishes it.
    """
    main_process = _is_main_process() if main_process is None else main_process
    final = Path(os.path.abspath(output_dir))
    holder = final.parent / f".{final.name}{PARTIAL_SUFFIX}"
    staging = holder / final.name
    existing = nearest_existing(final.parent)
    if main_process:
        _claim_partial_folder(holder, output_dir)
        staging.mkdir(exist_ok=True)
    try:
        yield str(staging)
    except BaseException:
        if main_process:
            checkpoints = [path for path in staging.rglob("checkpoint-*") if path.is_dir()]
            if checkpoints:
                logger.warning("The run did not finish; its checkpoints are kept in %s", staging)
            else:
                shutil.rmtree(holder, ignore_errors=True)
                for folder in [final.parent, *final.parent.parents]:  # the parents this run created, if empty
                    if folder == existing or not folder.is_relative_to(existing):
                        break
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        raise
    if main_process:
        finetune = staging / "_finetune"
        if finetune.is_dir() and not any(finetune.iterdir()):  # stage 2 saved no checkpoint: nothing to keep
            finetune.rmdir()
        files = sorted({*os.listdir(staging), RUN_MANIFEST})
        digests = {
            name: sha256_file(staging / name) for name in files if name != RUN_MANIFEST and (staging / name).is_file()
        }
        (staging / RUN_MANIFEST).write_text(json.dumps({"files": files, "sha256": digests}, indent=2) + "\n")
        _replace_folder(staging, final, holder / "previous")
        shutil.rmtree(holder)


__all__ = ["PARTIAL_SUFFIX", "check_output_dir", "staged_output_dir"]
