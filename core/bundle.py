"""The model bundle: a directory of artefacts plus `manifest.json`.

The manifest lists every file with its sha256 and size, the schema, the ONNX models'
declared inputs/outputs and the ANN index parameters. `Bundle.load` refuses to serve a
bundle whose files, checksums, ONNX signatures or faiss index disagree with the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.schema import Schema

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "items.npz",
    "users.npz",
    "user_tower.onnx",
    "item_emb.npy",
    "ann.faiss",
    "itemcf.npz",
    "graph.npz",
    "popular.npy",
    "fresh.npy",
    "ranker.onnx",
)


class BundleError(Exception):
    """The bundle cannot be served; the message says why."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    out: Path,
    *,
    version: str,
    schema: Schema,
    models: dict[str, Any],
    ann: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict:
    """Hash every file in `out` (except the manifest) and write manifest.json atomically."""
    out = Path(out)
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format": FORMAT_VERSION,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": schema.dataset,
        "schema": schema.to_dict(),
        "files": files,
        "models": models,
        "ann": ann,
        "metrics": metrics,
        **(extra or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.exists():
        raise BundleError(f"{path}: no {MANIFEST} (build one with `funnel build`)")
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e


def _check_files(path: Path, manifest: dict, verify_checksums: bool) -> None:
    files = manifest.get("files", {})
    missing_decl = [f for f in REQUIRED_FILES if f not in files]
    if missing_decl:
        raise BundleError(f"{path}: manifest does not list required files {missing_decl}")
    for name, meta in files.items():
        p = path / name
        if not p.exists():
            raise BundleError(f"{path}: missing file {name}")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{path}: {name} is {size} bytes, manifest says {meta['bytes']}")
        if verify_checksums and sha256_file(p) != meta["sha256"]:
            raise BundleError(f"{path}: checksum mismatch for {name}")


def _check_onnx_signature(name: str, sess, declared: dict) -> None:
    """Inputs/outputs of an ONNX session must match the manifest (names and static dims)."""

    def dims(shape):
        return [d if isinstance(d, int) else None for d in shape]

    for kind, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want = declared.get(kind, {})
        got = {a.name: dims(a.shape) for a in actual}
        if set(got) != set(want):
            raise BundleError(f"{name}: ONNX {kind} {sorted(got)} differ from the manifest's {sorted(want)}")
        for k, shape in want.items():
            if len(shape) != len(got[k]) or any(w is not None and w != g for w, g in zip(shape, got[k])):
                raise BundleError(f"{name}: ONNX {kind[:-1]} {k} has shape {got[k]}, manifest says {shape}")


def onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One compute thread per worker: more threads oversubscribe 2 cores (PERF-NOTES).
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def cached_onnx_session(path: Path, sha256: str, cache_dir: Path | None, threads: int = 1):
    """An onnxruntime session whose large initializers (id embedding tables, weights) are
    memory-mapped from a file instead of copied onto the heap, so several worker processes
    share one copy in the page cache. The model is re-saved once by onnxruntime itself with
    its initializers in an external data file (`<cache_dir>/<sha>-ort<version>/<name>.onnx`
    + `.data`), keyed by the bundle file's checksum; onnxruntime maps page-aligned external
    data. Without a cache dir (or if the cache cannot be written) the bundle file is loaded as is."""
    import onnxruntime as ort

    if cache_dir is None:
        return onnx_session(path, threads)
    final = Path(cache_dir) / f"{sha256[:24]}-ort{ort.__version__}"
    model = final / path.name
    if not model.exists():
        tmp = Path(cache_dir) / f".{final.name}.{os.getpid()}.tmp"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.log_severity_level = 3
            so.optimized_model_filepath = str(tmp / path.name)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.stem + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(1 << 16))
            ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            try:
                os.rename(tmp, final)  # atomic; another worker may have won the race
            except OSError:
                if not model.exists():
                    raise
        except OSError:
            return onnx_session(path, threads)
        finally:
            if tmp.exists():
                for f in tmp.iterdir():
                    f.unlink()
                tmp.rmdir()
    return onnx_session(model, threads)


