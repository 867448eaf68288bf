"""trtexec as a subprocess: the command CoFormer gives it and the import of what it writes.

Without TensorRT here, ``trtexec`` on the PATH is a small script standing in for it: it records
its arguments and writes ``--exportTimes`` records. These tests check CoFormer's command line,
its rounding to trtexec's units, its refusals and the import: not trtexec."""

import json
import os
import stat
import sys

import numpy as np
import pytest

from coformer.runtime.errors import CoFormerError
from coformer.runtime.timing import trace_record
from coformer.runtime.trtexec import run_trtexec, trace_summary, trtexec_command

FAKE = """#!{python}
import json, sys
if "--help" in sys.argv:  # trtexec's test banner, then its help (samples/common/logging.h)
    print("&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] [b10] # trtexec --help")
    print("=== Model Options ===")
    sys.exit(0)
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
json.dump(sys.argv[1:], open(args["exportTimes"] + ".args", "w"))
n = int(args["iterations"])
json.dump([{{"startEnqMs": 10.0 * i, "endEnqMs": 10.0 * i + 0.1, "startH2dMs": 10.0 * i,
             "endH2dMs": 10.0 * i + 0.5, "startComputeMs": 10.0 * i + 0.5, "endComputeMs": 10.0 * i + 2.5,
             "startD2hMs": 10.0 * i + 2.5, "endD2hMs": 10.0 * i + 2.75}} for i in range(n)],
          open(args["exportTimes"], "w"))
sys.exit(int({exit_code}))
"""


def _fake(tmp_path, monkeypatch, exit_code=0, version=100300):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "trtexec"
    exe.write_text(FAKE.format(python=sys.executable, exit_code=exit_code, version=version))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_the_command_passes_trtexecs_float_options_as_given_and_names_the_shapes(tmp_path):
    """warmUp, duration and idleTime are floats to trtexec (std::stof, 8.6 to 11.0): 0.3 s stays 0.3 s."""
    cmd = trtexec_command(tmp_path / "m.onnx", tmp_path / "t.json", warmup_ms=50.5, iterations=20, duration_s=0.3,
                          idle_ms=2.2, precision="fp16", shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})
    assert cmd[1:] == [f"--onnx={tmp_path / 'm.onnx'}", "--warmUp=50.5", "--iterations=20", "--duration=0.3",
                       "--idleTime=2.2", f"--exportTimes={tmp_path / 't.json'}", "--fp16",
                       "--shapes=input_ids:1x16,attention_mask:1x16"]
    assert "--fp16" not in trtexec_command("m.onnx", "t.json", precision="fp32")
    with pytest.raises(CoFormerError, match="'int8'"):
        trtexec_command("m.onnx", "t.json", precision="int8")
    with pytest.raises(CoFormerError, match="duration_s must be >= 0, got -1"):
        trtexec_command("m.onnx", "t.json", duration_s=-1)


@pytest.mark.parametrize("banner, major, flag", [(8601, 8, True), (100300, 10, True), (110000, 11, False)])
def test_trtexecs_release_is_read_and_tensorrt_11_gets_no_fp16_flag(tmp_path, monkeypatch, banner, major, flag):
    """TensorRT 11's trtexec has no --fp16 and exits on an unknown option: it is not passed there,
    and the times say the engine was built at the ONNX's own types."""
    from coformer.runtime.trtexec import tensorrt_major, trtexec_version

    _fake(tmp_path, monkeypatch, version=banner)
    assert trtexec_version("trtexec") == tensorrt_major(banner) == major
    times = run_trtexec(tmp_path / "m.onnx", tmp_path / "t.json", iterations=3, precision="fp16")
    args = json.loads((tmp_path / "t.json.args").read_text())
    assert ("--fp16" in args) == flag and times["tensorrt_major"] == major
    assert times["precision"] == ("fp16" if flag else "as typed in the ONNX")


def test_a_trtexec_without_a_version_banner_is_refused_in_one_line(tmp_path, monkeypatch):
    from coformer.runtime.trtexec import trtexec_version

    exe = tmp_path / "trtexec"
    exe.write_text(f"#!{sys.executable}\nprint('usage')\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(CoFormerError, match="no '\\[TensorRT vN\\]' banner"):
        trtexec_version(str(exe))


def test_trtexecs_times_are_imported_after_it_runs(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch)
    times = run_trtexec(tmp_path / "m.onnx", tmp_path / "out" / "t.json", iterations=7, duration_s=0.1)
    assert times["iterations"] == 7 and times["compute_ms"]["median"] == pytest.approx(2.0)
    assert times["latency_ms"]["median"] == pytest.approx(2.75)  # H2D + compute + D2H
    assert "--iterations=7" in json.loads((tmp_path / "out" / "t.json.args").read_text())


def test_a_failing_or_missing_trtexec_is_refused_in_one_line(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, exit_code=3)
    with pytest.raises(CoFormerError, match="trtexec failed on .*exit 3"):
        run_trtexec(tmp_path / "m.onnx", tmp_path / "t.json")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(CoFormerError, match="trtexec is not on the PATH.*/usr/src/tensorrt/bin"):
        run_trtexec(tmp_path / "m.onnx", tmp_path / "t.json")


def test_a_gpu_backends_phases_are_laid_end_to_end_as_trtexec_reports_them():
    engine = type("E", (), {"last_h2d_ms": 0.25, "last_compute_ms": 2.0, "last_d2h_ms": 0.5,
                            "last_enqueue_ms": 0.125})()
    records = [trace_record(engine, 10.0 * i, 10.0 * i + 3.0) for i in range(5)]
    assert records[1] == {"startEnqMs": 10.25, "endEnqMs": 10.375, "startH2dMs": 10.0, "endH2dMs": 10.25,
                          "startComputeMs": 10.25, "endComputeMs": 12.25, "startD2hMs": 12.25, "endD2hMs": 12.75}
    s = trace_summary(records)
    assert s["H2D Latency"]["median"] == pytest.approx(0.25) and s["D2H Latency"]["median"] == pytest.approx(0.5)
    assert s["GPU Compute Time"]["median"] == pytest.approx(2.0) and s["Latency"]["median"] == pytest.approx(2.75)
    assert s["Enqueue Time"]["median"] == pytest.approx(0.125)
    cpu = type("C", (), {"last_compute_ms": 3.0})()  # the CPU backend: no copies, compute spans the run
    assert trace_record(cpu, 0.0, 3.0)["endH2dMs"] == 0.0 and trace_record(cpu, 0.0, 3.0)["endComputeMs"] == 3.0


def test_profile_runs_trtexec_on_every_entry_and_keeps_its_times(tmp_path, monkeypatch):
    from coformer.compiler.profile_kit import write_kit
    from coformer.runtime.profile import profile_kit
    from tests.conftest import tiny_vit

    _fake(tmp_path, monkeypatch)
    kit = tmp_path / "kit"
    write_kit(tiny_vit(), [(1, 16, 1, 16), (2, 32, 2, 64)], kit, progress=False)  # real ONNX entries
    out = tmp_path / "dev.json"
    prof = profile_kit(kit, "jetson", rounds=1, gap_iterations=0, progress=False, out=out, run_trtexec=True,
                       iterations=5)
    assert all(e["source"].startswith("trtexec --exportTimes") for e in prof["entries"])
    assert prof["precision"] == "fp16"
    assert sorted(p.name for p in (tmp_path / "dev.json.trtexec").glob("*.json")) == sorted(
        f"entry-{e['id']}.json" for e in prof["entries"])
    assert np.isclose(prof["entries"][0]["latency_estimate_ms"], 2.75)
