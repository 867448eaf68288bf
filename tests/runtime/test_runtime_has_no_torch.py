import subprocess
import sys


def test_runtime_imports_without_torch():
    code = (
        "import sys\n"
        "import coformer.runtime.central, coformer.runtime.worker, coformer.runtime.client\n"
        "import coformer.runtime.cli, coformer.runtime.preprocess, coformer.runtime.timing\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'onnx', 'coformer') "
        "and m != 'coformer' and not m.startswith('coformer.runtime'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_runtime_module_imports_with_only_the_device_install():
    """`pip install 'coformer[cpu]'` brings numpy, onnxruntime, pyzmq and PyYAML, not torch,
    timm, onnx, transformers or tqdm: with those made unimportable, every module of
    coformer.runtime still imports (profile.py among them, which once needed tqdm)."""
    code = (
        "import sys, pkgutil, importlib\n"
        "for name in ('torch', 'timm', 'onnx', 'transformers', 'tqdm', 'tqdm.auto', 'sklearn'):\n"
        "    sys.modules[name] = None\n"
        "import coformer.runtime as rt\n"
        "names = [m.name for m in pkgutil.iter_modules(rt.__path__, 'coformer.runtime.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "from coformer.runtime.profile import tqdm\n"
        "bar = tqdm(total=3, desc='x', disable=False); bar.update(); bar.close()\n"
        "assert list(tqdm([1, 2], desc='y')) == [1, 2]\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[-1]) >= 10
