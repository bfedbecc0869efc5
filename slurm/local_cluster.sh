#!/usr/bin/env bash
# Bring up / tear down a one-node Slurm cluster on localhost, with accounting
# (munged + mariadbd + slurmdbd + slurmctld + slurmd), for tests and CI.
#
#   slurm/local_cluster.sh up       # install packages if missing, start, wait until the node is idle
#   slurm/local_cluster.sh status   # sinfo + accounting check; exit 0 if up, 1 if not
#   slurm/local_cluster.sh down     # stop everything it started, drop the accounting DB (keeps logs)
#
# Needs root on Debian 12 (Slurm 22.05). No systemd needed. See slurm/LOCAL_CLUSTER.md.
#
# Environment:
#   DGRUN_SLURM_STATE         state dir (default /tmp/dgrun-slurm)
#   DGRUN_SLURM_CLUSTER       cluster name (default dgrun)
#   DGRUN_SLURM_ACCOUNT       account name root is added to (default dgrun)
#   DGRUN_SLURM_DB_PORT       TCP port of the private mariadbd on 127.0.0.1 (default 3307)
#   DGRUN_SLURM_UP_TIMEOUT    seconds to wait for each daemon / the idle node (default 60)
#   DGRUN_SLURM_WRITE_ETC     1 (default): also install slurm.conf as /etc/slurm/slurm.conf so
#                             plain sbatch/squeue/sacct work; 0: only the state dir
#                             (then clients need SLURM_CONF=$DGRUN_SLURM_STATE/etc/slurm.conf)
#   DGRUN_SLURM_KEEP_ON_FAIL  1: if 'up' fails, leave the daemons running for inspection
#                             (default 0: a failed 'up' tears down what it started; logs kept)
set -euo pipefail

STATE="${DGRUN_SLURM_STATE:-/tmp/dgrun-slurm}"
CLUSTER="${DGRUN_SLURM_CLUSTER:-dgrun}"
ACCOUNT="${DGRUN_SLURM_ACCOUNT:-dgrun}"
DB_PORT="${DGRUN_SLURM_DB_PORT:-3307}"
UP_TIMEOUT="${DGRUN_SLURM_UP_TIMEOUT:-60}"
WRITE_ETC="${DGRUN_SLURM_WRITE_ETC:-1}"
KEEP_ON_FAIL="${DGRUN_SLURM_KEEP_ON_FAIL:-0}"

ETC="$STATE/etc"
LOG="$STATE/log"
RUN="$STATE/run"
SPOOL="$STATE/spool"
DBDIR="$STATE/mysql"
CONF="$ETC/slurm.conf"
DBSOCK="$RUN/mysqld.sock"
SYS_CONF=/etc/slurm/slurm.conf
MARKER="# managed by dgrun slurm/local_cluster.sh"

DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=dgrun-slurm-local

# Daemons (= their /proc/<pid>/comm), in start order. They are all launched with fd 9 (the
# lock, see lock()) closed, or they would hold the lock forever.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

export SLURM_CONF="$CONF"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[local_cluster +${SECONDS}s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pidfile_of() {
    # munged runs as user munge and writes its pid file into a dir it owns.
    if [[ "$1" == munged ]]; then echo "$RUN/munge/munged.pid"; else echo "$RUN/$1.pid"; fi
}

# pid of a daemon we started, if it is alive and really that program; else empty.
alive_pid() {
    local name="$1" pf pid comm
    pf="$(pidfile_of "$name")"
    [[ -s "$pf" ]] || return 0
    pid="$(tr -dc '0-9' <"$pf" 2>/dev/null || true)"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 0
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    # comm is truncated to 15 chars; all our names are shorter.
    if [[ "$comm" == "$name" ]]; then echo "$pid"; fi
}

print_log_tails() {
    local f
    for f in "$LOG"/*.log; do
        [[ -f "$f" && "$f" != */mariadb-install-db.log && "$f" != */sacctmgr.log ]] || continue
        echo "----- tail -n 25 $f -----" >&2
        tail -n 25 "$f" >&2 || true
    done
}

fail_up() {
    log "ERROR: $*"
    print_log_tails
    if [[ "$KEEP_ON_FAIL" == 1 ]]; then
        log "DGRUN_SLURM_KEEP_ON_FAIL=1: cluster left partially up; '$0 down' cleans up"
    else
        log "tearing the partial cluster down (logs kept in $LOG)"
        do_down || true
    fi
    exit 1
}

