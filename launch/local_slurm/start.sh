#!/usr/bin/env bash
# Start a real Slurm cluster on this one host, for tests and trials of `pretrain submit`.
#
# munged runs as the munge user; slurmctld and one slurmd per node run as root with the config rendered from
# slurm.conf.tmpl (CPUs and memory from `slurmd -C`, one default partition `debug`). Missing Debian packages are
# installed first (apt-get update once, then apt-get install). Idempotent: when everything already runs with the same
# config and passes health.sh, it prints so and exits 0. Exit 1 with a message when it cannot start.
#
# Nodes (SLURM_NODES, default 2): with 2 or more, the nodes are n1, n2, ..., each its own `slurmd -N nX` with its own
# Port= and NodeAddr=127.0.0.1, and the names resolve through lines this script keeps in /etc/hosts (marked
# "pretrain-local-slurm"), so a `--nodes 2` job is laid out, and finds its rendezvous host, as on a real cluster. Each
# node declares all of the host's CPUs, not a share: the existing 2-rank jobs ask for 2 CPUs on one node
# (--ntasks-per-node=2) and a rank may ask for --cpus-per-task=2, which 1-CPU nodes could never run; the price is that
# jobs on different nodes may share (oversubscribe) the cores, which slows them down but changes no result. Memory is
# split between the nodes (oversubscribed memory would end in the OOM killer, not in a slowdown). SLURM_NODES=1 runs
# the single-node cluster: one node named after `hostname`.
#
# Environment: SLURM_NODES (default 2); PRETRAIN_SLURM_TIMEOUT_S (default 90) bounds the wait for the nodes.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE="$HERE/slurm.conf.tmpl"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="pretrain-local-slurm"
TIMEOUT_S="${PRETRAIN_SLURM_TIMEOUT_S:-90}"
NODES="${SLURM_NODES:-2}"
NODE_PORT_BASE=6820 # several nodes: node i's slurmd listens on 6820 + i (slurmctld has 6817, one slurmd 6818)
HOSTS_FILE=/etc/hosts
HOSTS_MARK="# pretrain-local-slurm nodes"
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

