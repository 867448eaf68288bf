"""A user's own pretrained model and photos, end to end through the CLI: a timm DeiT and Swin
checkpoint saved to disk (random init, depth reduced), a folder of real JPEG and PNG files in
class folders, `coformer compile`, `coformer serve`, `coformer-runtime infer --image`, the
profile kit and search for Swin, and `coformer bench` on its bundle."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest
from coformer.tools.sample_data import write_photos

pytestmark = pytest.mark.slow

CLASSES = ["china", "digit", "flower"]  # what write_photos makes: crops of real photos (JPEG), digits (PNG)
DEVICES = """devices:
  - {name: hub, memory_bytes: 2.0e9, flops_budget: 1.0e10, link_mbit_s: 100, cpu_share: 1.0}
  - {name: cam-a, memory_bytes: 1.0e9, flops_budget: 1.0e10, link_mbit_s: 2, cpu_share: 0.6}
  - {name: cam-b, memory_bytes: 1.0e9, flops_budget: 1.0e10, link_mbit_s: 2, cpu_share: 0.4}
"""
MODELS = {
    "deit": ("timm:deit_tiny_patch16_224", {"depth": 2}, "deit.pth"),
    # half of Swin-T's width as well (the stages' channels 48..384): a quarter of its compute
    "swin": ("timm:swin_tiny_patch4_window7_224", {"depths": [1, 1, 1, 1], "embed_dim": 48,
                                                   "num_heads": [2, 4, 8, 16]}, "swin.safetensors"),
}


def run(tool, *args, timeout=900):
    module = {"coformer": "coformer.tools.cli", "coformer-runtime": "coformer.runtime.cli"}[tool]
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def save_checkpoint(kind: str, path: Path) -> None:
    import timm

    name, kwargs, _ = MODELS[kind]
    torch.manual_seed(0)
    model = timm.create_model(name[5:], pretrained=False, num_classes=len(CLASSES), **kwargs).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save({"model": model.state_dict(), "epoch": 300}, path)  # a training checkpoint's wrapping


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    write_photos(tmp / "photos")
    (tmp / "devices.yaml").write_text(DEVICES)
    bundles = {}
    for kind, (name, kwargs, file) in MODELS.items():
        save_checkpoint(kind, tmp / file)
        done = run("coformer", "compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs",
                   json.dumps(kwargs), "--data", tmp / "photos", "--devices", tmp / "devices.yaml",
                   "--out", tmp / f"{kind}-bundle", "--epochs", "1", "--device", "cpu", "--workers", "1",
                   "--no-progress", "--report-json", tmp / f"{kind}.json")
        assert done.returncode == 0, done.stderr[-3000:]
        bundles[kind] = (tmp / f"{kind}-bundle", json.loads((tmp / f"{kind}.json").read_text()), done.stdout)
    return tmp, bundles


@pytest.mark.parametrize("kind", ["deit", "swin"])
def test_compile_records_the_teachers_own_preprocessing_and_the_folders_classes(work, kind):
    import timm

    tmp, bundles = work
    bundle, report, stdout = bundles[kind]
    m = load_manifest(bundle)
    pre = m.input.preprocessing
    own = timm.create_model(MODELS[kind][0][5:], pretrained=False, **MODELS[kind][1]).pretrained_cfg
    assert pre["source"] == "timm" and pre["input_size"] == [3, 224, 224] and pre["crop_pct"] == own["crop_pct"]
    assert pre["interpolation"] == own["interpolation"] == "bicubic"
    assert pre["mean"] == pytest.approx(list(own["mean"])) and pre["std"] == pytest.approx(list(own["std"]))
    assert m.labels == CLASSES and m.model["family"] == {"deit": "vit", "swin": "swin"}[kind] and len(m.devices) == 3
    assert m.model["source"] == MODELS[kind][0] and m.model["checkpoint"].endswith(MODELS[kind][2])
    assert report["accuracy_reference"] == "labels" and report["compute"]["device"] == "cpu"
    # the split: 72 images, 20% (15) held out for the reported accuracy
    assert m.expected["samples"] == 15 and "15 test samples" in stdout
    assert not (tmp / f"{kind}-bundle.calibration").exists()  # checkpoints removed once the bundle is written


def _local_answer(bundle: Path, x: np.ndarray) -> np.ndarray:
    """The bundle's answer computed here with ONNX Runtime: every device's sub-model, then the aggregator."""
    from coformer.runtime.onnxruntime_backend import OnnxRuntimeEngine

    m = load_manifest(bundle)
    feats = []
    for d in m.devices:
        with OnnxRuntimeEngine(bundle / d.artifact, threads=1) as e:
            feats.append(next(iter(e.infer({m.input.name: x}).values())))
    with OnnxRuntimeEngine(bundle / m.aggregator, threads=1) as e:
        return next(iter(e.infer({f"feature_{i}": f for i, f in enumerate(feats)}).values()))


@pytest.mark.parametrize("kind", ["deit", "swin"])
def test_serve_then_classify_jpeg_files_from_the_device_runtime(work, kind, tmp_path):
    from coformer.runtime.images import preprocess_images

    tmp, bundles = work
    bundle = bundles[kind][0]
    files = [tmp / "photos" / "china" / "3.jpg", tmp / "photos" / "flower" / "5.jpg", tmp / "photos" / "digit" / "2.png"]
    proc = subprocess.Popen([sys.executable, "-m", "coformer.tools.cli", "serve", str(bundle), "--front",
                             "tcp://127.0.0.1:*", "--throttle", "none", "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        endpoint = re.search(r"clients connect to (\S+) with --keys (\S+)", line)
        assert endpoint, line + (proc.stderr.read() if proc.poll() is not None else "")
        done = run("coformer-runtime", "infer", bundle, "--central", endpoint.group(1), "--keys", endpoint.group(2), "--image", *files,
                   "--top-k", "2", timeout=120)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        bad = run("coformer-runtime", "infer", bundle, "--central", endpoint.group(1), "--keys", endpoint.group(2), "--image",
                  tmp / "devices.yaml", timeout=60)
        from coformer.runtime.client import Client

        with Client(endpoint.group(1), keys=endpoint.group(2), timeout_s=60) as client:  # the Python API, on the same files
            api, results = client.classify_images([str(f) for f in files], bundle, top_k=1, batch_size=2)
            # issue 39: the files go as they are, decoded on every device, and answer as their float32 pixels do
            encoded = client.infer_images(files)
            pixels = client.infer(preprocess_images(files, load_manifest(bundle).input.preprocessing))
            with pytest.raises(CoFormerError, match="not an image"):  # the client refuses a cut file before sending
                client.infer_images([files[0].read_bytes()[:600]])
            from coformer.runtime import protocol  # a peer that sends one anyway is answered, and the node serves on
            refused = client.send_raw(protocol.encode("infer", 99, images=[b"\xff\xd8 not a JPEG at all"]))
            after = client.infer_images(files[:1])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert [a["file"] for a in answer["images"]] == [str(f) for f in files]
    expected = _local_answer(bundle, preprocess_images(files, load_manifest(bundle).input.preprocessing))
    for a, logits in zip(answer["images"], expected):
        labels = [t["label"] for t in a["top_k"]]
        assert len(labels) == 2 and set(labels) <= set(CLASSES)
        assert labels[0] == CLASSES[int(np.argmax(logits))]  # served = the bundle's own answer
        assert 1.0 >= a["top_k"][0]["probability"] >= a["top_k"][1]["probability"] > 0
    assert bad.returncode == 2 and "devices.yaml is not an image" in bad.stderr and "Traceback" not in bad.stderr
    assert [a[0][0] for a in api] == [a["top_k"][0]["label"] for a in answer["images"]] and len(results) == 2
    np.testing.assert_allclose(encoded.logits, pixels.logits, atol=1e-5)  # every device preprocessed alike
    assert not encoded.degraded and not pixels.degraded
    sizes = sum(f.stat().st_size for f in files)
    print(f"to the workers: {encoded.wire_bytes_to_workers:,} bytes as files ({sizes:,} bytes of them), "
          f"{pixels.wire_bytes_to_workers:,} as float32 pixels")
    assert encoded.wire_bytes_to_workers < 2 * sizes + 2048 and 10 * encoded.wire_bytes_to_workers < pixels.wire_bytes_to_workers
    assert refused.op == "error" and refused.header["code"] == "bad_image" and not after.degraded


def test_a_flat_folder_is_label_free_distillation(work):
    tmp, _ = work
    flat = tmp / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((tmp / "photos").rglob("*.*"))[:30]):
        (flat / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    name, kwargs, file = MODELS["deit"]
    done = run("coformer", "compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs",
               json.dumps(kwargs), "--data", flat, "--devices", tmp / "devices.yaml", "--out", tmp / "flat-bundle",
               "--epochs", "0", "--val-fraction", "0.2", "--test-fraction", "0.2", "--crop-pct", "1.0",
               "--no-progress", "--report-json", tmp / "flat.json")
    assert done.returncode == 0, done.stderr[-3000:]
    m = load_manifest(tmp / "flat-bundle")
    assert m.labels == ["0", "1", "2"] and m.input.preprocessing["crop_pct"] == 1.0  # the teacher's classes
    assert json.loads((tmp / "flat.json").read_text())["accuracy_reference"] == "teacher"
    assert "agreement with the teacher" in done.stdout and m.expected["samples"] == 6


def test_prism_compile_of_a_users_deit_then_its_jpegs_served(work, coformer_here):
    """``coformer compile --strategy prism`` on a user's checkpoint and photos: the bundle's plan,
    its report, and served answers equal to PRISM's forward on the same preprocessed files."""
    from coformer.compiler.prism import prism_vit_forward
    from coformer.compiler.sources import load_teacher
    from coformer.runtime.images import preprocess_images
    from coformer.tools.cluster import LocalCluster

    tmp, _ = work
    name, kwargs, file = MODELS["deit"]
    done = run("coformer", "compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs",
               json.dumps(kwargs), "--data", tmp / "photos", "--devices", tmp / "devices.yaml", "--strategy", "prism",
               "--compression-rate", "16", "--out", tmp / "prism-bundle", "--no-progress", "--report-json",
               tmp / "prism.json")
    assert done.returncode == 0, done.stderr[-3000:]
    m = load_manifest(tmp / "prism-bundle")
    plan = m.model["plan"]
    assert m.strategy == "prism" and m.labels == CLASSES and plan["compression_rate"] == 16
    assert plan["devices"] == ["hub", "cam-a", "cam-b"] and plan["shares"] == [99, 59, 39]  # 197 by cpu_share
    report = json.loads((tmp / "prism.json").read_text())
    assert report["scores"]["samples"] == 15 and "PRISM" in done.stdout and "less than every key" in done.stdout
    assert plan["communication"]["reduction"] > 0.9
    files = [tmp / "photos" / "china" / "3.jpg", tmp / "photos" / "digit" / "2.png"]
    x = preprocess_images(files, m.input.preprocessing)
    teacher = load_teacher(name, tmp / file, kwargs, progress=False)
    want = prism_vit_forward(teacher.eval(), torch.from_numpy(x), plan["shares"], 16).numpy()
    with LocalCluster(tmp / "prism-bundle", throttle="none") as cluster, cluster.client() as client:
        r = client.infer(x)
    np.testing.assert_allclose(r.logits, want, atol=1e-4)
    bad = coformer_here("compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs", json.dumps(kwargs),
                        "--data", tmp / "photos", "--devices", tmp / "devices.yaml", "--strategy", "prism", "--student",
                        "--out", tmp / "never-prism")
    assert bad.returncode == 2 and "drop --student" in bad.stderr and not (tmp / "never-prism").exists()
    base = ["compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs", json.dumps(kwargs),
            "--data", tmp / "photos", "--devices", tmp / "devices.yaml", "--finetune-epochs", "2", "--out",
            tmp / "never-tuned"]
    for extra, message in ((["--strategy", "prism", "--compression-rate", "1"], "at CR = 1 PRISM is the teacher"),
                           ([], "fine-tunes --strategy prism")):
        bad = coformer_here(*base, *extra)
        assert bad.returncode == 2 and message in bad.stderr and not (tmp / "never-tuned").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "digits"], "the built-in digits data is 1-channel square; the model takes 3x224x224"),
    ([], "--data DIR is needed"),
    (["--data", "/nonexistent/photos"], "an image model takes a folder of images"),
    (["--device", "cuda"], "PyTorch sees no CUDA device"),
    (["--amp", "bf16", "--device", "cpu"], "--amp bf16 needs a CUDA device"),
])
def test_image_compile_errors_are_one_clear_line(work, coformer_here, args, message):
    if "cuda" in args:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present here")
    tmp, _ = work
    name, kwargs, file = MODELS["deit"]
    done = coformer_here("compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs",
                         json.dumps(kwargs), "--devices", tmp / "devices.yaml", "--out", tmp / "never", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp / "never").exists()