# wait_for <description> <timeout-s> <command...>: poll until command succeeds.
wait_for() {
    local what="$1" t="$2"; shift 2
    local deadline=$((SECONDS + t))
    while ! "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            fail_up "timed out after ${t}s waiting for $what"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINS=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/sacct /usr/sbin/munged
      /usr/sbin/slurmdbd /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/mariadb)

install_packages() {
    local missing=0 b
    for b in "${BINS[@]}"; do [[ -x "$b" ]] || missing=1; done
    ((missing)) || return 0
    [[ "$(id -u)" == 0 ]] || die "packages missing and not root: apt-get install ${PKGS[*]}"
    log "installing ${PKGS[*]} ..."
    # Keep apt/dpkg from starting the packaged services (no systemd; we start our own).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local ok=0
    # apt-get update only when the package lists don't know the packages (or install fails).
    if apt-cache show "${PKGS[@]}" >/dev/null 2>&1 \
        && apt-get install "${apt_opts[@]}" "${PKGS[@]}" </dev/null >"$STATE/apt.log" 2>&1; then
        ok=1
    else
        log "apt-get update ..."
        if apt-get update -q </dev/null >>"$STATE/apt.log" 2>&1 \
            && apt-get install "${apt_opts[@]}" "${PKGS[@]}" </dev/null >>"$STATE/apt.log" 2>&1; then
            ok=1
        fi
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((!ok)); then
        tail -n 30 "$STATE/apt.log" >&2 || true
        die "package installation failed (full log: $STATE/apt.log)"
    fi
    log "packages installed"
}

# ---------------------------------------------------------------- configs
write_configs() {
    local host cfg cpus boards sockets cores threads mem realmem
    host="$(hostname -s)"
    cfg="$(slurmd -C </dev/null 2>/dev/null | head -n 1)" || true
    [[ "$cfg" == NodeName=* ]] || die "'slurmd -C' gave no node description: $cfg"
    field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$cfg"; }
    cpus="$(field CPUs)"; boards="$(field Boards)"; sockets="$(field SocketsPerBoard)"
    cores="$(field CoresPerSocket)"; threads="$(field ThreadsPerCore)"; mem="$(field RealMemory)"
    [[ -n "$cpus" && -n "$mem" ]] || die "cannot parse 'slurmd -C': $cfg"
    # A bit below what slurmd measures, or the node drains with "Low RealMemory".
    realmem=$((mem * 95 / 100))
    local topo="CPUs=$cpus"
    if [[ -n "$boards" && -n "$sockets" && -n "$cores" && -n "$threads" ]]; then
        topo+=" Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
    fi

    cat >"$CONF" <<EOF
$MARKER (state dir $STATE)
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
NodeName=$host NodeAddr=127.0.0.1 $topo RealMemory=$realmem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    cat >"$ETC/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a world-readable config

    if [[ "$WRITE_ETC" == 1 ]]; then
        mkdir -p /etc/slurm
        if [[ -e "$SYS_CONF" ]] && ! grep -qF "$MARKER" "$SYS_CONF"; then
            log "backing up existing $SYS_CONF to $SYS_CONF.dgrun-bak"
            cp -p "$SYS_CONF" "$SYS_CONF.dgrun-bak"
        fi
        cp "$CONF" "$SYS_CONF.tmp.$$" && mv -f "$SYS_CONF.tmp.$$" "$SYS_CONF"
    fi
}

# ---------------------------------------------------------------- daemons
start_munged() {
    if timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
        log "munged already running (not started by us; will be left alone by 'down')"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key </dev/null
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
            chown munge:munge /etc/munge/munge.key
        fi
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    touch "$LOG/munged.log" && chown munge "$LOG/munged.log"
    mkdir -p "$RUN/munge" && chown munge:munge "$RUN/munge"
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force --pid-file="$(pidfile_of munged)" \
        --log-file="$LOG/munged.log" </dev/null >>"$LOG/munged.log" 2>&1 9>&- \
        || fail_up "munged failed to start"
    wait_for "munged" "$UP_TIMEOUT" bash -c 'munge -n </dev/null | unmunge'
}

# Throwaway test database: no binlog, no durability (fast commits), no native AIO (gVisor).
MARIADB_OPTS=(--skip-log-bin --innodb-use-native-aio=0 --innodb-buffer-pool-size=128M
              --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
              --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0)

db() { timeout 30 mariadb --no-defaults --protocol=socket --socket="$DBSOCK" -uroot "$@" </dev/null; }

