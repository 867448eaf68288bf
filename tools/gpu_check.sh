#!/usr/bin/env bash
# The GPU checks in one run (issue 38), for a machine with an NVIDIA GPU, within 8 minutes:
#
#   pip install -e '.[dev]' && bash tools/gpu_check.sh [OUT]        (OUT defaults to gpu-check/)
#
# 1. `coformer-runtime doctor`: what the machine has, each line tried (OUT/doctor.txt, .json);
# 2. the `gpu`-marked tests (OUT/gpu-tests.txt, .xml);
# 3. `coformer compile --device cuda` of a vit_base-sized teacher (d=768, 12 layers, 12 heads,
#    random weights from a checkpoint on disk, the built-in digits at 32x32), against
#    `--device cpu` on a vit_small-sized one (d=384), one calibration epoch each, timed.
# Every figure goes to OUT/gpu_check.json; each step has its own time limit and the script goes on
# past a failed step, so one run reports everything it could. Not run on a GPU yet.
set -uo pipefail

out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python}
cd "$(dirname "$0")/.."

now() { date +%s.%N; }

t0=$(now)
timeout 120 coformer-runtime doctor --json "$out/doctor.json" > "$out/doctor.txt" 2>&1
doctor_rc=$?
t1=$(now)
timeout 240 "$py" -m pytest -q -m gpu -p no:randomly --junitxml "$out/gpu-tests.xml" > "$out/gpu-tests.txt" 2>&1
tests_rc=$?
t2=$(now)

kwargs='{"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10}'
"$py" - "$out" "$kwargs" <<'PY'
import json, sys, torch, timm
out, kwargs = sys.argv[1], json.loads(sys.argv[2])
for name in ("vit_base_patch16_224", "vit_small_patch16_224"):
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False, **kwargs).state_dict(), f"{out}/{name}.pth")
PY

compile() {  # NAME DEVICE
    local start rc
    start=$(now)
    timeout 180 coformer compile --model "timm:$1" --checkpoint "$out/$1.pth" --model-kwargs "$kwargs" \
        --devices examples/devices.yaml --out "$out/bundle-$1-$2" --epochs 1 --device "$2" --no-progress \
        --report-json "$out/compile-$1-$2.json" > "$out/compile-$1-$2.txt" 2>&1
    rc=$?
    echo "$rc $("$py" -c "print($(now) - $start)")"
}
read -r gpu_rc gpu_s <<< "$(compile vit_base_patch16_224 cuda)"
read -r cpu_rc cpu_s <<< "$(compile vit_small_patch16_224 cpu)"

"$py" - "$out" <<PY
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def report(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
figures = {
    "doctor": {"exit": $doctor_rc, "seconds": $t1 - $t0, "table": report("doctor.json")},
    "gpu_tests": {"exit": $tests_rc, "seconds": $t2 - $t1,
                  "summary": ((out / "gpu-tests.txt").read_text().strip().splitlines() or [""])[-1]},
    "compile_vit_base_cuda": {"exit": $gpu_rc, "seconds": $gpu_s, "report": report("compile-vit_base_patch16_224-cuda.json")},
    "compile_vit_small_cpu": {"exit": $cpu_rc, "seconds": $cpu_s, "report": report("compile-vit_small_patch16_224-cpu.json")},
}
(out / "gpu_check.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
print(json.dumps({k: {"exit": v["exit"], "seconds": round(float(v["seconds"]), 1)} for k, v in figures.items()}))
PY
