#!/usr/bin/env bash
# broker.sh -- the one RabbitMQ bootstrap script shared by the Makefile, CI and the tests.
#
# Usage:
#   broker.sh install
#       Install Debian's rabbitmq-server if /usr/lib/rabbitmq/bin/rabbitmq-server is missing
#       (apt-get; sudo when not root). The package's own system service is not left running
#       if the installation started it. Quiet and idempotent when already installed.
#   broker.sh ensure
#       Make sure a broker answers on localhost:5672 (used by `make demo`):
#       reuse whatever already answers there, else `docker compose up -d rabbitmq` when a
#       Docker engine runs, else install RabbitMQ and start a private background node
#       aioqueue-demo@localhost with its files under <repo>/.rabbitmq/demo/.
#   broker.sh stop-demo
#       Stop the aioqueue-demo@localhost node started by `ensure` (no error if not running).
#   broker.sh start-node DIR NODENAME AMQP_PORT DIST_PORT [EXTRA_CONF_FILE]
#       Start a private, isolated node (used by the tests): all its files (config, data, logs,
#       pid file) live under DIR, it listens for AMQP on AMQP_PORT and for Erlang distribution
#       on DIST_PORT, no plugins. EXTRA_CONF_FILE (rabbitmq.conf syntax) is appended to its
#       config. Waits until the node has booted, then prints amqp://guest:guest@127.0.0.1:PORT/.
#       Re-running it on the same DIR keeps the data (durable queues and messages survive).
#   broker.sh ctl NODENAME ARGS...
#       rabbitmqctl -n NODENAME ARGS... with the Erlang cookie the nodes started here use.
#   broker.sh stop-node NODENAME
#       Stop a node started by start-node and make sure its Erlang VM is gone (epmd may stay).
#   broker.sh diag NODENAME ARGS...
#       rabbitmq-diagnostics -n NODENAME ARGS..., with the same cookie as `ctl`.
#   broker.sh join-cluster NODENAME SEED_NODENAME
#       Make the running node NODENAME a member of SEED_NODENAME's cluster: stop_app,
#       join_cluster SEED, start_app, then wait until it runs. Idempotent: a node already in
#       SEED's cluster is only started (start_app) if its application is stopped.
#   broker.sh start-cluster DIR [BASE_PORT]
#       Start (or restart, keeping the data) a local 3-node cluster for trying things out
#       (`make cluster`): nodes aioqueue-cluster-1..3@localhost, files under DIR/node1..3, AMQP
#       ports BASE_PORT..BASE_PORT+2 (default 5682), distribution port = AMQP port + 20000.
#       The nodes boot in parallel, then 2 and 3 join 1. Nodes already running are kept. The
#       node names are recorded in DIR/nodes. The last line on stdout is the broker URL, the
#       three node URLs joined by commas.
#   broker.sh stop-cluster DIR
#       Stop the nodes start-cluster started in DIR (no error if they are down).
#
# A node name without "@host" gets "@localhost". Nodes run as the invoking user; as root the
# Erlang cookie is the system one (/var/lib/rabbitmq/.erlang.cookie), else ~/.erlang.cookie.
#
# Environment knobs:
#   BROKER_RABBITMQ_BIN   directory of the RabbitMQ scripts (default /usr/lib/rabbitmq/bin)
#   BROKER_START_TIMEOUT  seconds to wait for a node to boot (default 120)
#   BROKER_DLX_CONFIRM_TIMEOUT  milliseconds before at-least-once dead-lettering re-sends a hop
#                         (advanced.config; default 10000; "default": RabbitMQ's own, 180 s on 3.10)
#   BROKER_ALL_PLUGINS=1  give the node the full plugin directory (slower boot; only needed
#                         when EXTRA_CONF_FILE configures a plugin, which must be enabled too)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
RMQ_BIN="${BROKER_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
START_TIMEOUT="${BROKER_START_TIMEOUT:-120}"