start_mariadb() {
    # A pristine datadir (system tables only, no accounting data) is made once per MariaDB
    # version and copied for every 'up': that saves the ~3-5 s of mariadb-install-db.
    local tmpl="$STATE/mysql-template" ver
    ver="$(/usr/sbin/mariadbd --version 2>/dev/null || true)"
    if [[ ! -f "$tmpl/.dgrun-version" || "$(cat "$tmpl/.dgrun-version")" != "$ver" ]]; then
        log "initialising a pristine MariaDB datadir in $tmpl"
        rm -rf "$tmpl" "$tmpl.tmp"; mkdir -p "$tmpl.tmp"
        timeout 120 mariadb-install-db --no-defaults --user=root --datadir="$tmpl.tmp" \
            --auth-root-authentication-method=normal --skip-test-db "${MARIADB_OPTS[@]}" \
            </dev/null >"$LOG/mariadb-install-db.log" 2>&1 \
            || { tail -n 30 "$LOG/mariadb-install-db.log" >&2; fail_up "mariadb-install-db failed"; }
        echo "$ver" >"$tmpl.tmp/.dgrun-version"
        mv "$tmpl.tmp" "$tmpl"
    fi
    log "creating a fresh accounting database in $DBDIR"
    rm -rf "$DBDIR"
    cp -a "$tmpl" "$DBDIR"
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    # Started detached with all stdio redirected, so a caller capturing our output doesn't hang.
    setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DBDIR" \
        --socket="$DBSOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$(pidfile_of mariadbd)" --log-error="$LOG/mariadbd.log" \
        --skip-name-resolve "${MARIADB_OPTS[@]}" \
        </dev/null >>"$LOG/mariadbd.log" 2>&1 9>&- &
    # setsid execs in place (the child is no group leader), so $! is mariadbd itself; record it
    # now so a failed start can still be cleaned up (mariadbd rewrites the same pid later).
    echo "$!" >"$(pidfile_of mariadbd)"
    wait_for "mariadbd" "$UP_TIMEOUT" db -e 'SELECT 1'
    db -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
           CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
           GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
           FLUSH PRIVILEGES;" || fail_up "creating $DB_NAME failed"
}

sacctmgr_q() { timeout 20 sacctmgr "$@" </dev/null; }

start_slurmdbd() {
    log "starting slurmdbd"
    /usr/sbin/slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 9>&- || fail_up "slurmdbd failed to start"
    wait_for "slurmdbd (sacctmgr show cluster)" "$UP_TIMEOUT" sacctmgr_q -n -P show cluster
    log "registering cluster=$CLUSTER account=$ACCOUNT user=root"
    sacctmgr_q -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 || true
    sacctmgr_q -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=dgrun Organization=dgrun \
        >>"$LOG/sacctmgr.log" 2>&1 || true
    sacctmgr_q -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 || true
    sacctmgr_q -n -P show cluster format=cluster | grep -qx "$CLUSTER" \
        || fail_up "cluster $CLUSTER not registered in slurmdbd (see $LOG/sacctmgr.log)"
}

node_state() { timeout 10 sinfo -h -N -o '%T' </dev/null 2>/dev/null | head -n 1; }
node_idle() { [[ "$(node_state)" == idle ]]; }

start_slurm() {
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1 9>&- || fail_up "slurmctld failed to start"
    wait_for "slurmctld (scontrol ping)" "$UP_TIMEOUT" bash -c 'timeout 10 scontrol ping </dev/null | grep -q UP'
    log "starting slurmd"
    /usr/sbin/slurmd -f "$CONF" </dev/null >>"$LOG/slurmd.log" 2>&1 9>&- || fail_up "slurmd failed to start"
    local deadline=$((SECONDS + UP_TIMEOUT)) st
    while ! node_idle; do
        if ((SECONDS >= deadline)); then
            st="$(node_state || true)"
            timeout 10 sinfo -R </dev/null >&2 || true
            fail_up "node not idle after ${UP_TIMEOUT}s (state: ${st:-unknown})"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- stop
stop_pid() {
    local name="$1" pid="$2" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 60; i++)); do       # up to 15 s
        [[ -d "/proc/$pid" ]] || return 0
        # zombie (reparented to a reaper that hasn't collected yet) counts as gone
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 0
        sleep 0.25
    done
    log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

# slurmstepd processes spawned by our slurmd (they inherit SLURM_CONF=$CONF).
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        [[ "$(awk '{print $3}' "$p/stat" 2>/dev/null)" == Z ]] && continue
        if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then echo "${p#/proc/}"; fi
    done
    return 0
}

