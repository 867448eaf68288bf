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
