import json
import shutil

import faiss
import numpy as np
import pytest

from core.bundle import MANIFEST, Bundle, BundleError, sha256_file


@pytest.fixture()
def bundle_copy(ml_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(ml_bundle, dst)
    return dst


def _rewrite_manifest(path, fn):
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


def _refresh_checksum(path, name):
    _rewrite_manifest(path, lambda m: m["files"].__setitem__(name, {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}))


def test_bundle_loads_and_matches_manifest(loaded_bundle):
    b = loaded_bundle
    assert b.ann_index.ntotal == b.n_items and b.item_emb.shape == (b.n_items, b.schema.emb_dim)
    assert set(b.manifest["files"]) >= {"ranker.onnx", "user_tower.onnx", "ann.faiss"}
    assert all(len(v["sha256"]) == 64 for v in b.manifest["files"].values())
    assert "ranker_heldout" in b.manifest["metrics"]


def test_corrupted_file_is_refused(bundle_copy):
    p = bundle_copy / "itemcf.npz"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for itemcf.npz"):
        Bundle.load(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "ranker.onnx").unlink()
    with pytest.raises(BundleError, match="missing file ranker.onnx"):
        Bundle.load(bundle_copy)


def test_no_bundle_says_how_to_build(tmp_path):
    with pytest.raises(BundleError, match="funnel build"):
        Bundle.load(tmp_path / "nothing")


def test_onnx_signature_mismatch_is_refused(bundle_copy):
    _rewrite_manifest(bundle_copy, lambda m: m["models"]["user_tower"]["inputs"].__setitem__("hist", [None, 7]))
    with pytest.raises(BundleError, match="hist"):
        Bundle.load(bundle_copy)


def test_faiss_index_size_mismatch_is_refused(bundle_copy, loaded_bundle):
    idx = faiss.IndexFlatIP(loaded_bundle.schema.emb_dim)
    idx.add(np.asarray(loaded_bundle.item_emb[:-3]))
    faiss.write_index(idx, str(bundle_copy / "ann.faiss"))
    _refresh_checksum(bundle_copy, "ann.faiss")
    with pytest.raises(BundleError, match="ann.faiss holds"):
        Bundle.load(bundle_copy)


def test_faiss_dimension_mismatch_is_refused(bundle_copy, loaded_bundle):
    idx = faiss.IndexFlatIP(loaded_bundle.schema.emb_dim + 1)
    idx.add(np.zeros((loaded_bundle.n_items, loaded_bundle.schema.emb_dim + 1), np.float32))
    faiss.write_index(idx, str(bundle_copy / "ann.faiss"))
    _refresh_checksum(bundle_copy, "ann.faiss")
    with pytest.raises(BundleError, match="dimension"):
        Bundle.load(bundle_copy)


def test_schema_task_count_must_match_ranker(bundle_copy):
    _rewrite_manifest(bundle_copy, lambda m: m["schema"]["tasks"].append({"name": "share", "negative": False, "given": None}))
    with pytest.raises(BundleError, match="ranker output width"):
        Bundle.load(bundle_copy)
