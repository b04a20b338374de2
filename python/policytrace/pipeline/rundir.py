"""The run folder: a layout several processes can fill, and that never lies about its contents.

::

    config.toml            the resolved config (written once, at the start)
    fingerprint.json       config digest + digests of every input (probes, pairs, model, SAE)
    manifest.json          status, facts per stage, final files with their digests (rank 0 only)
    base.npz               the base probe pass (H0, y0), cached: stages/base_pass.json vouches for it
    policy.parquet  policy.json  features.parquet  probes.parquet      stages/base.json vouches
    shards/{deltas,pair_features,pairs}-NNNNN.*   one shard's outputs
    shards/done-NNNNN.json                        the shard's marker: its pairs and file digests
    pairs.parquet  pair_features.parquet  interference.parquet        merged at the end

Every file is written atomically (``policytrace._files``). A shard is finished when its marker
exists and every file it names still has the digest it records; a marker is written last and by
the process that computed the shard, so processes filling one folder never write the same file.
A missing, truncated or altered file therefore fails its digest and is recomputed (logged), and a
folder whose inputs changed since it was started is refused with :class:`RunFolderError`
naming the input. docs/design.md ("Run folder") has the whole contract.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from .._files import digest_bytes, digest_file, remove_stale_temporaries, write_atomic
from ..errors import RunFolderError

MANIFEST_VERSION = 2
FINAL_OUTPUTS = ("pairs.parquet", "pair_features.parquet", "pair_behaviour.parquet", "interference.parquet",
                 "interference_groups.parquet")
SHARD_KINDS = {"deltas": "npz", "pair_features": "parquet", "pairs": "parquet", "pair_behaviour": "parquet",
               "pair_layers": "parquet"}


@dataclass(frozen=True)
class Fingerprint:
    """What a run's outputs depend on: the config's digest (and the settings behind it), each
    input's identity, and the thread counts the numbers were computed with (float32 results
    can depend on them)."""

    config_digest: str
    inputs: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)

    def diff(self, other: "Fingerprint") -> list[str]:
        """Names of what differs (``config`` and/or input names)."""
        out = ["config"] if self.config_digest != other.config_digest else []
        keys = sorted(set(self.inputs) | set(other.inputs))
        return out + [k for k in keys if self.inputs.get(k) != other.inputs.get(k)]

    def changed_settings(self, other: "Fingerprint") -> list[str]:
        """The ``table.key`` settings that differ (empty when a side did not record them)."""
        if not self.settings or not other.settings:
            return []
        keys = sorted(set(self.settings) | set(other.settings))
        return [k for k in keys if self.settings.get(k) != other.settings.get(k)]

    def changed_threads(self, other: "Fingerprint") -> bool:
        return bool(self.threads) and bool(other.threads) and self.threads != other.threads


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    # No statistics: the bytes then depend on the values only (byte-identical resumes).
    frame.write_parquet(buf, statistics=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class RunDir:
    """Paths, typed reads, digest-checked writes and markers of one run folder."""

    def __init__(self, path: str | Path, log: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.log = log

    # --- files -----------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write(self, name: str, data: bytes | str) -> str:
        """Write ``name`` atomically; returns the digest of what was written."""
        raw = data.encode() if isinstance(data, str) else data
        write_atomic(self.file(name), raw)
        return digest_bytes(raw)

    def write_parquet(self, name: str, frame: pl.DataFrame) -> str:
        return self.write(name, parquet_bytes(frame))

    def write_npz(self, name: str, **arrays: np.ndarray) -> str:
        return self.write(name, npz_bytes(**arrays))

    def write_json(self, name: str, doc: Any) -> str:
        return self.write(name, json.dumps(doc, indent=1, sort_keys=True))

    def _damaged(self, name: str, why: str) -> RunFolderError:
        return RunFolderError(
            f"{self.file(name)} {why}; run the same `policytrace run` command again to recompute it "
            "(or start a new run folder)"
        )

    def read_json(self, name: str, kind: type = dict) -> Any:
        path = self.file(name)
        if not path.is_file():
            raise self._damaged(name, "is missing")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._damaged(name, f"is not valid JSON ({e})") from e
        if not isinstance(doc, kind):
            raise self._damaged(name, f"holds a JSON {type(doc).__name__}, not a {kind.__name__}")
        return doc

    def read_parquet(self, name: str) -> pl.DataFrame:
        path = self.file(name)
        if not path.is_file():
            raise self._damaged(name, "is missing")
        try:
            return pl.read_parquet(path)
        except Exception as e:  # polars: ComputeError, OSError, ... on truncated files
            raise self._damaged(name, f"is not a readable Parquet file ({type(e).__name__})") from e

    def read_npz(self, name: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        path = self.file(name)
        if not path.is_file():
            raise self._damaged(name, "is missing")
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in keys}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise self._damaged(name, f"is not a readable .npz archive with {list(keys)} ({type(e).__name__})") from e

    def damaged(self, files: dict[str, str]) -> list[str]:
        """The names in ``files`` (name → digest) that are missing or hold other bytes."""
        bad = []
        for name, digest in files.items():
            path = self.file(name)
            if not path.is_file() or digest_file(path) != digest:
                bad.append(name)
        return bad

    # --- markers ---------------------------------------------------------------------
    def marker(self, name: str) -> dict | None:
        """A marker's record, or None when it is absent or unreadable (then the work it would
        vouch for is done again)."""
        path = self.file(name)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.log(f"{path} is unreadable; redoing the work it vouched for")
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None

    def valid_marker(self, name: str) -> dict | None:
        """The marker's record if every file it vouches for is intact; else None (logged)."""
        rec = self.marker(name)
        if rec is None:
            return None
        bad = self.damaged(rec["files"])
        if bad:
            self.log(f"{', '.join(bad)} missing or changed since {name} was written; recomputing")
            return None
        return rec

    def mark(self, name: str, record: dict) -> None:
        self.write_json(name, record)

    @staticmethod
    def shard_file(kind: str, shard: int) -> str:
        return f"shards/{kind}-{shard:05d}.{SHARD_KINDS[kind]}"

    @staticmethod
    def shard_marker(shard: int) -> str:
        return f"shards/done-{shard:05d}.json"

    # --- fingerprint, manifest ------------------------------------------------------------
    def make(self) -> None:
        """Create the folder, or say why it cannot be one."""
        blocker = next((p for p in [self.path, *self.path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise RunFolderError(f"cannot use {self.path} as a run folder: {blocker} is a file; choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder {self.path} ({e.strerror}); choose another --out") from e

    def open_for_run(self, fp: Fingerprint, config_toml: str) -> dict | None:
        """Check the folder belongs to this config and these inputs, clean temporaries of
        killed writers, and write config/fingerprint when new. Returns the manifest when the
        run is complete and intact (nothing to do), else None."""
        self.make()
        self._check_version()
        fp_path = self.file("fingerprint.json")
        if fp_path.exists():
            stored = self._stored_fingerprint()
            changed = stored.diff(fp)
            if "config" in changed:
                keys = stored.changed_settings(fp)
                which = f" ({', '.join(keys[:8])} changed)" if keys else ""
                raise RunFolderError(
                    f"{self.path} holds a run of a different configuration{which}; pass a new run folder "
                    "(or delete this one) to run this config"
                )
            if changed:
                raise RunFolderError(
                    f"{self.path} was started with other inputs: {', '.join(changed)} changed since "
                    "(a resumed run would mix two data sets); restore them or use a new run folder"
                )
            if stored.changed_threads(fp) and self._intact_manifest() is None:
                raise RunFolderError(
                    f"{self.path} was computed with {_threads(stored.threads)} per process, this process has "
                    f"{_threads(fp.threads)}; float32 results can depend on the thread count, so the resumed "
                    "shards would not match the finished ones. Set run.threads (numeric core) and "
                    "OMP_NUM_THREADS or torch.set_num_threads (torch) to the folder's counts, or use a new run folder"
                )
        for gone in remove_stale_temporaries(self.path):
            self.log(f"removed {gone.relative_to(self.path)}, left by a killed writer")
        if not fp_path.exists():
            self.write("config.toml", config_toml)
            self.write_json("fingerprint.json", asdict(fp))
        return self._intact_manifest()

    def _check_version(self) -> None:
        path = self.file("manifest.json")
        if not path.exists():
            return
        doc = self.peek_manifest()
        if doc is not None and doc.get("version") != MANIFEST_VERSION:
            raise RunFolderError(f"{self.path} was written by another policytrace version (manifest version "
                                 f"{doc.get('version')}); use a new run folder")

    def peek_manifest(self) -> dict | None:
        path = self.file("manifest.json")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    def _stored_fingerprint(self) -> Fingerprint:
        doc = self.read_json("fingerprint.json")
        try:
            return Fingerprint(str(doc["config_digest"]), {str(k): str(v) for k, v in doc["inputs"].items()},
                               dict(doc.get("settings", {})), {str(k): int(v) for k, v in doc.get("threads", {}).items()})
        except (KeyError, AttributeError, TypeError) as e:
            raise self._damaged("fingerprint.json", "is not a policytrace fingerprint") from e

    def _intact_manifest(self) -> dict | None:
        doc = self.peek_manifest()
        if doc is None or doc.get("status") != "complete" or not isinstance(doc.get("files"), dict):
            return None
        bad = self.damaged(doc["files"])
        if bad:
            self.log(f"{', '.join(bad)} missing or changed since the run finished; recomputing")
            return None
        return doc

    def write_manifest(self, doc: dict) -> None:
        self.write_json("manifest.json", {"version": MANIFEST_VERSION, **doc})

    def complete(self) -> dict:
        """The manifest of a finished, intact run (for report and validate), or a typed error
        naming what is wrong and what to do."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path} is not a run folder; run `policytrace run` first")
        doc = self.read_json("manifest.json")
        if doc.get("version") != MANIFEST_VERSION:
            raise RunFolderError(f"{self.path} was written by another policytrace version; run it again")
        if doc.get("status") != "complete" or not isinstance(doc.get("files"), dict):
            raise RunFolderError(f"{self.path} is not a finished run folder; run `policytrace run` (again) to finish it")
        bad = self.damaged(doc["files"])
        if bad:
            raise self._damaged(bad[0], "is missing or changed since the run finished")
        return doc


def _threads(counts: dict[str, int]) -> str:
    return f"{counts.get('core', '?')} numeric-core and {counts.get('torch', '?')} torch threads"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
