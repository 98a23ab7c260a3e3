#!/usr/bin/env bash
# stratad's NBD server side by side with qemu-storage-daemon's and nbdkit's, in one run:
# the same backend exported by each server in turn, driven by fio's nbd engine (libnbd
# over a Unix socket), 4 KiB randread and randwrite at iodepth 32 with 1 and 2 jobs.
#
#   server  pinned to CPU 0 (taskset -c 0; stratad also gets -m [0] for its one reactor)
#   fio     pinned to CPU 1 (taskset -c 1), one process, each job a thread with its own
#           NBD connection
#
# Backends: `null` (null-co; nbdkit's null plugin), `shm` (a file in /dev/shm: tmpfs, so
# buffered, cache.direct=off; nbdkit's file plugin, or its memory plugin with
# NBDKIT_SHM_PLUGIN=memory), and, only when asked for (-d or BACKENDS), `direct` (an
# O_DIRECT file on a real filesystem; nbdkit's file plugin has no O_DIRECT and uses
# cache=none there, so its row is not the same work).
#
# qemu-storage-daemon runs in its fastest configuration: the export in an iothread and,
# for files, aio=io_uring. null-co gets read-zeroes=off on both servers, which is
# QEMU 10.0's default and keeps reads as data (with read-zeroes=on QEMU's NBD server
# answers a structured read of a zero block with a hole and sends no payload).
#
# Measured per run: IOPS (fio JSON), server CPU per I/O (utime + stime of every thread of
# the server process, /proc/PID/stat before and after fio, over fio's total I/Os) and, for
# reference, fio's own CPU per I/O. Every server starts afresh for every backend. The
# result is one markdown table per backend x workload plus a summary; the exact server
# and fio command lines are printed with it. Exit status 1 if any row failed.
#
# Usage: perf/nbd-bench.sh [-t] [-d] [-r SECONDS] [-n REPEAT] [-s SERVERS] [-b BACKENDS]
#                          [-j JOBS] [-w WORKLOADS] [-o FILE] [-q SECONDS] [-k] [-v]
#   -t            quick smoke run: 2 s per run, 256M devices (RUNTIME / sizes still win if set)
#   -d            add the O_DIRECT file backend (BACKENDS+=direct)
#   -r SECONDS    seconds per fio run                          RUNTIME=10
#   -n REPEAT     rounds (every server restarted); the median IOPS is shown   REPEAT=1
#   -s SERVERS    which servers, in order                      SERVERS="strata qsd nbdkit"
#   -b BACKENDS   which backends                               BACKENDS="null shm"
#   -j JOBS       fio numjobs values                           NUMJOBS="1 2"
#   -w WORKLOADS  fio rw values                                WORKLOADS="randread randwrite"
#   -o FILE       also write the report (markdown) to FILE
#   -q SECONDS    before each run, wait up to SECONDS for the machine to be quiet (under
#                 QUIET_PCT=15 % of one CPU busy over 1 s; 0: don't wait)  QUIET_WAIT=60;
#                 a run during which other work used more than NOISE_MAX=20 % of a CPU
#                 is run again, NOISE_RETRIES=2 times at most, and the quietest counts
#   -k            keep the work directory (server and fio logs, fio JSON)
#   -v            print every command as it runs
# More environment: STRATAD (target/release/stratad), STRATA_ARGS (extra stratad flags,
# e.g. "--poll-mode interrupt"), QSD_ARGS, NBDKIT_ARGS, FIO_ARGS (extra flags for each),
# QSD_IOTHREAD (the --object, default iothread,id=iot0; iothread,id=iot0,poll-max-ns=0
# turns off its adaptive polling, to compare with stratad --poll-mode interrupt),
# NULL_SIZE=1G, FILE_SIZE=1G, DIRECT_SIZE=1G, SHM_DIR=/dev/shm, DIRECT_DIR=/var/tmp,
# SERVER_CPU=0, CLIENT_CPU=1, IODEPTH=32, BS=4k, NBDKIT_SHM_PLUGIN=file|memory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

