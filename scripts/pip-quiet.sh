# Sourced by the set-up scripts. `pip_quiet LOG ARGS...` runs `python -m pip ARGS` (the python first on
# PATH: the activated environment) with all its output in LOG, so a set-up that works prints only its own
# lines; when pip fails, its last lines go to stderr and the set-up exits with pip's status.
pip_quiet() {
    local log=$1 status=0
    shift
    python -m pip "$@" >>"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "set-up: pip $* failed (exit $status); last lines of $log:" >&2
        tail -n 25 "$log" >&2
        exit "$status"
    fi
}
