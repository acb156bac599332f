#!/usr/bin/env bash
# Trains vgg_jax on a Cloud TPU VM slice (a pod slice has several hosts, the
# "workers"): every worker runs the same command, JAX finds the other hosts by
# itself (jax.distributed.initialize() with no arguments on a TPU VM), and the
# workdir and the tfds data live in a GCS bucket that all of them read and write.
# Rerunning `up` after a preemption recreates the slice and the trainer resumes
# from the newest checkpoint in the workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [ACTION] --bucket BUCKET [options] [-- TRAINER_ARGS...]

Actions (default: up):
  up        create (or reuse) the slice, install vgg_jax on every worker, start training
  create    create the slice, or reuse it when it exists (a preempted one is recreated)
  install   install vgg_jax and jax[tpu] on every worker
  train     start the training command on every worker (resumes from the workdir)
  logs      follow the training log of one worker (--worker, default 0)
  status    the slice's state and whether training runs on each worker
  stop      SIGTERM to the trainer on every worker (it saves a checkpoint and exits)
  delete    delete the slice (the bucket keeps the workdir and the data)

Options:
  --bucket BUCKET            GCS bucket (name or gs://name) for the workdir and the tfds data (required)
  --name NAME                TPU VM name (default vgg-jax)
  --zone ZONE                zone (default us-central2-b)
  --project PROJECT          project (default: gcloud's configured project)
  --accelerator-type TYPE    slice type (default v4-32: 4 hosts x 4 chips)
  --version VERSION          TPU VM software version (default: Google's JAX image for the
                             accelerator: v2-alpha-tpuv6e, v2-alpha-tpuv5, v2-alpha-tpuv5-lite,
                             tpu-ubuntu2204-base for v4 and older)
  --spot                     create a Spot slice (cheaper, can be preempted; rerun `up` to resume)
  --config CONFIG            trainer config (default configs/vgg16.py; `file.py:variant` allowed)
  --run RUN                  run name: workdir gs://BUCKET/vgg_jax/runs/RUN (default: from --config)
  --data-dir DIR             tfds data_dir (default gs://BUCKET/tensorflow_datasets)
  --repo URL                 git repository to install from (default https://github.com/ORG/vgg_jax)
  --ref REF                  branch, tag or commit of --repo (default main)
  --from-local               install this checkout (git archive HEAD, copied to every worker)
                             instead of cloning --repo
  --worker N                 worker whose log `logs` follows (default 0)
  --dry-run                  print the commands and exit
  -h, --help                 this text
Arguments after `--` go to `python -m vgg_jax.train`, e.g. -- --config.batch_size=512

Example:
  launch/tpu_pod.sh up --bucket my-bucket --zone us-central2-b --accelerator-type v4-32 \
      --config configs/vgg16.py --spot
  launch/tpu_pod.sh logs --bucket my-bucket
  launch/tpu_pod.sh delete --bucket my-bucket
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# One shell word: kept as it is when it holds only safe characters, single-quoted otherwise.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="$(quote "$word") "
  done
  printf '%s' "${out% }"
}

action=up
case "${1:-}" in
  up | create | install | train | logs | status | stop | delete) action=$1; shift ;;
esac

name=vgg-jax
zone=us-central2-b
project=""
accelerator_type=v4-32
version=""
spot=0
bucket=""
config=configs/vgg16.py
run_name=""
data_dir=""
repo=https://github.com/ORG/vgg_jax
ref=main
from_local=0
worker=0
dry_run=0
trainer_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    --bucket) bucket=${2:?"$1 needs a value"}; shift 2 ;;
    --name) name=${2:?"$1 needs a value"}; shift 2 ;;
    --zone) zone=${2:?"$1 needs a value"}; shift 2 ;;
    --project) project=${2:?"$1 needs a value"}; shift 2 ;;
    --accelerator-type) accelerator_type=${2:?"$1 needs a value"}; shift 2 ;;
    --version) version=${2:?"$1 needs a value"}; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) config=${2:?"$1 needs a value"}; shift 2 ;;
    --run) run_name=${2:?"$1 needs a value"}; shift 2 ;;
    --data-dir) data_dir=${2:?"$1 needs a value"}; shift 2 ;;
    --repo) repo=${2:?"$1 needs a value"}; shift 2 ;;
    --ref) ref=${2:?"$1 needs a value"}; shift 2 ;;
    --from-local) from_local=1; shift ;;
    --worker) worker=${2:?"$1 needs a value"}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; trainer_args+=("$@"); break ;;
    *) die "unknown argument '$1' (trainer arguments go after --; see --help)." ;;
  esac
done

if [ -z "$version" ]; then
  case "$accelerator_type" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version='tpu-ubuntu2204-base' ;;
  esac
