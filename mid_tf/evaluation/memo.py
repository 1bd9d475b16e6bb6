"""Finished pieces of a robustness report, kept on disk so that a killed evaluation resumes.

A full report (every attack, two threat models, four models, every test image) is long to craft.
Each finished piece - one transfer attack (its adversarials scored by every model), one white-box
attack on one model, one model's gradient and eps checks - is written here as soon as it is done,
and a rerun of the eval stage reads it back instead of crafting again.

A piece is keyed by everything its numbers depend on: the attack spec, the example count, the seed,
and a fingerprint of the weights of every model involved (so a retrained model is evaluated anew,
never matched to stale numbers). Models given as plain functions have no fingerprint; their pieces
are never memoized. The file is rewritten atomically after each piece.

Several evaluation processes can share one memo (evaluation/scheduler.py: eager-only attacks such as
CW-L2, SPSA and ART's run mostly on one core, so each further worker puts another core to work). A
worker *claims* a piece before crafting it (`claims/<sha1 of the key>`, created exclusively, holding
its host and pid); the others skip it, and at the end wait for it to appear in the memo, taking it
over if its holder died. Writes merge with what is on disk under a file lock, so no
worker's pieces are lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket


def fingerprint(model) -> str | None:
    """SHA-1 of a Keras model's weights (names, shapes, bytes); None for anything else."""
    import keras
    if not isinstance(model, keras.Model):
        return None
    h = hashlib.sha1()
    for v in model.weights:
        value = v.numpy()
        h.update(f"{v.path}:{value.shape}:{value.dtype}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _has_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_none(v) for v in value)
    if isinstance(value, dict):
        return any(_has_none(v) for v in value.values())
    return False


class ReportMemo:
    """get(key) / put(key, value) over a JSON file; `path=None` keeps nothing (memo off).
    claim(key) / release(key) / holder_alive(key) let several processes share the work."""

    def __init__(self, path: str | None = None):
        self.path, self.entries, self.hits = path, {}, 0
        self.claims_dir = os.path.join(os.path.dirname(path) or ".", "claims") if path else None
        self.refresh()

    def _read(self) -> dict:
        if not (self.path and os.path.exists(self.path)):
            return {}
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # unreadable (never half-written: writes are atomic): start over

    def refresh(self) -> None:
        """Merge in the pieces other workers have written since."""
        self.entries.update(self._read())

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def key(*parts) -> str | None:
        """A key from JSON-able parts; None if any part is None (a model without fingerprint)."""
        return None if _has_none(parts) else json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str | None):
        if self.path is None or key is None or key not in self.entries:
            return None
        self.hits += 1
        return self.entries[key]

    def put(self, key: str | None, value) -> None:
        if self.path is None or key is None:
            return
        from mid_tf.artifacts import write_json_atomic
        with self._locked():
            self.entries.update(self._read())
            self.entries[key] = value
            write_json_atomic(self.path, self.entries)

    # ---- sharing the work between processes ---------------------------------------------------
    def _claim_path(self, key: str) -> str:
        return os.path.join(self.claims_dir, hashlib.sha1(key.encode()).hexdigest() + ".json")

    def claim(self, key: str | None) -> bool:
        """True if this process may craft the piece: it is not in the memo (reread from disk), and
        nobody else holds it, or its holder died."""
        if self.path is None or key is None:
            return True
        os.makedirs(self.claims_dir, exist_ok=True)
        path = self._claim_path(key)
        me = _holder()
        with self._locked():
            self.entries.update(self._read())
            if key in self.entries:
                return False  # another worker finished it meanwhile: get(key) has it now
            if os.path.exists(path):
                if self._alive(path) and _load(path) != me:
                    return False
            from mid_tf.artifacts import write_json_atomic
            write_json_atomic(path, me)
        return True

    def release(self, key: str | None) -> None:
        if self.path is None or key is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._claim_path(key))

    def holder_alive(self, key: str | None) -> bool:
        """Whether another live process on this host holds the claim on `key`."""
        if self.path is None or key is None:
            return False
        path = self._claim_path(key)
        return os.path.exists(path) and self._alive(path) and _load(path) != _holder()

    @staticmethod
    def _alive(path: str) -> bool:
        """A claim is live while its process runs: same host, same pid, same process start time
        (pids are reused, e.g. after a reboot). Claims from another host are stale: workers share a
        machine."""
        holder = _load(path)
        return bool(holder) and holder == _holder(holder.get("pid"))


def _holder(pid=None) -> dict | None:
    """{host, pid, start} of a running process (this one by default); None if it does not run."""
    pid = os.getpid() if pid is None else int(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        start = None  # no /proc: the pid alone
    return {"host": socket.gethostname(), "pid": pid, "start": start}


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