do_down() {
    local any=0 name pid i
    for name in "${DAEMONS[@]}"; do
        if [[ -n "$(alive_pid "$name")" ]]; then any=1; fi
    done
    if [[ -n "$(alive_pid slurmctld)" ]]; then
        # Cancel remaining jobs so their steps end cleanly before slurmd goes away.
        local jobs
        jobs="$(timeout 10 squeue -h -o %A </dev/null 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling remaining jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs </dev/null >/dev/null 2>&1 || true
        fi
        for ((i = 0; i < 20; i++)); do
            [[ -z "$(timeout 5 squeue -h -t R,CG -o %i </dev/null 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    local rev=(slurmd slurmctld slurmdbd mariadbd munged)
    for name in "${rev[@]}"; do
        pid="$(alive_pid "$name")"
        if [[ -n "$pid" ]]; then
            log "stopping $name (pid $pid)"
            stop_pid "$name" "$pid"
        fi
        if [[ "$name" == slurmd ]]; then
            for pid in $(our_stepds); do
                log "killing leftover slurmstepd (pid $pid)"
                kill -KILL "$pid" 2>/dev/null || true
            done
        fi
    done
    # Drop the accounting DB and the controller state, so a later 'up' restarts at job id 1
    # without stale sacct records carrying the same ids. Logs are kept for post-mortems.
    rm -rf "$DBDIR" "$SPOOL" "$RUN"
    if [[ "$WRITE_ETC" == 1 && -f "$SYS_CONF" ]] && grep -qF "$MARKER (state dir $STATE)" "$SYS_CONF"; then
        rm -f "$SYS_CONF"
        if [[ -f "$SYS_CONF.dgrun-bak" ]]; then mv -f "$SYS_CONF.dgrun-bak" "$SYS_CONF"; fi
    fi
    if ((any)); then log "cluster is down"; else log "cluster was not running"; fi
}

# ---------------------------------------------------------------- up / status
all_alive() {
    local name
    for name in "${DAEMONS[@]}"; do
        [[ "$name" == munged && ! -e "$(pidfile_of munged)" ]] && continue   # external munged
        [[ -n "$(alive_pid "$name")" ]] || return 1
    done
}

any_alive() {
    local name
    for name in "${DAEMONS[@]}"; do
        if [[ -n "$(alive_pid "$name")" ]]; then return 0; fi
    done
    return 1
}

do_up() {
    [[ "$(id -u)" == 0 ]] || die "must run as root"
    if [[ -d "$RUN" ]] && all_alive && node_idle_or_busy; then
        log "cluster already up (state dir $STATE)"
        return 0
    fi
    if [[ -d "$RUN" ]] && any_alive; then
        log "cluster partially up; restarting it from scratch"
        do_down
    fi
    local t0=$SECONDS
    mkdir -p "$STATE"
    install_packages
    # Fresh state every time: controller state, spool and DB are recreated.
    rm -rf "$SPOOL" "$RUN" "$DBDIR" "$LOG.prev"
    [[ -d "$LOG" ]] && mv "$LOG" "$LOG.prev"
    mkdir -p "$ETC" "$LOG" "$RUN" "$SPOOL/ctld" "$SPOOL/d"
    chmod 755 "$STATE" "$RUN"
    (( ${#DBSOCK} < 100 )) || die "state dir path too long for a unix socket: $DBSOCK"
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurm
    log "cluster up in $((SECONDS - t0))s: node $(hostname -s) idle, cluster=$CLUSTER, state dir $STATE"
    if [[ "$WRITE_ETC" != 1 ]]; then
        log "clients need: export SLURM_CONF=$CONF"
    fi
}

node_idle_or_busy() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

do_status() {
    local rc=0 name pid
    for name in "${DAEMONS[@]}"; do
        pid="$(alive_pid "$name")"
        if [[ -n "$pid" ]]; then
            echo "$name: running (pid $pid)"
        elif [[ "$name" == munged ]] && timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
            echo "munged: running (external)"
        else
            echo "$name: not running"; rc=1
        fi
    done
    if ! command -v sinfo >/dev/null; then
        echo "sinfo: not installed"; return 1
    fi
    echo "--- sinfo"
    timeout 10 sinfo </dev/null || rc=1
    node_idle_or_busy || rc=1
    if timeout 15 sacct -n -X -P -S now-1hours --format=JobID </dev/null >/dev/null 2>&1 \
        && sacctmgr_q -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        echo "accounting: OK (slurmdbd answers, cluster $CLUSTER registered)"
    else
        echo "accounting: NOT working"; rc=1
    fi
    if ((rc == 0)); then echo "cluster: UP (state dir $STATE)"; else echo "cluster: DOWN or degraded"; fi
    return "$rc"
}

# Serialise concurrent up/down calls (e.g. several test workers calling 'up' at once).
lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "could not lock $STATE/.lock within 300s"
}

case "${1:-}" in
    up) lock; do_up ;;
    down) lock; do_down ;;
    status) do_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