quick=0 keep=0 verbose=0 report_file='' add_direct=0
while getopts 'tdr:n:s:b:j:w:o:q:kvh' opt; do
    case $opt in
        t) quick=1 ;;
        d) add_direct=1 ;;
        r) RUNTIME=$OPTARG ;;
        n) REPEAT=$OPTARG ;;
        s) SERVERS=$OPTARG ;;
        b) BACKENDS=$OPTARG ;;
        j) NUMJOBS=$OPTARG ;;
        w) WORKLOADS=$OPTARG ;;
        o) report_file=$OPTARG ;;
        q) QUIET_WAIT=$OPTARG ;;
        k) keep=1 ;;
        v) verbose=1 ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if (($#)); then
    echo "nbd-bench: unexpected argument '$1' (see -h)" >&2
    exit 2
fi

if ((quick)); then
    : "${RUNTIME:=2}" "${NULL_SIZE:=256M}" "${FILE_SIZE:=256M}" "${DIRECT_SIZE:=256M}"
fi
RUNTIME=${RUNTIME:-10}
REPEAT=${REPEAT:-1}
SERVERS=${SERVERS:-strata qsd nbdkit}
BACKENDS=${BACKENDS:-null shm}
((add_direct)) && [[ " $BACKENDS " != *" direct "* ]] && BACKENDS+=" direct"
NUMJOBS=${NUMJOBS:-1 2}
WORKLOADS=${WORKLOADS:-randread randwrite}
NULL_SIZE=${NULL_SIZE:-1G}
FILE_SIZE=${FILE_SIZE:-1G}
DIRECT_SIZE=${DIRECT_SIZE:-1G}
SHM_DIR=${SHM_DIR:-/dev/shm}
DIRECT_DIR=${DIRECT_DIR:-/var/tmp}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
IODEPTH=${IODEPTH:-32}
BS=${BS:-4k}
STRATAD=${STRATAD:-target/release/stratad}
STRATA_ARGS=${STRATA_ARGS:-}
QSD_ARGS=${QSD_ARGS:-}
QSD_IOTHREAD=${QSD_IOTHREAD:-iothread,id=iot0}
NBDKIT_ARGS=${NBDKIT_ARGS:-}
FIO_ARGS=${FIO_ARGS:-}
NBDKIT_SHM_PLUGIN=${NBDKIT_SHM_PLUGIN:-file}
READY_TIMEOUT=${READY_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-15}
QUIET_WAIT=${QUIET_WAIT:-60}
QUIET_PCT=${QUIET_PCT:-15}
NOISE_MAX=${NOISE_MAX:-20}
NOISE_RETRIES=${NOISE_RETRIES:-2}

die() {
    echo "nbd-bench: $*" >&2
    exit 2
}
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "runtime must be whole seconds, not '$RUNTIME'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "repeat must be a positive count, not '$REPEAT'"
[[ $QUIET_WAIT =~ ^[0-9]+$ ]] || die "quiet wait must be whole seconds, not '$QUIET_WAIT'"
[[ $NOISE_MAX =~ ^[0-9]+$ && $NOISE_RETRIES =~ ^[0-9]+$ ]] || die "NOISE_MAX and NOISE_RETRIES are whole numbers"
for s in $SERVERS; do
    [[ $s == @(strata|qsd|nbdkit) ]] || die "unknown server '$s' (strata, qsd, nbdkit)"
done
for b in $BACKENDS; do
    [[ $b == @(null|shm|direct) ]] || die "unknown backend '$b' (null, shm, direct)"
done
[[ $NBDKIT_SHM_PLUGIN == @(file|memory) ]] || die "NBDKIT_SHM_PLUGIN is file or memory"
need=(fio jq taskset timeout numfmt dd)
[[ " $SERVERS " == *" qsd "* ]] && need+=(qemu-storage-daemon)
[[ " $SERVERS " == *" nbdkit "* ]] && need+=(nbdkit)
for tool in "${need[@]}"; do
    command -v "$tool" >/dev/null ||
        die "$tool is missing (scripts/install-deps.sh, or apt-get install fio jq qemu-system-common nbdkit)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (needs fio built with libnbd)"
for cpu in "$SERVER_CPU" "$CLIENT_CPU"; do
    taskset -c "$cpu" true 2>/dev/null || die "cannot pin to CPU $cpu"
done
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || echo "nbd-bench: warning: server and fio share CPU $SERVER_CPU" >&2

work=$(mktemp -d /tmp/nbd-bench.XXXXXX) # short: Unix socket paths are limited to 108 bytes
shm_img="$SHM_DIR/nbd-bench.$$.img"
direct_img="$DIRECT_DIR/nbd-bench.$$.img"
server_pid=''
results="$work/results.tsv"
commands="$work/commands.md"
: >"$results"
: >"$commands"

# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -f "$shm_img" "$direct_img"
    if ((keep)); then
        echo "nbd-bench: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { printf '%s\n' "$*" >&2; }
# A command line to copy: words quoted only where the shell needs it.
quoted() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$a")
        else
            out+=("'${a//\'/\'\\\'\'}'")
        fi
    done
    printf '%s\n' "${out[*]}"
}

# utime + stime of the whole thread group, in clock ticks (fields 14 and 15 of
# /proc/PID/stat; counted after the ")" closing comm, which may hold spaces).
ticks() {
    local stat f
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    stat=${stat##*) }
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}
hz=$(getconf CLK_TCK)

# Busy ticks of the whole machine (user, nice, system, irq, softirq, steal): what is
# left after the server's and fio's share is the noise from everything else.
machine_ticks() {
    local user nice system irq softirq steal
    read -r _ user nice system _ _ irq softirq steal _ </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# The VM is shared (builds, tests): wait until the last second was quiet apart from the
# server $1 (which may be polling), for at most QUIET_WAIT s. Returns 1 if it never was.
wait_quiet() {
    local t0=$SECONDS m0 m1 s0 s1
    ((QUIET_WAIT > 0)) || return 0
    while :; do
        m0=$(machine_ticks) s0=$(ticks "$1") || return 0
        sleep 1
        m1=$(machine_ticks) s1=$(ticks "$1") || return 0
        (((m1 - m0 - (s1 - s0)) * 100 <= QUIET_PCT * hz)) && return 0
        ((SECONDS - t0 < QUIET_WAIT)) || return 1
    done
}

bytes() { numfmt --from=iec "$1" 2>/dev/null || die "bad size '$1' (e.g. 1G, 256M)"; }
null_bytes=$(bytes "$NULL_SIZE")
file_bytes=$(bytes "$FILE_SIZE")
direct_bytes=$(bytes "$DIRECT_SIZE")
((file_bytes % (1 << 20) == 0 && direct_bytes % (1 << 20) == 0)) || die "file sizes must be whole MiB"

# ---------------------------------------------------------------- servers

# The command line of server $1 for backend $2, into the array `cmd`; `label` names the
# row; `banner` is a line the server prints when ready (empty: wait for the socket).
server_cmd() {
    local server=$1 backend=$2 sock=$3 dir=$4 node
    case $backend in
        null) node="driver=null-co,node-name=n0,size=$null_bytes,read-zeroes=off" ;;
        shm) node="driver=file,node-name=n0,filename=$shm_img,cache.direct=off,aio=io_uring" ;;
        direct) node="driver=file,node-name=n0,filename=$direct_img,cache.direct=on,aio=io_uring" ;;
    esac
    banner=''
    case $server in
        strata)
            label=strata
            [[ -n $STRATA_ARGS ]] && label+=" ($STRATA_ARGS)"
            banner=listening
            # shellcheck disable=SC2206,SC2054 # STRATA_ARGS is a list of flags; commas are keyval
            cmd=(taskset -c "$SERVER_CPU" "$STRATAD" --rpc-socket "$dir/rpc.sock"
                -m "[$SERVER_CPU]" $STRATA_ARGS
                --blockdev "$node"
                --nbd-server "addr.type=unix,addr.path=$sock"
                --export type=nbd,id=e0,node-name=n0,name=disk,writable=on)
            ;;
        qsd)
            label=qsd
            [[ $QSD_IOTHREAD != iothread,id=iot0 ]] && label+=" (${QSD_IOTHREAD#iothread,id=iot0,})"
            # shellcheck disable=SC2206,SC2054
            cmd=(taskset -c "$SERVER_CPU" qemu-storage-daemon
                --object "$QSD_IOTHREAD" $QSD_ARGS
                --blockdev "$node"
                --nbd-server "addr.type=unix,addr.path=$sock"
                --export type=nbd,id=e0,node-name=n0,name=disk,writable=on,iothread=iot0)
            ;;
        nbdkit)
            local plugin
            case $backend in
                null) plugin=(null "size=$null_bytes") ;;
                shm)
                    if [[ $NBDKIT_SHM_PLUGIN == memory ]]; then
                        plugin=(memory "size=$file_bytes")
                    else
                        plugin=(file "file=$shm_img")
                    fi
                    ;;
                direct) plugin=(file "file=$direct_img" cache=none) ;;
            esac
            label="nbdkit ${plugin[0]}"
            [[ $backend == direct ]] && label+=" (cache=none, not O_DIRECT)"
            # shellcheck disable=SC2206
            cmd=(taskset -c "$SERVER_CPU" nbdkit --foreground --exit-with-parent
                --unix "$sock" --exportname disk $NBDKIT_ARGS "${plugin[@]}")
            ;;
    esac
}

