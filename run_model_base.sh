#!/usr/bin/env bash
# Multi-GPU / multi-node launcher for main.py. Run with --help for the arguments.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash run_model_base.sh [POSITIONAL...] [LAUNCHER OPTIONS] [-- MAIN.PY OPTIONS]

Positional arguments, in the order of the HyCAM authors' run_model_base.sh (all optional; give
the first k of them; "-" keeps an argument's default):
   1 SEQ_LEN            longest sample in tokens                  -> --max_length
   2 MODEL_NAME         model directory, or under $MODELS_DIR      -> --model
   3 ZERO_STAGE         DeepSpeed ZeRO stage 0-3                   -> --zero_stage
   4 TRAIN_BATCH_SIZE   samples per GPU per step                   -> --micro_batch_size
   5 GRAD_ACCU          gradient accumulation steps                -> --grad_accum
   6 EVAL_BATCH_SIZE    samples per GPU per validation step        -> --eval_batch_size
   7 NUM_TRAIN_EPOCHS   epochs                                     -> --epochs
   8 MAIN_LEARNING_RATE learning rate of the adapter/CAM weights   -> --lr
   9 MULTI_CLASS        number of specialized CAMs N_s             -> --num_specialized
  10 LORA_DIM           rank of the specialized CAMs (and LoRAs)   -> --rank
  11 LEARNING_RATE      the authors' rate for the other trainable weights; every trained
                        weight here uses MAIN_LEARNING_RATE, so this one is only checked
  12 WEIGHT_DECAY       AdamW weight decay                         -> --weight_decay
  13 WARMUP_RATIO       share of steps warming up                  -> --warmup_ratio

Launcher options:
  --gpus N             processes (GPUs) per node (default: all visible GPUs, 1 without any)
  --num_nodes N        nodes of the job (torchrun: every node runs this script; deepspeed: from the hostfile)
  --node_rank R        this node's index, 0..N-1, for torchrun (node 0 is --master_addr)
  --master_addr ADDR   address of node 0 (multi-node)
  --master_port PORT   rendezvous port on node 0 (default 29500)
  --hostfile FILE      DeepSpeed hostfile ("host slots=N" lines): the deepspeed launcher starts every node over ssh
  --launcher NAME      deepspeed (default with GPUs) or torchrun (default without GPUs or with --node_rank)
  --config FILE        YAML options for main.py (default configs/paper/qwen2.5-0.5b.yaml)
  --output_dir DIR     run directory (default runs/<model>_<method>_<date>)
  --dry_run            print the command instead of running it
  -h, --help           this text
Everything after "--" goes to main.py unchanged (python main.py --help lists it), e.g.
  bash run_model_base.sh 1200 Qwen2.5-0.5B 2 2 2 4 3 2e-5 5 64 2e-5 0.05 0.03 -- --method lora
Two nodes with torchrun, the same command on each but its --node_rank (and a shared --output_dir):
  bash run_model_base.sh ... --num_nodes 2 --node_rank 0 --master_addr 10.0.0.1   # on 10.0.0.1
  bash run_model_base.sh ... --num_nodes 2 --node_rank 1 --master_addr 10.0.0.1   # on the other node
A node that is lost ends the others within main.py's --dist_timeout; a signal to this script (it becomes
the launcher) reaches the node's workers.
EOF
}

cd "$(dirname "$0")"
names=(max_length model zero_stage micro_batch_size grad_accum eval_batch_size epochs lr num_specialized rank
       authors_lr weight_decay warmup_ratio)
positional=() main_args=() launcher_args=()
gpus="" launcher="" config="configs/paper/qwen2.5-0.5b.yaml" output_dir="" dry_run=0 port=29500
nodes="" node_rank="" master_addr="" hostfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --num_nodes) nodes="$2"; shift 2 ;;
    --node_rank) node_rank="$2"; shift 2 ;;
    --master_addr) master_addr="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master_port) port="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --output_dir) output_dir="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; main_args+=("$@"); break ;;
    -) positional+=("-"); shift ;;
    -*) echo "run_model_base.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
if [ ${#positional[@]} -gt ${#names[@]} ]; then
  echo "run_model_base.sh: ${#positional[@]} positional arguments, at most ${#names[@]} (see --help)" >&2; exit 2
fi

options=(--config "$config")
model_label=$(basename "$config" .yaml)
for i in "${!positional[@]}"; do
  value="${positional[$i]}" name="${names[$i]}"
  [ "$value" = "-" ] && continue
  if [ "$name" = "model" ]; then
    [ -e "$value" ] || value="${MODELS_DIR:-models}/$value"
    model_label=$(basename "$value")
  fi
  if [ "$name" = "authors_lr" ]; then
    main_lr="${positional[7]:--}"
    [ "$main_lr" = "-" ] || [ "$value" = "$main_lr" ] || echo "note: LEARNING_RATE=$value differs from" \
      "MAIN_LEARNING_RATE=$main_lr; every trained weight uses MAIN_LEARNING_RATE" >&2
    continue
  fi
  options+=("--$name" "$value")
done
output_dir="${output_dir:-runs/${model_label}_$(date +%d%H%M)}"
options+=(--output_dir "$output_dir" "${main_args[@]}")

visible=0
command -v nvidia-smi >/dev/null 2>&1 && visible=$(nvidia-smi -L 2>/dev/null | wc -l)
gpus="${gpus:-$([ "$visible" -gt 0 ] && echo "$visible" || echo 1)}"
launcher="${launcher:-$([ "$visible" -gt 0 ] && [ -z "$node_rank" ] && echo deepspeed || echo torchrun)}"
refuse() { echo "run_model_base.sh: $*" >&2; exit 2; }
case "$launcher" in
  deepspeed)
    [ -z "$node_rank" ] || refuse "--node_rank needs --launcher torchrun (deepspeed starts every node itself)"
    command=(deepspeed --num_gpus "$gpus" --master_port "$port")
    [ -z "$hostfile" ] || command+=(--hostfile "$hostfile")
    [ -z "$nodes" ] || command+=(--num_nodes "$nodes")
    [ -z "$master_addr" ] || command+=(--master_addr "$master_addr")
    command+=(main.py) ;;
  torchrun)
    [ -z "$hostfile" ] || refuse "--hostfile needs --launcher deepspeed; torchrun takes --num_nodes and --node_rank"
    command=(python -m torch.distributed.run --nproc_per_node "$gpus" --master_port "$port")
    if [ "${nodes:-1}" != 1 ]; then
      [ -n "$node_rank" ] && [ -n "$master_addr" ] || refuse "--num_nodes $nodes with torchrun needs --node_rank" \
        "(this node's index) and --master_addr (node 0's address)"
      command+=(--nnodes "$nodes" --node_rank "$node_rank" --master_addr "$master_addr")
    fi
    command+=(main.py) ;;
  *) refuse "--launcher must be deepspeed or torchrun, not $launcher" ;;
esac
command+=("${options[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
mkdir -p "$output_dir"
# append: main.py may refuse the directory (another run's), whose log must survive that
echo "run_model_base.sh $(date -u +%FT%TZ): ${command[*]}" | tee -a "$output_dir/launch.log"
# exec: this script's process becomes the launcher, so a signal sent to it (a scheduler stopping the job,
# kill <pid>) reaches the launcher, which passes it to its workers instead of leaving them training
exec "${command[@]}" > >(tee -a "$output_dir/launch.log") 2>&1