fi
[ -n "$bucket" ] || die "--bucket is required: the workdir and the data must be on GCS, where every worker sees them."
bucket=${bucket#gs://}
bucket=${bucket%/}
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$worker'."
if [ -z "$run_name" ]; then
  # configs/vgg16.py:384 -> vgg16_384
  run_name=$(basename "${config%%:*}" .py)
  [[ "$config" == *:* ]] && run_name+="_${config#*:}"
fi
workdir="gs://$bucket/vgg_jax/runs/$run_name"
data_dir=${data_dir:-gs://$bucket/tensorflow_datasets}

# Everything on the workers lives in ~/vgg_jax (the source, so configs/ is there too).
# These expand on the workers, not here.
# shellcheck disable=SC2016
remote_src='$HOME/vgg_jax'
# shellcheck disable=SC2016
remote_log='$HOME/vgg_jax_train.log'
# shellcheck disable=SC2016
remote_pid='$HOME/vgg_jax_train.pid'
# jax >= 0.10 needs Python >= 3.11; the TPU images are Ubuntu 22.04 (Python 3.10).
# shellcheck disable=SC2016
remote_venv='$HOME/vgg_jax_venv'
remote_python="$remote_venv/bin/python"

gcloud_scope=(--zone="$zone")
[ -n "$project" ] && gcloud_scope+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

run() {  # prints the command in dry-run mode, runs it otherwise
  if [ "$dry_run" = 1 ]; then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

note() {
  if [ "$dry_run" = 1 ]; then
    echo "# $*"
  else
    echo "tpu_pod.sh: $*" >&2
  fi
}

on_workers() {  # on_workers WORKER COMMAND: one ssh command on worker WORKER ("all" for every one)
  run "${tpu[@]}" ssh "$name" "${gcloud_scope[@]}" --worker="$1" --command="$2"
}

do_create() {
  local create=("${tpu[@]}" create "$name" "${gcloud_scope[@]}"
    --accelerator-type="$accelerator_type" --version="$version")
  [ "$spot" = 1 ] && create+=(--spot)
  local describe=("${tpu[@]}" describe "$name" "${gcloud_scope[@]}" --format='value(state)')
  if [ "$dry_run" = 1 ]; then
    note "create or reuse: the slice's state (empty when it does not exist)"
    run "${describe[@]}"
    note "PREEMPTED or TERMINATED (a Spot slice that was taken back): delete it first"
    run "${tpu[@]}" delete "$name" "${gcloud_scope[@]}" --quiet
    note "absent (or just deleted): create it"
    run "${create[@]}"
    return
  fi
  local state
  state=$("${describe[@]}" 2>/dev/null || true)
  case "$state" in
    READY) note "reusing TPU VM $name (READY)" ;;
    "") note "creating TPU VM $name ($accelerator_type in $zone)"; run "${create[@]}" ;;
    PREEMPTED | TERMINATED)
      note "TPU VM $name is $state: recreating it (the run resumes from $workdir)"
      run "${tpu[@]}" delete "$name" "${gcloud_scope[@]}" --quiet
      run "${create[@]}"
      ;;
    *) die "TPU VM $name is $state; wait until it is READY (launch/tpu_pod.sh status) and rerun." ;;
  esac
}

do_install() {
  local get_source
  if [ "$from_local" = 1 ]; then
    local archive=/tmp/vgg_jax_src.tar.gz
    local repo_root
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    note "this checkout's HEAD, copied to every worker"
    run git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
    run "${tpu[@]}" scp "$archive" "$name:vgg_jax_src.tar.gz" "${gcloud_scope[@]}" --worker=all
    get_source="rm -rf $remote_src && mkdir -p $remote_src && tar -xzf \$HOME/vgg_jax_src.tar.gz -C $remote_src"
  else
    local r f
    r=$(quote "$repo")
    f=$(quote "$ref")
    get_source="if [ -d $remote_src/.git ]; then git -C $remote_src fetch -q $r $f; else git clone -q $r $remote_src && git -C $remote_src fetch -q $r $f; fi && git -C $remote_src checkout -q FETCH_HEAD"
  fi
  local get_python="if [ ! -x $remote_python ]; then if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; fi && python3.11 -m venv $remote_venv; fi"
  note "install vgg_jax with jax[tpu] on every worker, in a Python 3.11 venv"
  on_workers all "set -e; $get_source && $get_python && $remote_python -m pip install -q -U pip && $remote_python -m pip install -q -e $remote_src 'jax[tpu]'"
}

# The one command every worker runs (no worker-specific part: JAX numbers the hosts).
train_command() {
  printf '%s ' "$remote_python"
  quote_all -m vgg_jax.train --config "$config" --workdir "$workdir" \
    --config.data_dir="$data_dir" --config.distributed=auto "${trainer_args[@]}"
}

do_train() {
  local cmd
  cmd=$(train_command)
  note "start training on every worker; the workdir $workdir resumes a previous run"
  on_workers all "cd $remote_src && if [ -f $remote_pid ] && kill -0 \"\$(cat $remote_pid)\" 2>/dev/null; then echo \"\$(hostname): already training\"; else nohup $cmd >>$remote_log 2>&1 </dev/null & echo \$! >$remote_pid; fi"
  note "follow:   launch/tpu_pod.sh logs --bucket $bucket --name $name --zone $zone"
  note "stop:     launch/tpu_pod.sh stop --bucket $bucket --name $name --zone $zone"
  note "teardown: launch/tpu_pod.sh delete --bucket $bucket --name $name --zone $zone"
}

case "$action" in
  up) do_create; do_install; do_train ;;
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) on_workers "$worker" "tail -n 200 -F $remote_log" ;;
  status)
    run "${tpu[@]}" describe "$name" "${gcloud_scope[@]}" --format='value(state,acceleratorType)'
    on_workers all "if [ -f $remote_pid ] && kill -0 \"\$(cat $remote_pid)\" 2>/dev/null; then echo \"\$(hostname): training\"; else echo \"\$(hostname): not training\"; fi; tail -n 2 $remote_log 2>/dev/null || true"
    ;;
  stop) on_workers all "if [ -f $remote_pid ]; then kill -TERM \"\$(cat $remote_pid)\" 2>/dev/null || true; fi" ;;
  delete) run "${tpu[@]}" delete "$name" "${gcloud_scope[@]}" --quiet ;;
esac