# Start server $1 on backend $2 for round $3; sets server_pid, server_log, uri. On failure
# the reason is at the end of server_log, the server is stopped and it returns 1.
start_server() {
    local server=$1 backend=$2 rep=$3 dir="$work/$2-$1-r$3" t0
    mkdir -p "$dir"
    local sock="$dir/nbd.sock"
    server_log="$dir/server.log"
    uri="nbd+unix:///disk?socket=$sock"
    server_cmd "$server" "$backend" "$sock" "$dir"
    # shellcheck disable=SC2016 # markdown backticks
    ((rep == 1)) && printf -- '- %s, %s: `%s`\n' "$label" "$backend" "$(quoted "${cmd[@]}")" >>"$commands"
    if [[ $server == strata && ! -x $STRATAD ]]; then
        echo "$STRATAD is missing (cargo build --release -p strata-rpc)" >"$server_log"
        return 1
    fi
    ((verbose)) && log "+ $(quoted "${cmd[@]}") >$server_log 2>&1 &"
    "${cmd[@]}" </dev/null >"$server_log" 2>&1 &
    server_pid=$!
    t0=$SECONDS
    # Ready: the banner (if any) is out, the socket exists and fio's nbd engine connects
    # and reads one block. (Not nbdinfo: it waits for the server to close the connection
    # after NBD_CMD_DISC, which would make readiness depend on that too.)
    local state="no banner '$banner' yet" probe_rc
    while ((SECONDS - t0 < READY_TIMEOUT)); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            local rc=0
            wait "$server_pid" || rc=$?
            server_pid=''
            echo "exited with status $rc before it was ready" >>"$server_log"
            return 1
        fi
        if [[ -n $banner ]] && ! grep -qs "$banner" "$server_log"; then
            state="no banner '$banner' yet"
        elif [[ ! -S $sock ]]; then
            state="no socket $sock"
        else
            probe_rc=0
            timeout -k 2 10 taskset -c "$CLIENT_CPU" fio --name=probe --ioengine=nbd "--uri=$uri" \
                --rw=read --bs=4k --size=4k --output-format=json "--output=$dir/probe.json" \
                >"$dir/probe.log" 2>&1 || probe_rc=$?
            ((probe_rc == 0)) && return 0
            if ((probe_rc == 124 || probe_rc == 137)); then
                state="a one-block fio read of $uri got no answer in 10 s"
            else
                state="a one-block fio read of $uri failed: $(grep -v '^$' "$dir/probe.log" | tail -n1)"
            fi
        fi
        sleep 0.1
    done
    echo "not ready after ${READY_TIMEOUT} s: $state" >>"$server_log"
    stop_server || true
    return 1
}

