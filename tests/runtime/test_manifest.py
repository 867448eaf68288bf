import json

import pytest

from coformer.runtime.files import sha256_file
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import DeviceArtifact, InputSpec, Manifest, load_manifest, write_manifest


def _bundle(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"model a")
    (tmp_path / "agg.onnx").write_bytes(b"aggregator")
    files = {n: sha256_file(tmp_path / n) for n in ("a.onnx", "agg.onnx")}
    m = Manifest(
        model={"name": "t"}, task={"kind": "classification", "labels": ["x", "y"]},
        input=InputSpec("pixels", "float32", (1, 8, 8), 4, {"kind": "image"}),
        devices=(DeviceArtifact("a", "central", "a.onnx", 16, 100, 10),),
        aggregator="agg.onnx", files=files, expected={"ensemble_accuracy": 0.9},
    )
    write_manifest(tmp_path, m)
    return m


def test_manifest_round_trips(tmp_path):
    m = _bundle(tmp_path)
    assert load_manifest(tmp_path) == m
    assert load_manifest(tmp_path).central.device == "a"


def test_tampered_artifact_is_refused_naming_the_file(tmp_path):
    _bundle(tmp_path)
    (tmp_path / "a.onnx").write_bytes(b"model b")
    with pytest.raises(CoFormerError, match=r"artifact a.onnx has SHA-256 .* the manifest says"):
        load_manifest(tmp_path)


def test_missing_artifact_is_refused(tmp_path):
    _bundle(tmp_path)
    (tmp_path / "agg.onnx").unlink()
    with pytest.raises(CoFormerError, match="agg.onnx is missing"):
        load_manifest(tmp_path)


def test_unknown_schema_version_is_refused(tmp_path):
    _bundle(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CoFormerError, match="schema_version 99 is not understood"):
        load_manifest(tmp_path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(CoFormerError, match="not a CoFormer bundle"):
        load_manifest(tmp_path)


def test_artifact_without_checksum_is_refused():
    with pytest.raises(CoFormerError, match="has no checksum"):
        Manifest(model={}, task={}, input=InputSpec("x", "float32", (2,)),
                 devices=(DeviceArtifact("a", "central", "a.onnx", 2, 1, 1),), aggregator="g.onnx",
                 files={"g.onnx": "0"})


def test_an_embedding_bundle_is_version_4_so_older_runtimes_refuse_it(tmp_path):
    from dataclasses import replace

    m = _bundle(tmp_path)
    emb = replace(m, task={"kind": "embedding", "dim": 16, "normalize": True, "pooling": "mean", "labels": []})
    assert emb.schema_version == 4 and emb.task_kind == "embedding" and m.task_kind == "classification"
    write_manifest(tmp_path, emb)
    assert load_manifest(tmp_path).task["dim"] == 16
    with pytest.raises(CoFormerError, match="needs its 'dim'"):
        replace(m, task={"kind": "embedding"})
    with pytest.raises(CoFormerError, match="task kind 'ranking' is not one of"):
        replace(m, task={"kind": "ranking"})