[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "SLURM_NODES=$NODES must be a number of nodes from 1 to 99"

# node_names: the Slurm node names, one a line (one node: this host's name; several: n1, n2, ...).
node_names() {
    if [ "$NODES" = 1 ]; then
        hostname
    else
        seq -f 'n%g' 1 "$NODES"
    fi
}

# hosts_line: the /etc/hosts line that makes the node names resolve to this host (empty with one node).
hosts_line() {
    [ "$NODES" = 1 ] || echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_MARK"
}

hosts_ok() { # every node name resolves to this host
    local name
    for name in $(node_names); do
        getent hosts "$name" | grep -q '^127\.' || return 1
    done
}

update_hosts() {
    local want current name
    want="$(hosts_line)"
    current="$(grep -F "$HOSTS_MARK" "$HOSTS_FILE" 2>/dev/null || true)"
    if [ "$current" != "$want" ]; then
        log "updating $HOSTS_FILE: ${want:-no node names (single node)}"
        {
            grep -vF "$HOSTS_MARK" "$HOSTS_FILE" || true
            if [ -n "$want" ]; then echo "$want"; fi
        } >"$HOSTS_FILE.pretrain-tmp"
        # rewritten in place: in a container /etc/hosts is a bind mount, which a rename cannot replace
        cat "$HOSTS_FILE.pretrain-tmp" >"$HOSTS_FILE"
        rm -f "$HOSTS_FILE.pretrain-tmp"
    fi
    for name in $(node_names); do
        getent hosts "$name" | grep -q '^127\.' \
            || die "node name $name resolves to '$(getent hosts "$name")', not to this host; remove it from $HOSTS_FILE"
    done
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
    local host hw cpus boards spb cps tpc mem node_mem name i=0 lines="" list="" out
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
    node_mem=$((mem / NODES))
    for name in $(node_names); do
        i=$((i + 1))
        lines+="${lines:+$'\n'}NodeName=$name"
        [ "$NODES" = 1 ] || lines+=" NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i))"
        lines+=" CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${spb:-1} CoresPerSocket=${cps:-$cpus}"
        lines+=" ThreadsPerCore=${tpc:-1} RealMemory=$node_mem State=UNKNOWN"
        list+="${list:+,}$name"
    done
    out="$(<"$TEMPLATE")"
    out="${out//@HOST@/$host}"
    out="${out//@NODE_COUNT@/$NODES}"
    out="${out//@NODE_LINES@/$lines}"
    out="${out//@NODE_LIST@/$list}"
    out="${out//@DEF_MEM_PER_CPU@/$((node_mem / cpus))}"
    printf '%s\n' "$out"
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

start_daemon() { # start_daemon NAME PIDFILE LOGFILE [ARGS...]
    pid_alive "$2" "$1" && return 0
    log "starting $1 ${*:4}"
    "/usr/sbin/$1" "${@:4}" </dev/null >/dev/null 2>&1 9>&- || {
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

slurmds_alive() { # every node's slurmd runs
    local name
    for name in $(node_names); do
        pid_alive "/run/slurmd-$name.pid" slurmd || return 1
    done
}

wait_for_nodes() {
    local name state deadline
    deadline=$((SECONDS + TIMEOUT_S))
    for name in $(node_names); do
        while :; do
            state="$(timeout 15 sinfo -h -N -n "$name" -o %T 2>/dev/null | head -n1 || true)"
            case "$state" in
                idle | mixed | allocated | completing) break ;;
                drain* | down*)
                    # left over from an earlier stop (e.g. the node was DOWN when slurmctld saved its state)
                    log "node $name is '$state' ($(sinfo -h -N -n "$name" -o %E 2>/dev/null)); resuming it"
                    scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
                    ;;
            esac
            if [ "$SECONDS" -ge "$deadline" ]; then
                show_log_tail "/var/log/slurm/slurmd-$name.log"
                show_log_tail /var/log/slurm/slurmctld.log
                die "node $name did not become idle within ${TIMEOUT_S}s (state: '${state:-unknown}')"
            fi
            sleep 1
        done
    done
}

nodes_summary() { sinfo -h -N -o '%N %T, %c CPUs, %m MB' 2>/dev/null | sort -u | paste -sd ';' | sed 's/;/; /g'; }

main() {
    mkdir -p /run/lock 2>/dev/null || true
    # fd 9 holds the lock; daemons are started with 9>&- so that they do not keep holding it
    take_lock

    install_packages
    local rendered
    rendered="$(render_conf)"

    if [ -f "$CONF" ] && [ "$rendered" = "$(cat "$CONF")" ] && pid_alive /run/slurmctld.pid slurmctld \
        && slurmds_alive && hosts_ok && bash "$HERE/health.sh" --quiet; then
        log "already up ($(nodes_summary))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "local Slurm is not running and starting it needs root: sudo make slurm-up"
    if [ -f "$CONF" ] && ! grep -q "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace it (move it away to continue)"
    fi

    update_hosts
    start_munge
    install -d -m 0755 "$CONF_DIR" /var/log/slurm /var/spool/slurmd
    install -d -m 0700 /var/spool/slurmctld
    if [ ! -f "$CONF" ] || [ "$rendered" != "$(cat "$CONF")" ]; then
        log "writing $CONF ($NODES node(s))"
        printf '%s\n' "$rendered" >"$CONF.tmp"
        mv "$CONF.tmp" "$CONF"
        # running controller and node daemons (of this or an earlier layout) have the old config: restart them
        stop_slurmds
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    start_daemon slurmctld /run/slurmctld.pid /var/log/slurm/slurmctld.log
    local name
    for name in $(node_names); do
        install -d -m 0755 "/var/spool/slurmd/$name"
        start_daemon slurmd "/run/slurmd-$name.pid" "/var/log/slurm/slurmd-$name.log" -N "$name"
    done
    wait_for_nodes
    if ! bash "$HERE/health.sh"; then
        for name in $(node_names); do show_log_tail "/var/log/slurm/slurmd-$name.log"; done
        die "started, but the health check fails"
    fi
    log "up: partition debug: $(nodes_summary)"
}

main "$@"