# SIGTERM, then SIGKILL after STOP_TIMEOUT s. An unclean exit returns 1 and says how in
# stop_note.
stop_server() {
    stop_note=''
    [[ -n $server_pid ]] || return 0
    local pid=$server_pid rc=0 t0=$SECONDS note=''
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < STOP_TIMEOUT)); do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        note="did not exit ${STOP_TIMEOUT} s after SIGTERM; killed"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    server_pid=''
    if [[ -z $note ]] && ((rc > 128)); then
        note="ended by signal $((rc - 128)) (status $rc); SIGTERM was sent"
    elif [[ -z $note ]] && ((rc != 0)); then
        note="exited with status $rc after SIGTERM"
    fi
    stop_note=$note
    [[ -z $note ]]
}

# ---------------------------------------------------------------- fio

# One fio run (attempt $6) against $uri: the result row in `row`, the CPU everything
# else used during it (% of one CPU) in `row_other`; returns 1 if the run failed.
run_fio() {
    local backend=$1 server=$2 rw=$3 jobs=$4 rep=$5 attempt=$6
    local base="$work/$backend-$server-r$rep/$rw-j$jobs-a$attempt"
    # shellcheck disable=SC2206 # FIO_ARGS is a list of flags
    local fio=(taskset -c "$CLIENT_CPU" fio --name=nbd --ioengine=nbd "--uri=$uri"
        "--rw=$rw" "--bs=$BS" "--iodepth=$IODEPTH" "--numjobs=$jobs" --thread
        --group_reporting --time_based "--runtime=$RUNTIME" --norandommap
        --output-format=json "--output=$base.json" $FIO_ARGS)
    quoted "${fio[@]}" >>"$work/fio-commands.txt"
    if [[ $rw == "${WORKLOADS%% *}" && $jobs == "${NUMJOBS%% *}" && $rep == 1 && $attempt == 1 ]]; then
        # One line per server and backend: the exact command of the first run, with the
        # values that vary between runs shown as {a,b}.
        local line rws=$WORKLOADS jobss=$NUMJOBS
        [[ $rws == *' '* ]] && rws="{${rws// /,}}"
        [[ $jobss == *' '* ]] && jobss="{${jobss// /,}}"
        line=$(quoted "${fio[@]}")
        line=${line/--rw=$rw /--rw=$rws }
        line=${line/--numjobs=$jobs /--numjobs=$jobss }
        # shellcheck disable=SC2016 # markdown backticks
        printf -- '  - fio: `%s`\n' "$line" >>"$commands"
    fi
    local before after rc=0 status=ok ucpu scpu m0 m1 t0 t1
    wait_quiet "$server_pid" || log "  (the machine was not quiet within ${QUIET_WAIT} s; running anyway)"
    ((verbose)) && log "+ $(quoted "${fio[@]}")"
    local TIMEFORMAT='%3U %3S'
    before=$(ticks "$server_pid") || before=''
    m0=$(machine_ticks) t0=$EPOCHREALTIME
    { time timeout -k 5 $((RUNTIME + 60)) "${fio[@]}" >"$base.out" 2>&1 || rc=$?; } 2>"$base.time"
    m1=$(machine_ticks) t1=$EPOCHREALTIME
    after=$(ticks "$server_pid") || after=''
    read -r ucpu scpu <"$base.time"
    if ! kill -0 "$server_pid" 2>/dev/null || [[ -z $before || -z $after ]]; then
        status="server died during the run (fio exit $rc)"
    elif ((rc == 124 || rc == 137)); then
        status="fio timed out after $((RUNTIME + 60)) s (server hung?)"
    elif ((rc != 0)); then
        status="fio exit $rc: $(grep -v '^$' "$base.out" | tail -n1)"
    fi
    local ios=0 iops=0 err=0
    if [[ $status != ok ]]; then
        :
    elif [[ -s $base.json ]]; then
        # fio may put warnings before the JSON document.
        read -r ios iops err < <(sed -n '/^{/,$p' "$base.json" | jq -r '.jobs[0] |
            [(.read.total_ios + .write.total_ios), (.read.iops + .write.iops), .error] | @tsv') ||
            status="fio JSON unreadable"
    else
        status="fio wrote no JSON"
    fi
    [[ $status == ok && $err != 0 ]] && status="fio job error $err"
    [[ $status == ok && $ios == 0 ]] && status="no I/O completed"
    local srv_cpu=''
    [[ -n $before && -n $after ]] && srv_cpu=$(awk -v d=$((after - before)) -v hz="$hz" 'BEGIN { printf "%.3f", d / hz }')
    local fio_cpu other
    fio_cpu=$(awk -v u="$ucpu" -v s="$scpu" 'BEGIN { print u + s }')
    # Everything else's CPU during the run, in % of one CPU.
    other=$(awk -v m=$((m1 - m0)) -v hz="$hz" -v s="${srv_cpu:-0}" -v f="$fio_cpu" -v t0="$t0" -v t1="$t1" \
        'BEGIN { o = (m / hz - s - f) / (t1 - t0) * 100; printf "%.0f", o < 0 ? 0 : o }')
    row=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$backend" "$rw" "$jobs" "$label" \
        "$rep" "$iops" "$ios" "${srv_cpu:-0}" "$fio_cpu" "${status//$'\t'/ }" "$other")
    row_other=$other
    log "  $(printf '%-24s %-9s j%s #%s' "$label" "$rw" "$jobs" "$rep")  $(awk -v i="$iops" -v n="$ios" -v c="${srv_cpu:-0}" -v st="$status" -v o="$other" \
        'BEGIN { if (st != "ok") print "ERROR: " st; else printf "%9.0f IOPS  %6.2f us/IO server CPU  (other CPU %d %%)\n", i, n ? c * 1e6 / n : 0, o }')"
    [[ $status == ok ]]
}

# A row for every cell a server could not run.
fail_rows() {
    local backend=$1 rep=$2 why=$3 rw jobs
    for rw in $WORKLOADS; do
        for jobs in $NUMJOBS; do
            printf '%s\t%s\t%s\t%s\t%s\t0\t0\t0\t0\t%s\t0\n' "$backend" "$rw" "$jobs" "$label" \
                "$rep" "${why//$'\t'/ }" >>"$results"
        done
    done
}

# ---------------------------------------------------------------- the run

prepare_backend() {
    case $1 in
        shm)
            # Written, not fallocated: tmpfs counts fallocated pages as holes until they
            # are written, so SEEK_DATA scans to the end of the file (about 1 ms per
            # 256 MiB) and QEMU's NBD server, which asks for the block status of every
            # structured read, would answer each read with a hole after that scan.
            rm -f "$shm_img"
            dd if=/dev/zero of="$shm_img" bs=1M count=$((file_bytes >> 20)) status=none
            ;;
        direct)
            # Written, not fallocated: reads of unwritten extents never reach the disk.
            if [[ ! -s $direct_img ]]; then
                log "writing $DIRECT_SIZE to $direct_img"
                dd if=/dev/zero of="$direct_img" bs=1M count=$((direct_bytes >> 20)) oflag=direct status=none
            fi
            ;;
    esac
}

