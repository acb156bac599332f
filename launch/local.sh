#!/usr/bin/env bash
# N processes of the vgg_jax trainer on this machine, joined by jax.distributed
# exactly as the hosts of a TPU pod or a GPU cluster are: the multi-host code
# path (per-process input sharding, cross-process collectives, checkpointing by
# every process) without a cluster. CPU backend, cross-process collectives over
# gloo (the trainer switches gloo on when JAX_PLATFORMS=cpu and a coordinator
# is set).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] TRAINER_ARGS...

Starts N copies of `python -m vgg_jax.train TRAINER_ARGS...` on this machine,
process i with
  VGG_JAX_COORDINATOR=127.0.0.1:PORT VGG_JAX_NUM_PROCESSES=N VGG_JAX_PROCESS_ID=i
  JAX_PLATFORMS=cpu
waits for all of them, and exits non-zero as soon as one fails (the others are
stopped). Each process logs to LOGDIR/process_<i>.log; process 0's log is
followed on the console.

Options:
  -n, --num-processes N     processes to start (default 2)
  -d, --devices-per-process K
                            CPU devices per process (default 1), via
                            XLA_FLAGS=--xla_force_host_platform_device_count=K
  -p, --port PORT           coordinator port (default: a free port)
  -l, --logdir DIR          per-process logs (default: WORKDIR/logs when
                            --workdir is among the trainer arguments, else
                            ./local_logs)
  -m, --module MODULE       Python module to run (default vgg_jax.train)
  -q, --quiet               do not follow process 0's log on the console
      --dry-run             print the commands and exit
  -h, --help                this text
Environment: PYTHON (default: .venv/bin/python of the repository if present,
else python3).

Example:
  launch/local.sh -n 2 -- --config configs/fashion_mnist.py:quick \
      --workdir runs/fmnist_2proc --config.max_steps=20
EOF
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
num_processes=2
devices_per_process=1
port=""
logdir=""
module="vgg_jax.train"
quiet=0
dry_run=0
trainer_args=()

while [ $# -gt 0 ]; do
  case "$1" in
    -n | --num-processes) num_processes=${2:?"$1 needs a value"}; shift 2 ;;
    -d | --devices-per-process) devices_per_process=${2:?"$1 needs a value"}; shift 2 ;;
    -p | --port) port=${2:?"$1 needs a value"}; shift 2 ;;
    -l | --logdir) logdir=${2:?"$1 needs a value"}; shift 2 ;;
    -m | --module) module=${2:?"$1 needs a value"}; shift 2 ;;
    -q | --quiet) quiet=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; trainer_args+=("$@"); break ;;
    *) trainer_args+=("$1"); shift ;;
  esac
done

[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num_processes'."
[[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] ||
  die "--devices-per-process must be a positive integer, got '$devices_per_process'."
[ ${#trainer_args[@]} -gt 0 ] ||
  die "no trainer arguments; e.g. launch/local.sh -- --config configs/fashion_mnist.py:quick --workdir runs/x (see --help)."

if [ -n "${PYTHON:-}" ]; then
  python=$PYTHON
elif [ -x "$repo_root/.venv/bin/python" ]; then
  python="$repo_root/.venv/bin/python"
else
  python=python3
fi

if [ -z "$port" ]; then
  if [ "$dry_run" = 1 ]; then
    port=12355  # not reserved: a real run asks the OS for a free port
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'."

# The workdir among the trainer arguments (--workdir X or --workdir=X) holds the logs by default.
if [ -z "$logdir" ]; then
  logdir=./local_logs
  for ((i = 0; i < ${#trainer_args[@]}; i++)); do
    case "${trainer_args[$i]}" in
      --workdir=*) logdir="${trainer_args[$i]#--workdir=}/logs" ;;
      --workdir) [ $((i + 1)) -lt ${#trainer_args[@]} ] && logdir="${trainer_args[$((i + 1))]}/logs" ;;
    esac
  done
fi

# XLA_FLAGS of the caller, with our device count instead of any other.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  case "$flag" in
    --xla_force_host_platform_device_count=*) ;;
    *) xla_flags+="$flag " ;;
  esac
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

# env + python command of process $1, one word per array element.
process_command() {
  command_words=(env
    "VGG_JAX_COORDINATOR=127.0.0.1:$port"
    "VGG_JAX_NUM_PROCESSES=$num_processes"
    "VGG_JAX_PROCESS_ID=$1"
    "JAX_PLATFORMS=cpu"
    "XLA_FLAGS=$xla_flags"
    "$python" -m "$module" "${trainer_args[@]}")
}

if [ "$dry_run" = 1 ]; then
  echo "# launch/local.sh: $num_processes processes, coordinator 127.0.0.1:$port, logs in $logdir"
  printf 'mkdir -p %q\n' "$logdir"
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i"
    printf '%q ' "${command_words[@]}"
    printf '>%q 2>&1 &\n' "$logdir/process_$i.log"
  done
  echo "wait  # all $num_processes; the first failure stops the others"
  exit 0
fi

mkdir -p "$logdir"
pids=()
follower=""

stop_all() {  # stops the processes this script started, by their ids
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if [ -n "$follower" ]; then
    kill "$follower" 2>/dev/null || true
  fi
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  process_command "$i"
  : >"$logdir/process_$i.log"
  "${command_words[@]}" >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: started $num_processes processes (coordinator 127.0.0.1:$port), logs in $logdir" >&2
if [ "$quiet" = 0 ]; then
  tail -n +1 -f "$logdir/process_0.log" &
  follower=$!
fi

# Poll rather than `wait -n`, which older bash (macOS's 3.2) lacks.
remaining=$num_processes
status=0
while [ "$remaining" -gt 0 ] && [ "$status" = 0 ]; do
  sleep 1
  for ((i = 0; i < num_processes; i++)); do
    pid=${pids[$i]}
    [ "$pid" = "finished" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[i]="finished"
    remaining=$((remaining - 1))
    if [ "$rc" != 0 ]; then
      status=$rc
      echo "local.sh: process $i exited with status $rc; stopping the others. Last lines of its log:" >&2
      tail -n 20 "$logdir/process_$i.log" >&2
      break
    fi
  done
done

live=()
for pid in "${pids[@]}"; do
  [ "$pid" != "finished" ] && live+=("$pid")
done
pids=("${live[@]+"${live[@]}"}")
[ "$status" = 0 ] && sleep 1  # lets the log follower print the last lines
stop_all
wait 2>/dev/null || true
if [ "$status" = 0 ]; then
  echo "local.sh: all $num_processes processes finished; logs in $logdir" >&2
fi
exit "$status"
