#!/usr/bin/env bash
# Tensor/expert-parallel layouts on a multi-GPU host (NCCL), each against TP=1 in the same run:
#   bench/multi_gpu_check.sh MODEL_DIR OUT_DIR [LAYOUT ...]
# A layout is name:nproc:flags (flags comma-separated), e.g. tp2:2:--moe-ep,1. Default layouts: the
# TP=1 reference, TP2 (attention TP2, MoE TP2), TP2+EP2, EP2 with replicated attention, in bf16
# with CUDA graphs, and TP=1 / TP2+EP2 in float32 eager (the exact check). Each run writes
# OUT_DIR/<name>.json (rank 0's line from gptoss_engine.parallel.check) and <name>.log;
# gptoss_engine.parallel.compare then prints and writes the comparison (OUT_DIR/compare.json).
# RUN_TIMEOUT_S (default 150) bounds each run; NCCL_DEBUG=INFO in the environment is passed on.
set -u
model=$1 out=$2
shift 2
# NVLink multicast stays off on shared hosts (device KINDS.md); init_parallel forces it too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
layouts=("$@")
if [ ${#layouts[@]} -eq 0 ]; then
  layouts=(tp1:1: tp2:2: tp2_ep2:2:--moe-ep,2 ep2:2:--attention-tp,1,--moe-ep,2
           tp1_fp32:1:--dtype,float32,--eager tp2_ep2_fp32:2:--dtype,float32,--eager,--moe-ep,2)
fi
mkdir -p "$out"
common=(--model "$model" --batch 8 --prompt-len 512 --max-tokens 64)
for spec in "${layouts[@]}"; do
  IFS=: read -r name nproc flags <<<"$spec"
  IFS=, read -r -a extra <<<"$flags"
  echo "== $name: $nproc process(es) ${extra[*]}"
  start=$(date +%s)
  timeout -k 5 "${RUN_TIMEOUT_S:-150}" python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    -m gptoss_engine.parallel.check "${common[@]}" "${extra[@]}" >"$out/$name.out" 2>"$out/$name.log"
  echo "   exit $? after $(( $(date +%s) - start )) s"
  # A rank that outlived torchrun (timeout) would hold its GPU memory and fail every later run.
  pkill -9 -f "[g]ptoss_engine.parallel.check" && sleep 2
  grep '^{' "$out/$name.out" | tail -1 >"$out/$name.json"
done
python3 -m gptoss_engine.parallel.compare "$out"