stratad_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && stratad_rev+="+dirty"
if [[ " $SERVERS " == *" strata "* && -x $STRATAD ]]; then
    # Run a copy: a rebuild during the run must not change the binary under test.
    stratad_rev+=", $STRATAD built $(date -r "$STRATAD" '+%F %T'), run from a copy taken at start"
    cp "$STRATAD" "$work/stratad"
    STRATAD=$work/stratad
fi
log "nbd-bench: servers [$SERVERS], backends [$BACKENDS], $WORKLOADS x numjobs [$NUMJOBS], ${RUNTIME} s x $REPEAT"
failed=0
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# Repeats are whole rounds (every server restarted), so a burst of noise on the VM hits
# one round of every server rather than every run of one server.
for ((rep = 1; rep <= REPEAT; rep++)); do
    for backend in $BACKENDS; do
        log "== $backend$( ((REPEAT > 1)) && echo ", round $rep of $REPEAT")"
        for server in $SERVERS; do
            prepare_backend "$backend"
            if ! start_server "$server" "$backend" "$rep"; then
                why="server did not start: $(grep -v -e '^$' -e '^Usage:' -e '^For more information' "$server_log" | tail -n3 | paste -sd';' | sed 's/;/; /g')"
                log "  $label: $why"
                fail_rows "$backend" "$rep" "$why"
                failed=1
                continue
            fi
            for rw in $WORKLOADS; do
                for jobs in $NUMJOBS; do
                    if ! kill -0 "$server_pid" 2>/dev/null; then
                        printf '%s\t%s\t%s\t%s\t%s\t0\t0\t0\t0\t%s\t0\n' "$backend" "$rw" "$jobs" "$label" "$rep" \
                            "server is gone: $(grep -v '^$' "$server_log" | tail -n2 | paste -sd';' | sed 's/;/; /g;s/\t/ /g')" >>"$results"
                        failed=1
                        continue
                    fi
                    # A run that shared the machine with more than NOISE_MAX % of a CPU
                    # of other work is run again (NOISE_RETRIES times at most); the
                    # quietest attempt counts.
                    best='' best_other=''
                    for ((attempt = 1; attempt <= NOISE_RETRIES + 1; attempt++)); do
                        if ! run_fio "$backend" "$server" "$rw" "$jobs" "$rep" "$attempt"; then
                            best=$row
                            failed=1
                            break
                        fi
                        if [[ -z $best_other ]] || ((row_other < best_other)); then
                            best=$row best_other=$row_other
                        fi
                        ((row_other <= NOISE_MAX)) && break
                        ((attempt <= NOISE_RETRIES)) && log "  (other CPU ${row_other} % > ${NOISE_MAX} %: again)"
                    done
                    printf '%s\n' "$best" >>"$results"
                done
            done
            if ! stop_server; then
                log "  $label: $stop_note"
                printf -- '- note: %s on %s, round %s: %s\n' "$label" "$backend" "$rep" "$stop_note" >>"$commands"
                failed=1
            fi
        done
    done