def load_npz(path: Path, mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays of an .npz. Members stored uncompressed (np.savez) are memory-mapped
    read-only straight from the zip (page-cache pages shared by every process that maps
    the file); compressed members are read into memory."""
    import struct
    import zipfile

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    rest = []
    with open(path, "rb") as f:
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if not mmap or info.compress_type != zipfile.ZIP_STORED:
                rest.append(key)
                continue
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: bad zip local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: {key} holds Python objects")
            n = int(np.prod(shape, dtype=np.int64))
            if n == 0:
                out[key] = np.zeros(shape, dtype)
                continue
            mm = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order="F" if fortran else "C")
            out[key] = np.asarray(mm)  # a plain ndarray view; the mapping lives as long as it does
    if rest:
        with np.load(path, allow_pickle=False) as z:
            out.update({k: z[k] for k in rest})
    return out


class IdIndex:
    """External id (str) → row index, over a sorted copy of the ids (no per-id Python
    objects: a dict of 1M strings costs ~150 MB in every worker). `lookup` is vectorised.

    Short key lists (a request's event item ids, its excludes, one user id) go through a
    bounded dict of the ids looked up recently: binary search over 1M strings misses the CPU
    caches at every step (0.24 ms for a user's 200 recent events at 1M items), and a feed
    looks up mostly the same ids as that user's previous one."""

    CACHE_KEYS = 100_000  # ids remembered (~10 MB); the dict starts over when full
    CACHED_CALL = 1_000  # longer key lists (builds, evaluation) skip the dict

    def __init__(self, ids: np.ndarray):
        self._cache: dict[str, int] = {}
        ids = np.asarray(ids)
        if ids.dtype.kind != "U":  # keys are looked up as str
            ids = ids.astype(str)
        if len(ids) > 1 and bool(np.all(ids[1:] > ids[:-1])):
            self.order, self.sorted = None, ids
        else:
            self.order = np.argsort(ids, kind="stable")
            self.sorted = ids[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def lookup(self, keys) -> np.ndarray:
        """int64 row index per key, -1 where unknown."""
        if not isinstance(keys, np.ndarray):
            keys = list(keys)
            if 0 < len(keys) <= self.CACHED_CALL:
                return self._lookup_cached(keys)
        return self._search(keys)

    def _lookup_cached(self, keys: list) -> np.ndarray:
        get = self._cache.get
        rows = [get(k, -2) for k in keys]  # -2: not in the dict (-1 is a known miss)
        todo = [i for i, r in enumerate(rows) if r == -2]
        if todo:
            found = self._search([keys[i] for i in todo]).tolist()
            if len(self._cache) + len(todo) > self.CACHE_KEYS:
                self._cache = {}  # bounded: start over (the index itself never changes)
            cache = self._cache
            for i, r in zip(todo, found):
                rows[i] = r
                cache[str(keys[i])] = r
        return np.array(rows, np.int64)

    def _search(self, keys) -> np.ndarray:
        k = np.asarray(keys, dtype=str)
        if k.size == 0 or len(self.sorted) == 0:
            return np.full(k.shape, -1, np.int64)
        # Keys go to searchsorted in the index's own dtype: a wider key array (one key longer
        # than every id, e.g. a cold user's) made numpy cast the whole index for the call
        # (2.4 ms at 400k ids). A key longer than every id matches none; it is searched as ""
        # rather than cut to the index's width, which could match another id.
        fits = np.char.str_len(k) <= self.width
        if k.dtype != self.sorted.dtype:
            k = np.where(fits, k, "").astype(self.sorted.dtype)
        pos = np.minimum(np.searchsorted(self.sorted, k), len(self.sorted) - 1)
        hit = (self.sorted[pos] == k) & fits
        rows = pos if self.order is None else self.order[pos]
        return np.where(hit, rows, -1).astype(np.int64)

    @property
    def width(self) -> int:
        """Characters in the longest id the index can hold (its string dtype's width)."""
        return self.sorted.dtype.itemsize // 4

    def get(self, key: str, default=None):
        r = int(self.lookup([str(key)])[0])
        return default if r < 0 else r

    def __getitem__(self, key: str) -> int:
        r = self.get(key)
        if r is None:
            raise KeyError(key)
        return r

    def __contains__(self, key) -> bool:
        return self.get(key) is not None


@dataclass
class Bundle:
    path: Path
    manifest: dict
    schema: Schema
    item_ids: np.ndarray
    item_fields: np.ndarray
    item_created: np.ndarray
    item_pop: np.ndarray  # float32 log1p(decayed train popularity) per item
    user_ids: np.ndarray
    user_fields: np.ndarray
    hist_indptr: np.ndarray  # user -> build-time positive history (chronological), CSR
    hist_items: np.ndarray
    hist_ts: np.ndarray
    item_emb: np.ndarray  # float32 [I, D], L2-normalised
    ann_index: Any
    itemcf_indptr: np.ndarray
    itemcf_indices: np.ndarray
    itemcf_data: np.ndarray
    ui_indptr: np.ndarray
    ui_indices: np.ndarray
    iu_indptr: np.ndarray
    iu_indices: np.ndarray
    popular: np.ndarray  # item indices, best first
    popular_score: np.ndarray
    fresh: np.ndarray  # item indices, newest first
    user_tower: Any
    ranker: Any
    prerank: Any = None  # stage B (prerank.onnx), if the bundle has one
    follow: dict[str, np.ndarray] | None = None  # user→authors and author→newest items (CSR), if the dataset has authors
    user_index: IdIndex | None = None  # external id -> row (get / lookup / [] / in)
    item_index: IdIndex | None = None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def user_history(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.hist_indptr[u], self.hist_indptr[u + 1]
        return self.hist_items[s:e], self.hist_ts[s:e]

    @classmethod
    def load(cls, path: Path | str, threads: int = 1, verify_checksums: bool = True, mmap: bool = True,
             model_cache_dir: Path | str | None = None) -> "Bundle":
        """Arrays are memory-mapped read-only (`mmap`), the faiss index's codes too where the
        index type allows; ONNX initializers are memory-mapped through `model_cache_dir`
        (see `cached_onnx_session`). Several workers then share one copy of the bundle."""
        import faiss

        path = Path(path)
        if not path.exists():
            raise BundleError(f"no bundle at {path}: build one with `funnel build --dataset ml-100k --out {path}`")
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {manifest.get('format')} is not {FORMAT_VERSION}")
        _check_files(path, manifest, verify_checksums)
        try:
            schema = Schema.from_dict(manifest["schema"])
        except (KeyError, TypeError) as e:
            raise BundleError(f"{path}: manifest schema is malformed ({e})") from e

        try:
            mode = "r" if mmap else None
            items = load_npz(path / "items.npz", mmap)
            users = load_npz(path / "users.npz", mmap)
            itemcf = load_npz(path / "itemcf.npz", mmap)
            graph = load_npz(path / "graph.npz", mmap)
            item_emb = np.asarray(np.load(path / "item_emb.npy", mmap_mode=mode, allow_pickle=False))
            popular = np.load(path / "popular.npy", allow_pickle=False)
            fresh = np.load(path / "fresh.npy", allow_pickle=False)
            follow = load_npz(path / "follow.npz", mmap) if "follow.npz" in manifest["files"] else None
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{path}: unreadable array file ({e})") from e

        n_items = len(items["item_ids"])
        n_users = len(users["user_ids"])
        d = schema.emb_dim
        _expect(item_emb.shape == (n_items, d), f"item_emb.npy has shape {item_emb.shape}, expected ({n_items}, {d})")
        _expect(items["item_fields"].shape == (n_items, len(schema.item_fields)), "items.npz item_fields shape differs from the schema")
        _expect(users["user_fields"].shape == (n_users, len(schema.user_fields)), "users.npz user_fields shape differs from the schema")
        _expect(len(users["hist_indptr"]) == n_users + 1, "users.npz hist_indptr length is not n_users + 1")
        _expect(len(itemcf["indptr"]) == n_items + 1, "itemcf.npz indptr length is not n_items + 1")
        _expect(len(graph["iu_indptr"]) == n_items + 1 and len(graph["ui_indptr"]) == n_users + 1, "graph.npz adjacency sizes differ from the catalog")
        for name, arr in (("popular.npy", popular), ("fresh.npy", fresh), ("itemcf indices", itemcf["indices"]), ("graph ui_indices", graph["ui_indices"])):
            _expect(arr.size == 0 or (arr.min() >= 0 and arr.max() < n_items), f"{name} holds item indices outside the catalog")

        if follow is not None:
            _expect(len(follow["user_indptr"]) == n_users + 1, "follow.npz user_indptr length is not n_users + 1")
            _expect(follow["author_items"].size == 0 or follow["author_items"].max() < n_items, "follow.npz holds item indices outside the catalog")
        try:
            # IO_FLAG_MMAP_IFC maps the stored codes in place (same search speed as a heap copy);
            # plain IO_FLAG_MMAP switches IVF lists to OnDiskInvertedLists, ~4x slower per query.
            flag = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if mmap else 0
            try:
                index = faiss.read_index(str(path / "ann.faiss"), flag)
            except RuntimeError:
                if not flag:
                    raise
                index = faiss.read_index(str(path / "ann.faiss"))
        except RuntimeError as e:
            raise BundleError(f"{path}: ann.faiss unreadable ({e})") from e
        _expect(index.ntotal == n_items, f"ann.faiss holds {index.ntotal} vectors, catalog has {n_items}")
        _expect(index.d == d, f"ann.faiss dimension {index.d} differs from emb_dim {d}")
        ann_params = manifest.get("ann", {})
        if "efSearch" in ann_params and hasattr(faiss, "downcast_index"):
            faiss.downcast_index(index).hnsw.efSearch = int(ann_params["efSearch"])
        if "nprobe" in ann_params:
            faiss.extract_index_ivf(index).nprobe = int(ann_params["nprobe"])

        models = manifest.get("models", {})
        sessions = {}
        # prerank.onnx (stage B) is optional: bundles built before it serve the cascade's stage A only.
        for name in ("user_tower", "ranker") + (("prerank",) if "prerank.onnx" in manifest["files"] else ()):
            try:
                sha = manifest["files"].get(f"{name}.onnx", {}).get("sha256", "")
                sess = cached_onnx_session(path / f"{name}.onnx", sha, Path(model_cache_dir) if model_cache_dir and sha else None, threads)
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"{path}: {name}.onnx unloadable ({e})") from e
            if name not in models:
                raise BundleError(f"{path}: manifest declares no signature for {name}")
            _check_onnx_signature(f"{name}.onnx", sess, models[name])
            sessions[name] = sess
        # Declared signatures must agree with the schema, not only with the files.
        ut = models["user_tower"]["inputs"]
        _expect(ut.get("user_fields", [None, -1])[1] == len(schema.user_fields), "user_tower user_fields width differs from the schema")
        _expect(ut.get("hist", [None, -1])[1] == schema.history_len, "user_tower hist length differs from the schema")
        # The serving feature assembly must build the dense features these models were trained
        # on: a bundle from before a feature change refuses to serve instead of mis-scoring.
        from rank.features import DENSE_FEATURES

        for name in sessions:
            width = list(models[name]["inputs"].get("dense", [None, None]))[1]
            if name != "user_tower" and width is not None:
                _expect(width == len(DENSE_FEATURES), f"{name} was built with {width} dense features, this server assembles "
                        f"{len(DENSE_FEATURES)} ({', '.join(DENSE_FEATURES)}): rebuild the bundle")
        rk = models["ranker"]["outputs"]
        _expect(list(rk.get("probs", [None, -1]))[1] == len(schema.tasks), "ranker output width differs from the number of tasks")
        if "prerank" in sessions:
            pr = models["prerank"]
            _expect(list(pr["outputs"].get("probs", [None, -1]))[1] == len(schema.tasks), "prerank output width differs from the number of tasks")
            # history_trim: the history axis is dynamic (at most history_len), else it is history_len
            _expect(pr["inputs"].get("hist", [None, -1])[1] == (None if pr.get("history_trim") else schema.history_len),
                    "prerank hist length differs from the schema")

        b = cls(
            path=path,
            manifest=manifest,
            schema=schema,
            item_ids=items["item_ids"],
            item_fields=items["item_fields"],
            item_created=items["item_created"],
            item_pop=items["item_pop"].astype(np.float32),
            user_ids=users["user_ids"],
            user_fields=users["user_fields"],
            hist_indptr=users["hist_indptr"],
            hist_items=users["hist_items"],
            hist_ts=users["hist_ts"],
            item_emb=item_emb if item_emb.flags.c_contiguous else np.ascontiguousarray(item_emb),
            ann_index=index,
            itemcf_indptr=itemcf["indptr"],
            itemcf_indices=itemcf["indices"],
            itemcf_data=itemcf["data"],
            ui_indptr=graph["ui_indptr"],
            ui_indices=graph["ui_indices"],
            iu_indptr=graph["iu_indptr"],
            iu_indices=graph["iu_indices"],
            popular=popular,
            popular_score=items["item_pop"][popular].astype(np.float32),
            fresh=fresh,
            user_tower=sessions["user_tower"],
            ranker=sessions["ranker"],
            prerank=sessions.get("prerank"),
            follow=follow,
        )
        b.user_index = IdIndex(b.user_ids)
        b.item_index = IdIndex(b.item_ids)
        return b


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(msg)