def test_a_folder_of_other_classes_needs_unlabeled(work, coformer_here):
    tmp, _ = work
    (tmp / "four").mkdir()
    for name in CLASSES + ["extra"]:
        src = tmp / "photos" / ("china" if name == "extra" else name)
        (tmp / "four" / name).symlink_to(src, target_is_directory=True)
    name, kwargs, file = MODELS["deit"]
    args = ["compile", "--model", name, "--checkpoint", tmp / file, "--model-kwargs", json.dumps(kwargs),
            "--data", tmp / "four", "--devices", tmp / "devices.yaml", "--out", tmp / "four-bundle", "--epochs", "0",
            "--no-progress"]
    done = coformer_here(*args)
    assert done.returncode == 2 and "has 4 class folders" in done.stderr and "--unlabeled" in done.stderr
    done = run("coformer", *args, "--unlabeled")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_manifest(tmp / "four-bundle").labels == ["0", "1", "2"]


@pytest.fixture(scope="module")
def swin_searched(work):
    """The Swin through every step a user with devices takes: a profile kit sampled from its own
    space, timed on each device, and a DeBo search over the predictors fitted on it."""
    from coformer.runtime.profile import profile_kit

    tmp, _ = work
    name, kwargs, file = MODELS["swin"]
    model = ["--model", name, "--checkpoint", tmp / file, "--model-kwargs", json.dumps(kwargs)]
    done = run("coformer", "profile-kit", *model, "--out", tmp / "kit", "--count", "7", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    kit = json.loads((tmp / "kit" / "kit.json").read_text())
    lines = DEVICES.splitlines()
    for i, dev in enumerate(("hub", "cam-a", "cam-b")):
        profile_kit(tmp / "kit", dev, warmup_ms=2, iterations=2, duration_s=0.01, rounds=1, gap_iterations=2,
                    progress=False, out=tmp / f"{dev}.json")
        lines[i + 1] = lines[i + 1].replace("}", f", profile: {tmp / (dev + '.json')}}}")
    (tmp / "profiled.yaml").write_text("\n".join(lines) + "\n")
    done = run("coformer", "compile", *model, "--data", tmp / "photos", "--devices", tmp / "profiled.yaml",
               "--out", tmp / "swin-searched", "--search", "bo", "--initial", "2", "--iterations", "1", "--epochs", "0",
               "--no-progress", "--report-json", tmp / "searched.json")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, model, kit, json.loads((tmp / "searched.json").read_text())


def test_swin_profile_kit_and_search(swin_searched):
    tmp, _, kit, report = swin_searched
    assert kit["family"] == "swin" and len(kit["entries"]) == 7
    assert any("sample" in e for e in kit["entries"])  # per-stage widths: the features differ from the sample
    assert report["search"]["bo"]["evaluations"] == 3 and report["predicted_latency_ms"] > 0
    policy = load_manifest(tmp / "swin-searched").policy
    assert policy["source"] == "bo" and all(len(s["stage_channels"]) == 3 for s in policy["submodels"])


def test_swin_bench_builds_the_strategies_of_its_family(work, swin_searched, coformer_here):
    tmp, model, _, _ = swin_searched
    done = run("coformer", "bench", work[1]["swin"][0], *model, "--data", tmp / "photos", "--devices",
               tmp / "devices.yaml", "--no-testbed", "--samples", "6", "--passes", "1", "--epochs", "0",
               "--input-source", "device", "--out", tmp / "bench", "--report-json", tmp / "bench.json",
               "--throughput", "none", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["strategy"]: r for r in json.loads((tmp / "bench.json").read_text())["results"]}
    assert set(rows) == {"coformer", "uniform", "student", "student_matched", "teacher"}  # no pipeline, tensor parallel
    assert all(r["samples"] == 6 and r["status"] == "ok" for r in rows.values())
    assert rows["coformer"]["bytes_from_devices"] < 3 * 384 * 4 + 400  # pooled features, not images
    done = coformer_here("bench", work[1]["swin"][0], *model, "--data", tmp / "photos", "--devices",
                         tmp / "devices.yaml", "--no-testbed", "--strategies", "coformer,pipeline", "--no-progress")
    assert done.returncode == 2 and "['pipeline'] cannot be built for this teacher" in done.stderr
    # a checkpoint of the same architecture with other weights would make every baseline another model's
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    other = timm.create_model(MODELS["swin"][0][5:], pretrained=False, num_classes=len(CLASSES), **MODELS["swin"][1])
    save_file(other.state_dict(), str(tmp / "other.safetensors"))
    done = coformer_here("bench", work[1]["swin"][0], "--model", MODELS["swin"][0], "--checkpoint",
                         tmp / "other.safetensors", "--model-kwargs", json.dumps(MODELS["swin"][1]), "--data",
                         tmp / "photos", "--devices", tmp / "devices.yaml", "--no-testbed", "--no-progress")
    assert done.returncode == 2 and "compiled from other weights" in done.stderr


def test_served_bench_predicts_a_swin_bundle_beside_its_probes(swin_searched):
    tmp, model, _, _ = swin_searched
    done = subprocess.run([sys.executable, "-m", "coformer.tools.served_bench", str(tmp / "swin-searched"), *map(str, model),
                           "--data", str(tmp / "photos"), "--devices", str(tmp / "profiled.yaml"), "--repeats", "1",
                           "--samples", "6", "--report-json", str(tmp / "served.json")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp / "served.json").read_text())["rows"]
    assert row["bundle"] == str(tmp / "swin-searched") and row["measured_ms"] > 0 and row["calibrated_ms"] > 0
    assert set(row["terms_ms"]["probes"]) >= {"small", "uniform"}


def test_an_image_encoder_without_a_head_compiles_to_an_embedding_bundle(work):
    """A timm model built with num_classes=0 and a flat folder: nothing to classify, so the bundle
    answers with the teacher's pooled feature (here normalised on request)."""
    import timm

    tmp, _ = work
    torch.manual_seed(0)
    encoder = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    torch.save(encoder.state_dict(), tmp / "encoder.pth")
    flat = tmp / "flat-encoder"
    flat.mkdir()
    for i, f in enumerate(sorted((tmp / "photos").rglob("*.jpg"))[:30]):
        (flat / f"{i}.jpg").write_bytes(f.read_bytes())
    done = run("coformer", "compile", "--model", "timm:deit_tiny_patch16_224", "--checkpoint", tmp / "encoder.pth",
               "--model-kwargs", json.dumps({"depth": 2, "num_classes": 0}), "--data", flat, "--devices",
               tmp / "devices.yaml", "--out", tmp / "encoder-bundle", "--epochs", "1", "--normalize", "--no-progress",
               "--report-json", tmp / "encoder.json")
    assert done.returncode == 0, done.stderr[-3000:]
    m = load_manifest(tmp / "encoder-bundle")
    assert m.task_kind == "embedding" and m.task["dim"] == 192 and m.task["normalize"] and m.labels == []
    r = json.loads((tmp / "encoder.json").read_text())
    assert r["task"] == "embedding" and r["distill"] == "feature"
    kept = r["calibration"]
    assert kept["kept"] == max(kept["val_cosine"], key=kept["val_cosine"].get)
    assert r["mean_cosine"] >= r["ridge_probe"]["mean_cosine"] - 0.01


def test_bench_sends_the_image_files_as_they_are_and_they_answer_as_their_pixels(work):
    """`--input-source files` (issue 39): the client sends each test image's file, the central node
    forwards the bytes and every device decodes them; same answers as the float32 pixels sent out, with
    a small fraction of the bytes to the workers."""
    tmp, bundles = work
    name, kwargs, file = MODELS["deit"]
    done = run("coformer", "bench", bundles["deit"][0], "--model", name, "--checkpoint", tmp / file, "--model-kwargs",
               json.dumps(kwargs), "--data", tmp / "photos", "--devices", tmp / "devices.yaml", "--no-testbed",
               "--strategies", "coformer", "--input-source", "central,files", "--samples", "6", "--passes", "1",
               "--throughput", "none", "--no-progress", "--out", tmp / "bench-files")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["input_source"]: r for r in json.loads((tmp / "bench-files" / "bench.json").read_text())["results"]}
    assert set(rows) == {"central", "files"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["files"]["accuracy"] == rows["central"]["accuracy"] and rows["files"]["samples"] == 6
    assert 10 * rows["files"]["bytes_to_devices"] < rows["central"]["bytes_to_devices"]