done

# ---------------------------------------------------------------- the report

report() {
    echo "## NBD: stratad vs qemu-storage-daemon vs nbdkit"
    echo
    echo "$(date '+%F %T'), $(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))."
    echo "fio $(fio --version | sed 's/^fio-//') (nbd engine) on CPU $CLIENT_CPU; servers on CPU $SERVER_CPU."
    echo "stratad $stratad_rev; $(qemu-storage-daemon --version 2>/dev/null | head -n1 || true); $(nbdkit --version 2>/dev/null || true)."
    echo "$BS $WORKLOADS, iodepth $IODEPTH, numjobs $NUMJOBS; ${RUNTIME} s per run; $REPEAT round(s), each server restarted per round and backend (median IOPS shown)."
    echo "Load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "null: $NULL_SIZE null-co (read-zeroes=off) / nbdkit null; shm: $FILE_SIZE file in $SHM_DIR; direct: $DIRECT_SIZE O_DIRECT file in $DIRECT_DIR."
    echo "CPU µs/IO = (utime + stime of all server threads across the fio run) / fio's total I/Os; fio µs/IO likewise for fio."
    echo "server CPU % = IOPS x CPU µs/IO: how busy the server kept its core (polling counts: near 100 % means the server spent its idle time spinning, or was the bottleneck)."
    echo "other CPU % = the machine's busy time (with steal) during the run minus the server's and fio's, in % of one CPU: noise from everything else."
    ((QUIET_WAIT > 0)) && echo "Each run waited (up to ${QUIET_WAIT} s) for a second with under ${QUIET_PCT} % of one CPU busy outside the server."
    echo "A run with other CPU % above ${NOISE_MAX} was repeated up to ${NOISE_RETRIES} times; the quietest attempt is shown. IOPS marked * still had more: trust CPU µs/IO there."
    echo
    # Median by IOPS per (backend, rw, jobs, server), in the order the rows were run.
    awk -F'\t' '
        function ratio(a, b) { return (a > 0 && b > 0) ? sprintf("%.2f", a / b) : "-" }
        {
            key = $1 SUBSEP $2 SUBSEP $3 SUBSEP $4
            if (!(key in n)) { order[++nk] = key; cell = $1 SUBSEP $2 SUBSEP $3
                if (!(cell in seen)) { seen[cell] = 1; cells[++nc] = cell }
                servers[cell] = servers[cell] (servers[cell] == "" ? "" : "\t") $4 }
            i = ++n[key]; iops[key, i] = $6 + 0; ios[key, i] = $7 + 0
            cpu[key, i] = $8 + 0; fcpu[key, i] = $9 + 0; st[key, i] = $10
            gsub(/\|/, "/", st[key, i]) # a message must not split the table row
            oth[key, i] = $11 + 0
        }
        END {
            for (k = 1; k <= nk; k++) {
                key = order[k]; m = 0
                for (i = 1; i <= n[key]; i++) if (st[key, i] == "ok") ok[++m] = i
                if (m == 0) { bad[key] = st[key, 1]; continue }
                # insertion sort of the ok runs by IOPS; take the lower median
                for (a = 2; a <= m; a++) { v = ok[a]; b = a - 1
                    while (b >= 1 && iops[key, ok[b]] > iops[key, v]) { ok[b + 1] = ok[b]; b-- }
                    ok[b + 1] = v }
                i = ok[int((m + 1) / 2)]
                I[key] = iops[key, i]
                C[key] = ios[key, i] ? cpu[key, i] * 1e6 / ios[key, i] : 0
                F[key] = ios[key, i] ? fcpu[key, i] * 1e6 / ios[key, i] : 0
                O[key] = oth[key, i]
                if (m < n[key]) note[key] = sprintf(" (%d of %d runs failed)", n[key] - m, n[key])
            }
            name["null"] = "null-co"; name["shm"] = "file in tmpfs"; name["direct"] = "O_DIRECT file"
            for (c = 1; c <= nc; c++) {
                split(cells[c], p, SUBSEP); ns = split(servers[cells[c]], s, "\t")
                q = ""; for (j = 1; j <= ns; j++) if (s[j] ~ /^qsd/) q = cells[c] SUBSEP s[j]
                printf "### %s, %s %s, iodepth %s, numjobs %s\n\n", name[p[1]], p[2], bs, qd, p[3]
                print "| server | IOPS | CPU µs/IO | IOPS ÷ QSD | CPU/IO ÷ QSD | server CPU % | fio µs/IO | other CPU % |"
                print "|---|---:|---:|---:|---:|---:|---:|---:|"
                for (j = 1; j <= ns; j++) {
                    key = cells[c] SUBSEP s[j]
                    if (key in bad) { printf "| %s | ERROR: %s | | | | | | |\n", s[j], bad[key]; continue }
                    printf "| %s%s | %.0f%s | %.2f | %s | %s | %.0f | %.2f | %d |\n", s[j], note[key], I[key],
                        (O[key] > noise) ? " *" : "", C[key],
                        (q != "" && (q in I)) ? ratio(I[key], I[q]) : "-",
                        (q != "" && (q in I)) ? ratio(C[key], C[q]) : "-", I[key] * C[key] / 1e4, F[key], O[key]
                }
                print ""
            }
            # Summary: Strata against QSD per cell.
            print "### Summary: Strata ÷ QSD"
            print ""
            print "| backend | workload | numjobs | strata IOPS | qsd IOPS | IOPS ratio | strata CPU µs/IO | qsd CPU µs/IO | CPU/IO ratio | nbdkit IOPS |"
            print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            for (c = 1; c <= nc; c++) {
                split(cells[c], p, SUBSEP); ns = split(servers[cells[c]], s, "\t")
                st_k = ""; q = ""; nb = ""
                for (j = 1; j <= ns; j++) {
                    if (s[j] ~ /^qsd/) q = cells[c] SUBSEP s[j]
                    if (s[j] ~ /^strata/) st_k = cells[c] SUBSEP s[j]
                    if (s[j] ~ /^nbdkit/) nb = cells[c] SUBSEP s[j]
                }
                printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name[p[1]], p[2], p[3],
                    (st_k in I) ? sprintf("%.0f%s", I[st_k], (O[st_k] > noise) ? " *" : "") : (st_k == "" ? "-" : "ERROR"),
                    (q in I) ? sprintf("%.0f%s", I[q], (O[q] > noise) ? " *" : "") : ((q in bad) ? "ERROR" : "-"),
                    ((st_k in I) && (q in I)) ? ratio(I[st_k], I[q]) : "-",
                    (st_k in I) ? sprintf("%.2f", C[st_k]) : "-",
                    (q in I) ? sprintf("%.2f", C[q]) : "-",
                    ((st_k in I) && (q in I)) ? ratio(C[st_k], C[q]) : "-",
                    (nb in I) ? sprintf("%.0f%s", I[nb], (O[nb] > noise) ? " *" : "") : ((nb in bad) ? "ERROR" : "-")
            }
        }' bs="$BS" qd="$IODEPTH" noise="$NOISE_MAX" "$results"
    echo
    echo "### Commands"
    echo
    cat "$commands"
}

echo
if [[ -n $report_file ]]; then
    report | tee "$report_file"
else
    report
fi
exit "$failed"
