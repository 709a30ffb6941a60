#!/usr/bin/env bash
# The GPU pass of docs/performance.md ("GPU (H100)"), on a machine whose python3 has torch with
# CUDA but not align: align's packages and its missing dependencies come as wheels in .whl/
# (built from a clean export of a commit, with that export's tests and benchmarks as
# .whl/src.tar), installed with --target into /tmp/site.
#
#   bash benchmarks/gpu_pass.sh setup tests     # versions, `align list`, the CUDA-relevant tests
#   bash benchmarks/gpu_pass.sh setup dpo       # DPO align vs TRL on a ~134M Llama
#   bash benchmarks/gpu_pass.sh setup megatron  # the megatron backend on one GPU vs hf
#   bash benchmarks/gpu_pass.sh setup profile   # where a DPO step's time goes, fp32 vs bf16
#   bash benchmarks/gpu_pass.sh setup retest    # the tests a GPU fix was for
#
# Logs and JSON go to $OUT (default: ./gpu_out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  rm -rf /tmp/src && mkdir -p /tmp/src && tar -xf .whl/src.tar -C /tmp/src
  cd /tmp/src || exit 1
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers, datasets, pyarrow, numpy, trl, peft, pydantic
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'datasets', datasets.__version__,
      'pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'trl', trl.__version__,
      'peft', peft.__version__, 'pydantic', pydantic.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    python3 -m align.cli list
  } 2>&1 | tee "$OUT/setup.log"
}

tests() {
  # Every test file where a model trains or a device matters; 8 workers share the GPU.
  timeout 480 python3 -m pytest -q -n 8 --timeout 300 -p no:cacheprovider -rfE \
    tests/test_device.py tests/test_training.py tests/test_learner.py \
    tests/test_preference_training.py tests/test_precision.py tests/test_lora.py \
    tests/test_backend_roles.py tests/test_engines.py tests/test_reward.py \
    "tests/test_grpo.py" "tests/test_ppo.py" -k "not slow" 2>&1 | tee "$OUT/tests.log" | tail -60
}

retest() {
  # After a fix: the tests that failed on the GPU for a reason of align's (not the test's).
  timeout 200 python3 -m pytest -q -n 8 --timeout 150 -p no:cacheprovider -rfE tests/test_device.py \
    tests/test_training.py tests/test_preference_training.py tests/test_precision.py tests/test_lora.py \
    -k "not slow" 2>&1 | tee "$OUT/retest.log" | tail -40
}

profile() {
  timeout 120 python3 benchmarks/profile_gpu_step.py --shape "${SHAPE:-llama-134m}" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" |
    grep -v "^-\|^ *$" | tail -60
}

dpo() {
  # Each precision: align (reference precomputed), TRL (its default: live reference), align with
  # a live reference (TRL's setting). Same model, data, batch and lengths on both sides.
  cd benchmarks || exit 1
  bench() {
    timeout 280 python3 dpo_vs_trl.py --device cuda --shape "${SHAPE:-llama-134m}" --variants "$2" \
      --steps "${STEPS:-10}" --warmup 2 --repeats 1 --workdir /tmp/bench --json "$OUT/dpo_$1.json" \
      "${@:3}" 2>&1 | tee "$OUT/dpo_$1.log" | tail -12
  }
  bench bf16 align-bf16,trl-bf16,align-live-bf16
  bench tf32 align,trl,align-live --tf32
  bench fp32 align,trl
  cd ..
}

megatron() {
  # The megatron backend on one GPU: its tests (in-process, a world of one: TP=1 DPO against the
  # hf backend), then the same 4-step DPO under torchrun --nproc_per_node 1 and on hf.
  python3 -c "from align_megatron.cpu_shims import cpu_only; print('megatron cpu shims apply:', cpu_only())" |
    tee "$OUT/megatron.log"
  timeout 200 python3 -m pytest -q --timeout 180 -p no:cacheprovider -rfE tests/test_megatron.py -k "not slow" \
    2>&1 | tee -a "$OUT/megatron.log" | tail -30
  python3 - <<'PY' 2>&1 | tee -a "$OUT/megatron.log"
import json, subprocess, sys
sys.path.insert(0, "tests")
from helpers import DATA, dpo_config, head_jsonl, read_metrics, write_yaml
from pathlib import Path
root = Path("/tmp/megatron_gpu"); root.mkdir(exist_ok=True)
train = head_jsonl(DATA / "preference_train.jsonl", root / "train.jsonl", 32)
losses = {}
for name, launcher in (("megatron", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]), ("hf", [])):
    config = dpo_config(root / name, backend={"name": name}, data={"train": train, "eval": None, "max_length": 64})
    done = subprocess.run([sys.executable, *launcher, "-m", "align.cli", "run", write_yaml(root / f"{name}.yaml", config)],
                          capture_output=True, text=True, timeout=120)
    print(name, "exit", done.returncode, done.stderr[-1500:] if done.returncode else "")
    losses[name] = [m["loss"] for m in read_metrics(root / name, "train")] if done.returncode == 0 else None
print("train losses:", json.dumps(losses))
if all(losses.values()):
    print("max |megatron - hf| loss:", max(abs(a - b) for a, b in zip(losses["megatron"], losses["hf"])))
PY
}

for step in "$@"; do
  "$step"
done
