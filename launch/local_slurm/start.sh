#!/usr/bin/env bash
# Start a real single-machine Slurm on this host, for tests and trials of `pretrain submit`.
#
# munged runs as the munge user; slurmctld and slurmd run as root with the config rendered from slurm.conf.tmpl
# (NodeName = `hostname`, its CPUs and memory from `slurmd -C`, one default partition `debug`). Missing Debian
# packages are installed first (apt-get update once, then apt-get install). Idempotent: when everything already runs
# with the same config and passes health.sh, it prints so and exits 0. Exit 1 with a message when it cannot start.
#
# Environment: PRETRAIN_SLURM_TIMEOUT_S (default 90) bounds the wait for the node to come up.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.tmpl"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="pretrain-local-slurm"
TIMEOUT_S="${PRETRAIN_SLURM_TIMEOUT_S:-90}"
PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(slurmctld slurmd sinfo srun sbatch scontrol squeue scancel munged munge unmunge)

# shellcheck source=common.sh
source "$HERE/common.sh"
die() {
    echo "local Slurm: ERROR: $*" >&2
    exit 1
}

show_log_tail() {
    [ -r "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 15 "$1" >&2; }
    return 0
}

missing_commands() {
    local c out=()
    for c in "${COMMANDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || out+=("$c")
    done
    echo "${out[@]:-}"
}

install_packages() {
    local missing
    missing="$(missing_commands)"
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed (missing: $missing) and installing it needs root: sudo make slurm-up"
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed (missing: $missing) and there is no apt-get;" \
        "install slurmctld, slurmd, slurm-client and munge with your package manager"
    log "installing ${PACKAGES[*]} (missing: $missing)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst would start the daemons before slurm.conf exists (and fail the install): this script
    # starts them itself. Block service starts during the install unless the machine already does (containers do).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, from launch/local_slurm/start.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get -o DPkg::Lock::Timeout=300 update -q >/tmp/pretrain-slurm-apt.log 2>&1 \
        || { tail -n 20 /tmp/pretrain-slurm-apt.log >&2; die "apt-get update failed (log: /tmp/pretrain-slurm-apt.log)"; }
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${PACKAGES[@]}" \
        >>/tmp/pretrain-slurm-apt.log 2>&1 \
        || { tail -n 20 /tmp/pretrain-slurm-apt.log >&2; die "apt-get install ${PACKAGES[*]} failed (log: /tmp/pretrain-slurm-apt.log)"; }
    missing="$(missing_commands)"
    [ -z "$missing" ] || die "packages installed but still missing: $missing"
}

# Render slurm.conf for this host into stdout.
render_conf() {
    local host hw cpus boards spb cps tpc mem
    host="$(hostname)"
    # slurmd -C prints what slurmd detects, e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
    # ThreadsPerCore=1 RealMemory=24105": configuring exactly that keeps the node from being drained for a mismatch.
    hw="$(slurmd -C 2>/dev/null | head -n1)" || true
    field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<" $hw"; }
    cpus="$(field CPUs)"
    boards="$(field Boards)"
    spb="$(field SocketsPerBoard)"
    cps="$(field CoresPerSocket)"
    tpc="$(field ThreadsPerCore)"
    mem="$(field RealMemory)"
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read this machine's CPUs/memory from 'slurmd -C' (got: '$hw')"
    sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@BOARDS@/${boards:-1}/g" \
        -e "s/@SOCKETS_PER_BOARD@/${spb:-1}/g" -e "s/@CORES_PER_SOCKET@/${cps:-$cpus}/g" \
        -e "s/@THREADS_PER_CORE@/${tpc:-1}/g" -e "s/@REAL_MEMORY@/$mem/g" \
        -e "s/@DEF_MEM_PER_CPU@/$((mem / cpus))/g" "$TEMPLATE"
}

start_munge() {
    if pid_alive /run/munge/munged.pid munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    install -d -m 0755 /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    log "starting munged (as munge)"
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&- || {
        show_log_tail /var/log/munge/munged.log
        die "munged did not start"
    }
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    show_log_tail /var/log/munge/munged.log
    die "munged runs but 'munge -n | unmunge' fails"
}

start_daemon() { # start_daemon NAME PIDFILE LOGFILE
    pid_alive "$2" "$1" && return 0
    log "starting $1"
    "/usr/sbin/$1" </dev/null >/dev/null 2>&1 9>&- || {
        show_log_tail "$3"
        die "$1 did not start"
    }
    for _ in $(seq 1 20); do
        pid_alive "$2" "$1" && return 0
        sleep 0.5
    done
    show_log_tail "$3"
    die "$1 exited right after starting"
}

wait_for_node() {
    local host state deadline
    host="$(hostname)"
    deadline=$((SECONDS + TIMEOUT_S))
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(timeout 15 sinfo -h -N -n "$host" -o %T 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down*)
                # left over from an earlier stop (e.g. the node was DOWN when slurmctld saved its state)
                log "node $host is '$state' ($(sinfo -h -N -n "$host" -o %E 2>/dev/null)); resuming it"
                scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
                ;;
        esac
        sleep 1
    done
    show_log_tail /var/log/slurm/slurmd.log
    show_log_tail /var/log/slurm/slurmctld.log
    die "node $host did not become idle within ${TIMEOUT_S}s (state: '${state:-unknown}')"
}

main() {
    mkdir -p /run/lock 2>/dev/null || true
    # fd 9 holds the lock; daemons are started with 9>&- so that they do not keep holding it
    take_lock

    install_packages
    local rendered
    rendered="$(render_conf)"

    if [ -f "$CONF" ] && [ "$rendered" = "$(cat "$CONF")" ] && pid_alive /run/slurmctld.pid slurmctld \
        && pid_alive /run/slurmd.pid slurmd && bash "$HERE/health.sh" --quiet; then
        log "already up ($(hostname): $(sinfo -h -N -n "$(hostname)" -o '%T, %c CPUs, %m MB'))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "local Slurm is not running and starting it needs root: sudo make slurm-up"
    if [ -f "$CONF" ] && ! grep -q "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace it (move it away to continue)"
    fi

    start_munge
    install -d -m 0755 "$CONF_DIR" /var/log/slurm /var/spool/slurmd
    install -d -m 0700 /var/spool/slurmctld
    if [ ! -f "$CONF" ] || [ "$rendered" != "$(cat "$CONF")" ]; then
        log "writing $CONF"
        printf '%s\n' "$rendered" >"$CONF.tmp"
        mv "$CONF.tmp" "$CONF"
        # a running controller or node daemon still has the old config: restart them
        stop_daemon /run/slurmd.pid slurmd
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    start_daemon slurmctld /run/slurmctld.pid /var/log/slurm/slurmctld.log
    start_daemon slurmd /run/slurmd.pid /var/log/slurm/slurmd.log
    wait_for_node
    if ! bash "$HERE/health.sh"; then
        show_log_tail /var/log/slurm/slurmd.log
        die "started, but the health check fails"
    fi
    log "up: $(sinfo -h -N -n "$(hostname)" -o 'node %N %T, %c CPUs, %m MB, partition %P')"
}

main "$@"
