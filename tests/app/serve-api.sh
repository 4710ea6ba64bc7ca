#!/bin/sh
# Runs the test API under gunicorn as a daemon, the way a service manager would.
#   serve-api.sh start|stop|restart|rollback|start-beside STATE_DIR PORT
# The version it serves comes from STATE_DIR/version (default 1.0); a restart waits for the
# old master to exit (graceful: in-flight requests finish) before starting the new one.
# STATE_DIR/restart-delay, if present, holds extra seconds the restart takes.
# STATE_DIR/running-version is the version started last; a restart keeps the one it replaces
# in STATE_DIR/previous-version, and rollback makes that the version again and restarts.
# Every instance listens with SO_REUSEPORT; start-beside starts one more next to the running
# one (a handover's new version, with a pidfile of its own) and returns once it listens.
# STATE_DIR/graceful-timeout, if present, holds the seconds a stop lets requests in flight
# finish (default 30; 0: a stop cuts them) before the workers are killed.
# STATE_DIR/tls-cert and STATE_DIR/tls-key, if present, make it serve HTTPS with them.
# STATE_DIR/bind, if present, lists the addresses to bind (e.g. "198.18.0.11:8774
# [2001:db8:da::11]:8774"); without it, every address on PORT.
set -eu
action=$1 dir=$2 port=$3
pidfile="$dir/gunicorn.pid"
app_dir=$(cd "$(dirname "$0")" && pwd)

stop() {
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        sleep 0.05
        i=$((i + 1))
        if [ "$i" -ge 600 ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
    done
    rm -f "$pidfile"
}

start() {
    pidfile=${1:-$pidfile}
    if [ -f "$dir/restart-delay" ]; then sleep "$(cat "$dir/restart-delay")"; fi
    version=$(cat "$dir/version" 2>/dev/null || echo 1.0)
    echo "$version" > "$dir/running-version"
    graceful=$(cat "$dir/graceful-timeout" 2>/dev/null || echo 30)
    set --
    for address in $(cat "$dir/bind" 2>/dev/null || echo "[::]:$port"); do
        set -- "$@" --bind "$address"
    done
    if [ -f "$dir/tls-cert" ] && [ -f "$dir/tls-key" ]; then
        set -- "$@" --certfile "$dir/tls-cert" --keyfile "$dir/tls-key"
    fi
    API_VERSION=$version \
    /usr/bin/python3 -m gunicorn --daemon --pid "$pidfile" \
        --worker-class gthread --workers 2 --threads 32 --keep-alive 300 \
        --graceful-timeout "$graceful" --backlog 4096 --reuse-port \
        "$@" --chdir "$app_dir" --log-file "$dir/gunicorn.log" api:app
    # gunicorn --daemon returns before the workers listen; wait for the pidfile.
    i=0
    while [ ! -s "$pidfile" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
}

case "$action" in
    start) start ;;
    start-beside) start "$dir/gunicorn-$(date +%s%N).pid" ;;
    stop) stop ;;
    restart)
        if [ -f "$dir/running-version" ]; then cp "$dir/running-version" "$dir/previous-version"; fi
        stop; start ;;
    rollback)
        if [ -f "$dir/previous-version" ]; then cp "$dir/previous-version" "$dir/version"; fi
        stop; start ;;
    *) echo "usage: $0 start|stop|restart|rollback|start-beside STATE_DIR PORT" >&2; exit 2 ;;
esac
