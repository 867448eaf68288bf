"""Shared fixtures: tiny models built from configs (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# This user's operator key (every compile signs with it; coformer serve checks it): the suite's
# own, made afresh in a folder of its own, never the key of the user running the tests; removed
# when the run ends (it holds a secret key)
os.environ["COFORMER_CONFIG_DIR"] = tempfile.mkdtemp(prefix="coformer-test-config-")
atexit.register(shutil.rmtree, os.environ["COFORMER_CONFIG_DIR"], True)

# Two pytest-xdist workers share the cores (pyproject's addopts: ``-n 2``; issue 40, the suite
# within 20 minutes on 2 cores). One process with torch's default of a thread per core left a
# core idle a third of the time (waiting on a served round, a process starting, a socket); two
# processes that each start a thread per core make torch's threads wait on each other at every
# parallel region (a compile ran 10x slower beside one busy process). So each worker, and every
# process it starts (the variables are inherited), gets its share of the cores, one on 2 cores.
# Set before torch is imported: it reads them once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_share)


# A test file is one unit of work for a worker (``--dist loadfile``), so its module-scoped fixtures
# (a teacher trained, a bundle compiled) are made once. A session-scoped fixture is made once per
# worker that uses it, so the files here, which share the session's quickstart run
# (``quickstart_fast``, about a minute), run in one worker, in turn, and it runs once.
_SAME_WORKER = {"tests/tools/test_quickstart.py": "tests/tools/test_bench.py"}
# The longest files start first (their time, in seconds, from a run's ``--durations=0`` with two
# workers on 2 cores), so no worker is left with a long file at the end while the other idles.
# A file missing here only starts later.
_LONGEST_FIRST = ("tests/tools/test_bench.py", "tests/tools/test_quickstart.py",  # 343 together
                  "tests/tools/test_image_cli.py",  # 223
                  "tests/tools/test_minilm.py",  # 141
                  "tests/tools/test_text_cli.py",  # 132
                  "tests/tools/test_cli.py",  # 93
                  "tests/tools/test_text_bench.py", "tests/tools/test_hardening.py")  # 56, 54


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Files(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return _SAME_WORKER.get(path, path)

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gives
    return Files(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # one process (``-n 0``): the files' own order. Workers collect; the scheduler takes their order
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def tiny_vit(**overrides):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(overrides.pop("seed", 0))
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3, num_heads=4)
    cfg.update(overrides)
    return VisionTransformer(**cfg).eval()


def tiny_deit_distilled(**overrides):
    import torch
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(overrides.pop("seed", 0))
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3, num_heads=4)
    cfg.update(overrides)
    model = VisionTransformerDistilled(**cfg)
    # timm's init leaves biases at zero and the distillation token tiny: randomise
    # every parameter so a wrong slice cannot hide behind zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def vit_factory():
    return tiny_vit


@pytest.fixture(scope="session")
def quickstart_fast(tmp_path_factory):
    """One ``coformer quickstart --fast --compare`` run (console script, emulated devices throttled
    by duty cycle; --compare for the search baselines and the probe calibration), shared by the quickstart and bench tests: ``(out dir, env, report, result)``.
    The env's COFORMER_CACHE_DIR holds its teacher. It costs about a minute, so it runs once."""
    import json
    import os
    import subprocess

    from tests.tools.test_quickstart import _coformer

    base = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "COFORMER_CACHE_DIR": str(base / "cache")}
    done = subprocess.run([_coformer(), "quickstart", "--fast", "--out", str(base / "qs"), "--report-json",
                           str(base / "r.json"), "--no-progress", "--throttle", "duty-cycle", "--compare"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "qs", env, json.loads((base / "r.json").read_text()), done


@pytest.fixture
def coformer_here(capsys, monkeypatch):
    """``coformer ARGS`` run in this process, through the same ``main`` as the console script:
    ``call(*args, env=None)`` returns a ``subprocess.CompletedProcess`` (exit code, stdout,
    stderr) as ``subprocess.run`` would. It is for the commands a test expects refused: a new
    interpreter spends about 3 s importing torch, timm and ONNX before it refuses anything, and
    the suite has dozens of refusals (issue 40: the suite within 20 minutes). Runs that train,
    serve or must be killed stay subprocesses, as a user starts them. ``env``: variables that
    differ from this process's are set for the call."""
    import logging
    import subprocess

    from coformer.tools.cli import main

    def call(*args, env=None):
        argv = [str(a) for a in args]
        for k, v in (env or {}).items():
            if os.environ.get(k) != v:
                monkeypatch.setenv(k, v)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's refusals, as the console script exits on them
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            root.handlers[:] = handlers  # the CLI's logging.basicConfig wrote to this test's captured stderr
            root.setLevel(level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["coformer", *argv], code, out, err)

    return call
