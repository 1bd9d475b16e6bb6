"""Version directories under an export base, published atomically; leftovers of killed exports cleaned up.

TF Serving loads any integer-named directory it sees, so a version is written into a temporary sibling
(`.tmp-<pid>-<version>`, not an integer) and renamed into place only once it is complete; replacing a
version (`--overwrite`) first moves the old one aside as `<version>.old-<pid>`. An export killed
outright (SIGKILL, power loss) cannot delete those, so the next export does (`clean_stale`), but only
those of a process that is gone, or of a process that started after the leftover was last written
(its pid was reused): a concurrent export's work in progress is never touched. Pids are this host's:
exports into one base from several hosts (a shared file system) must not overlap. TensorFlow-free.
"""

from __future__ import annotations

import os
import re
import shutil

from mid_tf.export.errors import ExportError

TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"^\.tmp-(\d+)-")
_OLD_RE = re.compile(r"^(\d+)\.old-(\d+)$")
CLOCK_SLACK_S = 2.0  # /proc/stat's boot time has 1 s resolution


def existing_versions(export_base: str) -> list[int]:
    """Integer-named subdirectories: what TF Serving would consider versions."""
    if not os.path.isdir(export_base):
        return []
    return sorted(int(n) for n in os.listdir(export_base)
                  if n.isdigit() and os.path.isdir(os.path.join(export_base, n)))


def next_version(export_base: str) -> int:
    versions = existing_versions(export_base)
    return versions[-1] + 1 if versions else 1


def tmp_path(export_base: str, version: int) -> str:
    return os.path.join(export_base, f"{TMP_PREFIX}{os.getpid()}-{version}")


def move_into_place(tmp: str, final: str, overwrite: bool) -> None:
    """rename(2) is atomic: TF Serving sees either no version directory or a complete one."""
    old = None
    if os.path.exists(final):
        if not overwrite:  # another exporter won the race for this version number
            raise ExportError(f"{final} appeared while exporting; rerun to export the next version")
        old = f"{final}.old-{os.getpid()}"  # not an integer: TF Serving ignores it
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if old is not None:
            os.rename(old, final)
        raise ExportError(f"could not move the export into {final}: {e}; rerun to export the next version") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc on Linux; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): starttime
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def owner_is_gone(pid: int, written_at: float) -> bool:
    """True when the process that wrote a leftover (last written at `written_at`) no longer runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = process_start_time(pid)
    return started is not None and started > written_at + CLOCK_SLACK_S  # the pid was reused since


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def clean_stale(export_base: str) -> list[str]:
    """Removes what killed exports left in `export_base`; returns one line per action taken.

    A `<N>.old-<pid>` whose `<N>/` is missing was being replaced when its exporter died between the two
    renames: it is the version that was being served, so it is restored rather than deleted.
    """
    if not os.path.isdir(export_base):
        return []
    actions = []
    for name in sorted(os.listdir(export_base)):
        tmp, old = _TMP_RE.match(name), _OLD_RE.match(name)
        if not (tmp or old):
            continue
        path = os.path.join(export_base, name)
        try:
            written_at = os.lstat(path).st_mtime
        except FileNotFoundError:  # its exporter finished meanwhile
            continue
        if not owner_is_gone(int((tmp or old).group(1 if tmp else 2)), written_at):
            continue
        final = os.path.join(export_base, old.group(1)) if old else None
        if final and not os.path.exists(final) and os.path.isfile(os.path.join(path, "saved_model.pb")):
            os.rename(path, final)
            actions.append(f"restored {final} from {name}, left by an export that was killed while replacing it")
        else:
            _remove(path)
            actions.append(f"removed {path}, left by an export that was killed")
    return actions
