#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for tests and for trying sbatch scripts by hand.
#
#   launch/slurm/local_cluster.sh start     # installs the packages if missing, starts, prints the env
#   source /tmp/llama31-slurm/env.sh && sbatch -N2 -n2 job.sh
#   launch/slurm/local_cluster.sh status    # sinfo
#   launch/slurm/local_cluster.sh stop      # stops every daemon it started; nothing keeps running
#
# Everything (munge key and socket, slurm.conf, state, spool, pid and log files) lives in
# SLURM_LOCAL_DIR (default /tmp/llama31-slurm); the system's own munge/slurm are never used.
# `start` always begins from a clean state: it stops a cluster already running in that directory.
# Ports: SLURM_LOCAL_PORT (slurmctld, default 16817), the nodes n1 and n2 take the next two.
# Partitions: debug (default) and high on both nodes; a high job preempts debug jobs (requeue after
# SLURM_LOCAL_GRACE_TIME seconds of grace, default 60).
# Facts this builds on (measured on Debian 12, Slurm 22.05): /work/shared/notes/slurm-local.md.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/llama31-slurm}
PORT=${SLURM_LOCAL_PORT:-16817}
START_TIMEOUT_S=${SLURM_LOCAL_START_TIMEOUT:-30}
GRACE_TIME_S=${SLURM_LOCAL_GRACE_TIME:-60}  # a preempted job's time to checkpoint before SIGKILL
PACKAGES=(slurmctld slurmd slurm-client munge)
NODES=(n1 n2)

die() { echo "local_cluster: $*" >&2; exit 1; }

# a half-started cluster is stopped, so a failed start leaves nothing running
start_failed() { stop_cluster; die "$@"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install ${PACKAGES[*]}"
    # keep apt from starting the system's munge/slurm services; an existing policy is left alone
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when apt-get is interrupted
    fi
    echo "local_cluster: installing ${PACKAGES[*]}" >&2
    local status=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"${TMPDIR:-/tmp}/llama31-slurm-apt.log" 2>&1 || status=$?
    if ((own_policy)); then rm -f "$policy" && trap - EXIT; fi
    ((status == 0)) || { tail -n 20 "${TMPDIR:-/tmp}/llama31-slurm-apt.log" >&2; die "apt-get install failed"; }
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log}
    chmod 755 "$DIR"  # munged wants its socket directory searchable by all
    # munged refuses a key readable by others
    head -c 1024 /dev/urandom >"$DIR/munge.key"
    chmod 400 "$DIR/munge.key"
    cat >"$DIR/slurm.conf" <<CONF
# Written by launch/slurm/local_cluster.sh; regenerated on every start.
ClusterName=llama31local
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (2 is rejected): a requeued job restarts in seconds, not after the default 120 s
AuthInfo=socket=$DIR/munge.sock,cred_expire=5
TaskPlugin=task/none
# pgid, not linuxproc: linuxproc left a trapped script's background children running after the job
ProctrackType=proctrack/pgid
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# both nodes claim the same cores; the configured sizes count, not what slurmd detects
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=localhost Port=$((PORT + 1)) CPUs=2 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=localhost Port=$((PORT + 2)) CPUs=2 RealMemory=1000 State=UNKNOWN
# Preemption as shared clusters configure it: a job in "high" that needs the nodes preempts jobs in
# "debug"; they get SIGTERM, GraceTime seconds to checkpoint, then SIGKILL, and are requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE_TIME_S
PartitionName=high Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
    # clients find munge through AuthInfo's socket, so SLURM_CONF is all they need
    printf 'export SLURM_CONF=%q\n' "$DIR/slurm.conf" >"$DIR/env.sh"
}

pid_files() {
    local f
    for f in "$DIR/munged.pid" "$DIR/slurmctld.pid" "$DIR"/slurmd.*.pid; do
        [[ -f $f ]] && echo "$f"
    done
    return 0
}

running_pids() {
    local f pid
    for f in $(pid_files); do
        pid=$(cat "$f" 2>/dev/null || true)
        [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
    done
    return 0
}

stop_cluster() {
    [[ -d $DIR ]] || return 0
    local pids
    pids=$(running_pids)
    if [[ -n $pids && -f $DIR/slurm.conf ]]; then
        # jobs first: their slurmstepd processes outlive a signalled slurmd
        local jobs
        jobs=$(SLURM_CONF=$DIR/slurm.conf timeout 5 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            SLURM_CONF=$DIR/slurm.conf timeout 5 scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z $(SLURM_CONF=$DIR/slurm.conf timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.1
            done
        fi
    fi
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086  # one kill for all: signalled one by one, teardown takes much longer
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 100); do
            pids=$(for p in $pids; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true)
            [[ -z $pids ]] && break
            sleep 0.1
        done
        # shellcheck disable=SC2086
        [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
    fi
    local f
    for f in $(pid_files); do rm -f "$f"; done
}

start_cluster() {
    install_packages
    stop_cluster
    rm -rf "${DIR:?}"/{state,spool,log,munge.sock,munge.sock.lock,munged.seed}
    write_config
    local conf=$DIR/slurm.conf
    # --force: munged refuses a socket below a directory that not everyone may search, such as
    # pytest's 0700 temporary directories; here only root's daemons and clients need the socket
    munged --force --socket="$DIR/munge.sock" --key-file="$DIR/munge.key" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed" \
        || start_failed "munged did not start; see $DIR/log/munged.log"
    SLURM_CONF=$conf slurmctld -f "$conf" || start_failed "slurmctld did not start; see $DIR/log/slurmctld.log"
    local node
    for node in "${NODES[@]}"; do
        SLURM_CONF=$conf slurmd -f "$conf" -N "$node" || start_failed "slurmd -N $node did not start; see $DIR/log/slurmd.$node.log"
    done
    local deadline=$((SECONDS + START_TIMEOUT_S)) idle=0
    while ((SECONDS < deadline)); do
        # exactly "idle": "idle*" is a node that stopped answering
        # (sort -u: sinfo -N lists a node once per partition)
        idle=$(SLURM_CONF=$conf timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | grep -c ' idle$' || true)
        ((idle == ${#NODES[@]})) && break
        sleep 0.2
    done
    if ((idle != ${#NODES[@]})); then
        SLURM_CONF=$conf timeout 5 sinfo -N -l >&2 || true
        tail -n 5 "$DIR"/log/*.log >&2 || true
        start_failed "the nodes were not idle within ${START_TIMEOUT_S} s; logs in $DIR/log"
    fi
    echo "# Slurm cluster up in $DIR (nodes ${NODES[*]}, partitions debug and high); for its clients:"
    cat "$DIR/env.sh"
}

case ${1:-} in
start) start_cluster ;;
stop) stop_cluster ;;
status)
    [[ -f $DIR/slurm.conf && -n $(running_pids) ]] || die "no cluster running in $DIR"
    SLURM_CONF=$DIR/slurm.conf timeout 10 sinfo
    ;;
*) die "usage: $0 start|stop|status   (state directory: \$SLURM_LOCAL_DIR, default /tmp/llama31-slurm)" ;;
esac