DEMO_NODE="aioqueue-demo@localhost"
DEMO_DIR="$REPO_ROOT/.rabbitmq/demo"
DEMO_AMQP_PORT=5672
DEMO_DIST_PORT=25699 # 25672 + 27: clear of a system node's default distribution port
DOCKER_WAIT=90

log() { printf 'broker.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# Run a command as root (directly, or through sudo when available).
as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

with_host() { [[ "$1" == *@* ]] && printf '%s\n' "$1" || printf '%s@localhost\n' "$1"; }

require_port() {
    if ! [[ "$2" =~ ^[0-9]+$ ]] || ((10#$2 == 0 || 10#$2 > 65535)); then
        die "$1: bad port '$2'"
    fi
}

# True when something accepts TCP connections on HOST:PORT.
# shellcheck disable=SC2016 # $1/$2 expand in the child bash
port_open() {
    if command -v timeout >/dev/null 2>&1; then
        timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
    else
        bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
    fi
}

wait_port() { # HOST PORT SECONDS
    local deadline=$((SECONDS + $3))
    until port_open "$1" "$2"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

installed() { [[ -x "$RMQ_BIN/rabbitmq-server" && -x "$RMQ_BIN/rabbitmqctl" ]]; }

require_installed() {
    installed || die "RabbitMQ is not installed ($RMQ_BIN/rabbitmq-server missing); run: $0 install"
}

# --- Erlang cookie -----------------------------------------------------------------------
# The node and rabbitmqctl find the cookie in $HOME/.erlang.cookie, so both run with the HOME
# printed here. As root we share the system node's cookie so `rabbitmqctl` works for both.
cookie_home() {
    if [[ "$(id -u)" == 0 && -d /var/lib/rabbitmq ]]; then
        ensure_system_cookie
        printf '%s\n' /var/lib/rabbitmq
    else
        printf '%s\n' "${HOME:?HOME is not set}"
    fi
}

# If the system cookie does not exist yet (the package's service never ran), create it owned
# by the rabbitmq user, as the service would: a root-owned cookie would break that service.
ensure_system_cookie() {
    local file=/var/lib/rabbitmq/.erlang.cookie random
    [[ -e "$file" ]] && return 0
    random="$(LC_ALL=C tr -dc '[:upper:]' < <(head -c 2048 /dev/urandom))"
    (umask 077 && printf '%s' "${random:0:20}" >"$file")
    if id rabbitmq >/dev/null 2>&1; then
        chown rabbitmq:rabbitmq "$file"
    fi
    chmod 400 "$file"
}

rmq_ctl() { # ARGS... (always called with -n NODE)
    local home
    home="$(cookie_home)"
    # An empty env file: ignore /etc/rabbitmq/rabbitmq-env.conf (e.g. USE_LONGNAME there).
    HOME="$home" RABBITMQ_CONF_ENV_FILE=/dev/null "$RMQ_BIN/rabbitmqctl" "$@"
}

rmq_diag() { # ARGS... (always called with -n NODE)
    local home
    home="$(cookie_home)"
    HOME="$home" RABBITMQ_CONF_ENV_FILE=/dev/null "$RMQ_BIN/rabbitmq-diagnostics" "$@"
}

# --- finding a node's processes ------------------------------------------------------------
epmd_bin() {
    command -v epmd 2>/dev/null || ls /usr/lib/erlang/bin/epmd 2>/dev/null || true
}

# True while epmd lists the node's short name (i.e. its Erlang distribution is up).
epmd_registered() { # NODE
    local epmd short="${1%@*}"
    epmd="$(epmd_bin)"
    [[ -n "$epmd" ]] || return 1
    "$epmd" -names 2>/dev/null | grep -qF "name $short at port "
}

# PIDs of the Erlang VMs (beam.smp) started with RABBITMQ_NODENAME=NODE.
node_pids() { # NODE
    local proc comm
    for proc in /proc/[0-9]*; do
        comm="$(cat "$proc/comm" 2>/dev/null)" || continue
        [[ "$comm" == beam.smp ]] || continue
        if grep -zqxF "RABBITMQ_NODENAME=$1" "$proc/environ" 2>/dev/null; then
            printf '%s\n' "${proc#/proc/}"
        fi
    done
}

proc_alive() { # PID: running and not a zombie
    local state
    [[ -r "/proc/$1/stat" ]] || return 1
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

wait_pids_gone() { # SECONDS PID...
    local deadline=$((SECONDS + $1)) pid
    shift
    for pid in "$@"; do
        while proc_alive "$pid"; do
            ((SECONDS < deadline)) || return 1
            sleep 0.1
        done
    done
}

# --- install -----------------------------------------------------------------------------
service_active() {
    command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null
}

cmd_install() {
    installed && return 0
    log "RabbitMQ not found at $RMQ_BIN; installing Debian's rabbitmq-server"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install RabbitMQ yourself"

    # Keep the package's postinst from starting the system service (policy-rc.d is honoured by
    # invoke-rc.d and deb-systemd-invoke); only when no policy is in place already.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e "$policy" ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted
    fi
    local rc=0
    {
        as_root apt-get update -qq &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server
    } || rc=$?
    if ((added_policy)); then
        as_root rm -f "$policy"
        trap - EXIT
    fi
    ((rc == 0)) || die "apt-get install rabbitmq-server failed (exit $rc)"
    installed || die "rabbitmq-server installed, but $RMQ_BIN/rabbitmq-server is missing"

    # Nothing was installed before us, so a running system node was started by the install.
    if service_active; then
        log "stopping the rabbitmq-server service the package started"
        as_root systemctl stop rabbitmq-server || true
    elif epmd_registered rabbit@localhost; then
        log "stopping the rabbit node the package started"
        as_root /usr/sbin/rabbitmqctl stop >/dev/null 2>&1 || true
    fi
    log "installed $(basename "$(dirname "$(dirname "$(readlink -f "$RMQ_BIN/rabbitmq-server")")")")"
}

# --- start-node ----------------------------------------------------------------------------
# A private RABBITMQ_HOME whose plugins/ holds only the apps the broker itself needs (all
# symlinks). The node scans every app on its code path for feature flags and boot steps, so
# hiding the ~45 optional plugins roughly halves the boot time.
make_lean_home() { # DIR -> prints the home directory
    local dir="$1" real_sbin real_home home app name core_apps
    real_sbin="$(dirname "$(readlink -f "$RMQ_BIN/rabbitmq-server")")"
    real_home="$(dirname "$real_sbin")"
    home="$dir/rabbitmq-home"
    rm -rf "$home"
    mkdir -p "$home/sbin" "$home/plugins"
    ln -s "$real_sbin"/* "$home/sbin/"
    [[ -e "$real_home/escript" ]] && ln -s "$real_home/escript" "$home/escript"
    # rabbitmq_* apps are plugins, except the ones the rabbit app depends on (rabbitmq_prelaunch).
    core_apps="$(cat "$real_home"/plugins/rabbit-[0-9]*/ebin/rabbit.app 2>/dev/null |
        tr -d ' \n\t' | sed -n 's/.*{applications,\[\([^]]*\)\].*/,\1,/p')"
    [[ -n "$core_apps" ]] || core_apps=",rabbitmq_prelaunch,"
    for app in "$real_home"/plugins/*; do
        name="${app##*/}"
        if [[ "$name" == rabbitmq_* && "$core_apps" != *",${name%%-[0-9]*},"* ]]; then
            continue
        fi
        ln -s "$app" "$home/plugins/$name"
    done
    printf '%s\n' "$home"
}

write_node_files() { # DIR AMQP_PORT EXTRA_CONF_FILE
    local dir="$1"
    mkdir -p "$dir/mnesia" "$dir/log" "$dir/conf.d"
    printf '[].\n' >"$dir/enabled_plugins"
    # At-least-once dead-lettering (aioqueue's quorum delay ladder) re-sends a hop whose target
    # did not confirm after this long: 180 s by default on 3.10, so a hop caught by a node's
    # death would stall delayed tasks for minutes. Not settable in rabbitmq.conf on 3.10.
    # BROKER_DLX_CONFIRM_TIMEOUT=default leaves RabbitMQ's own (to show the difference).
    if [[ "${BROKER_DLX_CONFIRM_TIMEOUT:-10000}" == default ]]; then
        printf '[].\n' >"$dir/advanced.config"
    else
        printf '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, %s}]}].\n' \
            "${BROKER_DLX_CONFIRM_TIMEOUT:-10000}" >"$dir/advanced.config"
    fi
    : >"$dir/rabbitmq-env.conf"
    {
        printf '# Written by services/rabbitmq/broker.sh start-node; rewritten on every start.\n'
        printf 'listeners.tcp.default = %s\n' "$2"
        printf 'log.console = false\n'
        if [[ -n "$3" ]]; then
            printf '\n# --- from %s\n' "$3"
            cat "$3"
            printf '\n'
        fi
    } >"$dir/rabbitmq.conf"
}

print_node_logs() { # DIR NODE
    local startup="$1/log/startup.log" node_log="$1/log/$2.log" lines
    if [[ -s "$startup" ]]; then
        # This attempt's output; the cause (e.g. a config error) comes first, the crash last.
        lines="$(awk '/^===== /{n=0; delete a} {a[++n]=$0} END{for(i=1;i<=n;i++) print a[i]}' "$startup")"
        printf '%s\n' "----- $startup -----" >&2
        if (($(wc -l <<<"$lines") > 80)); then
            head -n 30 <<<"$lines" >&2
            printf '[...]\n' >&2
            tail -n 40 <<<"$lines" >&2
        else
            printf '%s\n' "$lines" >&2
        fi
    fi
    if [[ -s "$node_log" ]]; then
        printf '%s\n' "----- last lines of $node_log -----" >&2
        tail -n 40 "$node_log" >&2
    fi
}

launch_node() { # DIR NODE AMQP_PORT DIST_PORT HOME RABBITMQ_HOME(or empty)
    local dir="$1" node="$2" var
    (
        cd "$dir"
        # Only what is set below may configure this node: drop the caller's RABBITMQ_* and
        # Erlang code-path/flag settings (ERL_EPMD_* stays, epmd is shared).
        for var in $(compgen -e); do
            case "$var" in
            RABBITMQ_* | ERL_LIBS | ERL_FLAGS | ERL_AFLAGS | ERL_ZFLAGS | ERL_CRASH_DUMP*) unset "$var" ;;
            esac
        done
        export HOME="$5"
        export RABBITMQ_NODENAME="$node"
        export RABBITMQ_NODE_PORT="$3"
        export RABBITMQ_DIST_PORT="$4"
        export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
        export RABBITMQ_CONFIG_FILE="$dir/rabbitmq"
        export RABBITMQ_CONFIG_FILES="$dir/conf.d/*.conf"
        export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
        export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        export RABBITMQ_MNESIA_BASE="$dir/mnesia"
        export RABBITMQ_MNESIA_DIR="$dir/mnesia/$node"
        export RABBITMQ_QUORUM_DIR="$dir/mnesia/$node/quorum"
        export RABBITMQ_STREAM_DIR="$dir/mnesia/$node/stream"
        export RABBITMQ_FEATURE_FLAGS_FILE="$dir/mnesia/$node-feature_flags"
        export RABBITMQ_PLUGINS_EXPAND_DIR="$dir/mnesia/$node-plugins-expand"
        export RABBITMQ_LOG_BASE="$dir/log"
        export RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
        export RABBITMQ_MOTD_FILE="$dir/motd"
        export ERL_CRASH_DUMP="$dir/log/erl_crash.dump"
        if [[ -n "$6" ]]; then
            export RABBITMQ_SCRIPTS_DIR="$6/sbin" RABBITMQ_PLUGINS_DIR="$6/plugins"
        fi
        # The server script runs in the foreground of its own session, in the background of
        # this one: unlike `-detached` this keeps early boot errors (e.g. a bad config) in
        # log/startup.log. The script stays as the VM's parent and exits with it.
        if command -v setsid >/dev/null 2>&1; then
            exec setsid "$RMQ_BIN/rabbitmq-server" </dev/null >>"$dir/log/startup.log" 2>&1
        fi
        exec nohup "$RMQ_BIN/rabbitmq-server" </dev/null >>"$dir/log/startup.log" 2>&1
    ) &
    LAUNCHER_PID=$!
}

cmd_start_node() { # DIR NODENAME AMQP_PORT DIST_PORT [EXTRA_CONF_FILE]
    (($# == 4 || $# == 5)) || usage
    local dir="$1" node amqp_port="$3" dist_port="$4" extra="${5:-}"
    node="$(with_host "$2")"
    require_port AMQP_PORT "$amqp_port"
    require_port DIST_PORT "$dist_port"
    [[ -z "$extra" || -r "$extra" ]] || die "cannot read EXTRA_CONF_FILE $extra"
    require_installed
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    local pids
    pids="$(node_pids "$node")"
    [[ -z "$pids" ]] || die "node $node is already running (pid ${pids//$'\n'/ })"
    ! port_open 127.0.0.1 "$amqp_port" || die "port $amqp_port is already in use"

    write_node_files "$dir" "$amqp_port" "$extra"
    rm -f "$dir/rabbitmq.pid"
    local home lean_home=""
    home="$(cookie_home)"
    if [[ "${BROKER_ALL_PLUGINS:-0}" != 1 ]]; then
        lean_home="$(make_lean_home "$dir")"
    fi

    local started=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    printf '\n===== %s start-node %s (AMQP %s, dist %s)\n' \
        "$(date '+%F %T')" "$node" "$amqp_port" "$dist_port" >>"$dir/log/startup.log"
    launch_node "$dir" "$node" "$amqp_port" "$dist_port" "$home" "$lean_home"

    # First wait for the node's distribution (rabbitmqctl cannot reach it before), watching
    # for an early exit; then let rabbitmqctl wait for the boot to complete.
    until epmd_registered "$node"; do
        if ! proc_alive "$LAUNCHER_PID"; then
            print_node_logs "$dir" "$node"
            die "node $node exited during startup (files in $dir)"
        fi
        if ((SECONDS >= deadline)); then
            cleanup_failed_node "$node"
            print_node_logs "$dir" "$node"
            die "node $node did not come up within ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
    local remaining=$((deadline - SECONDS))
    ((remaining > 5)) || remaining=5
    if ! rmq_ctl -n "$node" await_startup --timeout "$remaining" >/dev/null 2>"$dir/log/await_startup.err"; then
        cat "$dir/log/await_startup.err" >&2
        cleanup_failed_node "$node"
        print_node_logs "$dir" "$node"
        die "node $node failed to boot (files in $dir)"
    fi
    log "node $node up in $((SECONDS - started))s (AMQP port $amqp_port, files in $dir)"
    printf 'amqp://guest:guest@127.0.0.1:%s/\n' "$amqp_port"
}

cleanup_failed_node() { # NODE
    local pids
    pids="$(node_pids "$1")"
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
}

# --- stop-node -----------------------------------------------------------------------------
cmd_stop_node() { # NODENAME
    (($# == 1)) || usage
    local node pids
    node="$(with_host "$1")"
    pids="$(node_pids "$node")"
    if [[ -z "$pids" ]] && ! epmd_registered "$node"; then
        log "node $node is not running"
        return 0
    fi
    if ! rmq_ctl -n "$node" stop >/dev/null 2>&1; then
        log "rabbitmqctl stop failed for $node (already down?)"
    fi
    pids="$(node_pids "$node")"
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        if ! wait_pids_gone 30 $pids; then
            log "node $node still running after 30s; killing pid(s) ${pids//$'\n'/ }"
            kill -9 $pids 2>/dev/null || true
            wait_pids_gone 10 $pids || die "could not kill node $node (pid ${pids//$'\n'/ })"
        fi
    fi
    log "node $node stopped"
}

# --- clusters ---------------------------------------------------------------------------------
# The nodes of NODE's cluster as it sees them (its disk nodes), one per line; empty if unknown.
cluster_members() { # NODE [KEY: disk_nodes | running_nodes]
    local out
    out="$(rmq_ctl -n "$1" -q cluster_status --formatter json 2>/dev/null)" || return 0
    # {"disk_nodes":["a@h","b@h"],...}: the list after the key, one name per line
    sed -n "s/.*\"${2:-disk_nodes}\":\[\([^]]*\)\].*/\1/p" <<<"$out" | tr ',' '\n' | tr -d '"' |
        sed '/^$/d'
}

cmd_join_cluster() { # NODENAME SEED_NODENAME
    (($# == 2)) || usage
    require_installed
    local node seed started=$SECONDS
    node="$(with_host "$1")"
    seed="$(with_host "$2")"
    [[ "$node" != "$seed" ]] || die "join-cluster: $node cannot join itself"
    if cluster_members "$node" | grep -qxF "$seed"; then
        if ! cluster_members "$node" running_nodes | grep -qxF "$node"; then
            rmq_ctl -n "$node" start_app >/dev/null || die "start_app failed on $node"
        fi
        rmq_ctl -n "$node" await_startup --timeout "$START_TIMEOUT" >/dev/null ||
            die "node $node did not start within ${START_TIMEOUT}s"
        log "node $node is already in the cluster of $seed"
        return 0
    fi
    rmq_ctl -n "$node" stop_app >/dev/null || die "stop_app failed on $node"
    if ! rmq_ctl -n "$node" join_cluster "$seed" >/dev/null; then
        rmq_ctl -n "$node" start_app >/dev/null 2>&1 || true
        die "$node could not join the cluster of $seed"
    fi
    rmq_ctl -n "$node" start_app >/dev/null || die "start_app failed on $node"
    rmq_ctl -n "$node" await_startup --timeout "$START_TIMEOUT" >/dev/null ||
        die "node $node did not start within ${START_TIMEOUT}s"
    log "node $node joined the cluster of $seed in $((SECONDS - started))s"
}

CLUSTER_SIZE=3
CLUSTER_BASE_PORT=5682

cmd_start_cluster() { # DIR [BASE_PORT]
    (($# == 1 || $# == 2)) || usage
    local dir="$1" base="${2:-$CLUSTER_BASE_PORT}" i port started=$SECONDS
    require_port BASE_PORT "$base"
    require_port BASE_PORT "$((base + CLUSTER_SIZE - 1 + 20000))"
    cmd_install
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local -a nodes=() urls=() jobs=()
    for ((i = 1; i <= CLUSTER_SIZE; i++)); do
        nodes+=("aioqueue-cluster-$i@localhost")
        urls+=("amqp://guest:guest@127.0.0.1:$((base + i - 1))/")
    done
    printf '%s\n' "${nodes[@]}" >"$dir/nodes"

    # Boot in parallel: a cluster restarted after a full stop needs its peers to finish booting.
    for ((i = 1; i <= CLUSTER_SIZE; i++)); do
        port=$((base + i - 1))
        if [[ -n "$(node_pids "${nodes[i - 1]}")" ]]; then
            log "node ${nodes[i - 1]} is already running"
            continue
        fi
        (cmd_start_node "$dir/node$i" "${nodes[i - 1]}" "$port" "$((port + 20000))" >/dev/null) &
        jobs+=($!)
    done
    local failed=0 job
    for job in "${jobs[@]}"; do
        wait "$job" || failed=1
    done
    ((failed == 0)) || die "some cluster nodes did not start (files in $dir); stop them with: $0 stop-cluster $dir"

    for ((i = 2; i <= CLUSTER_SIZE; i++)); do
        cmd_join_cluster "${nodes[i - 1]}" "${nodes[0]}"
    done
    log "cluster of ${nodes[*]} up in $((SECONDS - started))s (files in $dir)"
    local IFS=,
    printf '%s\n' "${urls[*]}"
}

cmd_stop_cluster() { # DIR
    (($# == 1)) || usage
    local dir="$1" node failed=0 job
    local -a jobs=()
    if [[ ! -r "$dir/nodes" ]]; then
        log "no cluster recorded in $dir"
        return 0
    fi
    installed || return 0
    while IFS= read -r node; do
        [[ -n "$node" ]] || continue
        cmd_stop_node "$node" &
        jobs+=($!)
    done <"$dir/nodes"
    for job in "${jobs[@]}"; do
        wait "$job" || failed=1
    done
    ((failed == 0)) || die "some cluster nodes could not be stopped"
}

# --- ensure / stop-demo ----------------------------------------------------------------------
docker_compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose "$@"
    else
        die "a Docker engine runs but neither 'docker compose' nor 'docker-compose' is available"
    fi
}

# The URL the demo should use is written to .rabbitmq/demo-url (read by `make demo`).
remember_url() {
    mkdir -p "$REPO_ROOT/.rabbitmq"
    printf '%s\n' "$1" >"$REPO_ROOT/.rabbitmq/demo-url"
}

cmd_ensure() {
    if port_open 127.0.0.1 "$DEMO_AMQP_PORT"; then
        echo "RabbitMQ already answering on localhost:$DEMO_AMQP_PORT"
        [[ -f "$REPO_ROOT/.rabbitmq/demo-url" ]] ||
            remember_url "amqp://guest:guest@localhost:$DEMO_AMQP_PORT/"
        return 0
    fi
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo "Starting RabbitMQ with Docker: docker compose up -d rabbitmq"
        (cd "$REPO_ROOT" && docker_compose up -d rabbitmq)
        wait_port 127.0.0.1 "$DEMO_AMQP_PORT" "$DOCKER_WAIT" ||
            die "the rabbitmq container did not answer on localhost:$DEMO_AMQP_PORT within ${DOCKER_WAIT}s"
        echo "RabbitMQ (Docker) answering on localhost:$DEMO_AMQP_PORT;" \
            "its user is aioqueue/aioqueue: amqp://aioqueue:aioqueue@localhost:$DEMO_AMQP_PORT/"
        echo "Stop it with: docker compose stop rabbitmq"
        remember_url "amqp://aioqueue:aioqueue@localhost:$DEMO_AMQP_PORT/"
        return 0
    fi
    cmd_install
    cmd_start_node "$DEMO_DIR" "$DEMO_NODE" "$DEMO_AMQP_PORT" "$DEMO_DIST_PORT" >/dev/null
    echo "Started RabbitMQ node $DEMO_NODE in the background:" \
        "amqp://guest:guest@localhost:$DEMO_AMQP_PORT/ (files in ${DEMO_DIR#"$REPO_ROOT"/})"
    echo "Stop it with: services/rabbitmq/broker.sh stop-demo"
    remember_url "amqp://guest:guest@localhost:$DEMO_AMQP_PORT/"
}

cmd_stop_demo() {
    if ! installed; then
        log "RabbitMQ is not installed; no demo node to stop"
        return 0
    fi
    cmd_stop_node "$DEMO_NODE"
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        log "a broker started with Docker is stopped with: docker compose stop rabbitmq"
    fi
}

main() {
    (($# >= 1)) || usage
    local cmd="$1"
    shift
    case "$cmd" in
    install | ensure | stop-demo)
        (($# == 0)) || usage
        "cmd_${cmd//-/_}"
        ;;
    start-node) cmd_start_node "$@" ;;
    stop-node) cmd_stop_node "$@" ;;
    join-cluster) cmd_join_cluster "$@" ;;
    start-cluster) cmd_start_cluster "$@" ;;
    stop-cluster) cmd_stop_cluster "$@" ;;
    ctl | diag) # rabbitmqctl or rabbitmq-diagnostics, on one node
        (($# >= 1)) || usage
        require_installed
        local node
        node="$(with_host "$1")"
        shift
        "rmq_$cmd" -n "$node" "$@"
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
