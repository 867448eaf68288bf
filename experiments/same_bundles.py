"""Behaviour unchanged by a refactor (issue 40): build the same bundles from the same seed,
CoFormer's (tiny ViT on digits, three devices, the heuristic policy), the teacher alone, the
pipeline, tensor parallelism and PRISM at CR 2, with whichever coformer is imported, and print
what they hold: every file's SHA-256 (the ONNX models byte for byte), the manifest's expected
scores, policy, parity and devices, and the ensemble's logits on 8 test inputs.

    python -m experiments.same_bundles OUT > after.json
    PYTHONPATH=OLD_SHIM python -m experiments.same_bundles OUT2 > before.json   # the other commit
    diff before.json after.json                                                 # nothing: the same

where OLD_SHIM holds ``coformer/{runtime,compiler,calibration,tools}`` linked to a worktree
of the other commit (``git worktree add``). About 10 s.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest (tiny_vit): this checkout's
from tests.conftest import tiny_vit  # noqa: E402

from coformer.calibration.booster import BoostConfig  # noqa: E402
from coformer.calibration.data import load_digits_dataset  # noqa: E402
from coformer.compiler.baselines import build_baseline  # noqa: E402
from coformer.compiler.pipeline import compile_bundle  # noqa: E402
from coformer.compiler.prism_bundle import build_prism  # noqa: E402
from coformer.compiler.specs import DeviceSpec  # noqa: E402

out = Path(sys.argv[1])
DEVICES = [DeviceSpec("edge-a", 1 << 30, 10**12, cpu_share=1.0), DeviceSpec("edge-b", 1 << 30, 10**12, cpu_share=0.6),
           DeviceSpec("edge-c", 1 << 30, 10**12, cpu_share=0.4)]
data = load_digits_dataset(size=16)
torch.manual_seed(0)
teacher = tiny_vit().eval()
record = {}
torch.manual_seed(0)
r = compile_bundle(teacher, DEVICES, data, out / "coformer", boost=BoostConfig(epochs=2, seed=0),
                   aggregator_epochs=5, progress=False)
x = data.test.x[:8]
with torch.no_grad():
    record["coformer_answer"] = np.round(r.aggregator(*[s(x) for s in r.submodels]).numpy(), 5).tolist()
for name in ("teacher", "pipeline", "tensor_parallel"):
    build_baseline(name, teacher, DEVICES, data.val.head(3), out / name, data.labels, dict(data.preprocessing))
build_prism(teacher, DEVICES, data.val.head(3), out / "prism", data.labels, dict(data.preprocessing), 2)
for b in ("coformer", "teacher", "pipeline", "tensor_parallel", "prism"):
    m = json.loads((out / b / "manifest.json").read_text())
    record[b] = {k: m.get(k) for k in ("files", "expected", "policy", "parity", "model", "devices", "strategy")}
print(json.dumps(record, indent=1, sort_keys=True))
