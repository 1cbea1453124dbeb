#!/bin/bash
# alloc_oracle.sh - run alloc_oracle.bt and print ORACLE lines.
#   alloc_oracle.sh PID          trace PID and its descendants until it exits (or SIGINT)
#   alloc_oracle.sh 0            trace every process (but bpftrace) until SIGINT
#   alloc_oracle.sh -- CMD ARGS  run CMD (bpftrace -c) and trace its process tree
# The command runs in the foreground terminal; its exit status is not ours.
# Env: ORACLE_MAP_KEYS (default 1048576) = BPFTRACE_MAP_KEYS_MAX,
#      ORACLE_RAW=FILE keeps bpftrace's raw output there.
# Output (stdout): ORACLE, ORACLE_PROC, ORACLE_TOTAL, ORACLE_WARN lines.
set -u
here=$(cd "$(dirname "$0")" && pwd)
bt=$here/alloc_oracle.bt
export BPFTRACE_MAP_KEYS_MAX=${ORACLE_MAP_KEYS:-1048576}
raw=${ORACLE_RAW:-$(mktemp /tmp/alloc_oracle.XXXXXX)}
err=$raw.err
stopdir=$(mktemp -d /tmp/alloc_oracle_stop.XXXXXX)
stopper=$stopdir/oracle_stop; ln -sf /bin/true "$stopper"
# On SIGINT/SIGTERM: exec "oracle_stop" (a /bin/true symlink); the script sees
# its exec, stops counting, and exits. bpftrace runs in its own session so a
# terminal ^C reaches only us (and the traced command).
trap '"$stopper"' INT TERM

if [ "${1:-}" = "--" ]; then
	shift
	[ $# -gt 0 ] || { echo "usage: $0 -- CMD ARGS..." >&2; exit 2; }
	# The gate: a foreground subshell that sends its pid, waits on a fifo, then
	# execs CMD (same pid). Its (bash) allocations before the exec are not
	# counted ($2 = 1). A background helper starts bpftrace on the gate's pid
	# and opens the gate once bpftrace's BEGIN has run (all probes attached).
	pidfifo=$raw.pid; gofifo=$raw.go; mkfifo "$pidfifo" "$gofifo"
	(
		read -r gate <"$pidfifo"
		setsid bpftrace -k -B none "$bt" "$gate" 1 >"$raw" 2>"$err" &
		b=$!
		until grep -q '^ORACLE_START' "$raw" 2>/dev/null || ! kill -0 "$b" 2>/dev/null; do
			sleep 0.05
		done
		echo go >"$gofifo"
		wait "$b"; r=$?
		while kill -0 "$b" 2>/dev/null; do wait "$b"; r=$?; done
		echo "$r" >"$raw.rc"
	) &
	helper=$!
	( echo "$BASHPID" >"$pidfifo"; read -r _ <"$gofifo"; exec "$@" )
	while kill -0 "$helper" 2>/dev/null; do wait "$helper"; done
	rc=$(cat "$raw.rc" 2>/dev/null || echo 255)
	rm -f "$pidfifo" "$gofifo" "$raw.rc"
else
	setsid bpftrace -k -B none "$bt" "${1:?usage: $0 PID|0|-- CMD...}" 0 >"$raw" 2>"$err" &
	bt_pid=$!
	wait "$bt_pid"; rc=$?
	# after SIGINT, wait returns early (>128): wait again for END's output
	while kill -0 "$bt_pid" 2>/dev/null; do wait "$bt_pid"; rc=$?; done
fi

awk -v rc="$rc" -v errf="$err" '
function name(f) {
	return f==1?"malloc":f==2?"calloc":f==3?"realloc":f==4?"reallocarray":f==5?"posix_memalign":\
	       f==6?"aligned_alloc=memalign":f==7?"valloc":f==8?"pvalloc":f==9?"free":"f" f
}
/^ORACLE_START/ { print; next }
/^ORACLE_DUMP_BEGIN/ { indump=1; next }
/^ORACLE_DUMP_END/ { indump=0; done=1; next }
indump && /^@/ {
	m = $0; sub(/^@/, "", m)
	mapname = m; sub(/\[.*/, "", mapname)
	k = m; sub(/^[^[]*\[/, "", k); sub(/\]: .*/, "", k); gsub(/ /, "", k)
	v = m; sub(/^[^]]*\]: /, "", v)
	if (mapname == "comm") { gsub(/[ \t]/, "_", v); comm[k] = v; pids[k]=1; next }
	split(k, kk, ",")
	pids[kk[1]] = 1
	if (mapname ~ /^(calls|allocs|bytes|frees|failed)$/) { F[mapname, kk[1], kk[2]] = v; fn[kk[1], kk[2]] = 1; next }
	if (mapname ~ /^g_/) { G[mapname, kk[1], kk[2]] = v; gens[kk[1], kk[2]] = 1; next }
	P[mapname, kk[1]] = v
	next
}
!indump && /map_delete_elem: No such file/ { next }   # benign (-k)
!indump && /(Lost [0-9]+ events|[Ff]ailed|error|ERROR|WARNING|full)/ { warn[++nw] = $0 }
END {
	while ((getline line < errf) > 0)
		if (line !~ /RLIMIT_MEMLOCK|available_filter_functions|map_delete_elem: No such file/ && line != "") warn[++nw] = line
	if (!done) warn[++nw] = "no map dump seen (bpftrace rc=" rc ")"
	n = split("allocs bytes frees known_frees freed_bytes live_blocks live_bytes unknown_frees missed_frees exec_dropped_blocks exec_dropped_bytes execs exited nested orphan_returns stale_inflight", cols, " ")
	for (p in pids) {
		c = (p in comm) ? comm[p] : "?"
		for (f = 1; f <= 9; f++) if ((p, f) in fn) {
			printf "ORACLE pid=%s comm=%s func=%s calls=%d allocs=%d bytes=%d frees=%d failed=%d\n", p, c, name(f), \
				F["calls",p,f], F["allocs",p,f], F["bytes",p,f], F["frees",p,f], F["failed",p,f]
			A[p,"allocs"] += F["allocs",p,f]; A[p,"bytes"] += F["bytes",p,f]; A[p,"frees"] += F["frees",p,f]
		}
		lastg = P["gen", p] + 0
		for (pg in gens) {
			split(pg, q, SUBSEP); if (q[1] != p) continue
			g = q[2]
			lb = G["g_allocs",p,g] - G["g_frees",p,g] - G["g_mfrees",p,g]; lB = G["g_abytes",p,g] - G["g_fbytes",p,g] - G["g_mbytes",p,g]
			if (g + 0 == lastg) { A[p,"live_blocks"] += lb; A[p,"live_bytes"] += lB }
			else { A[p,"exec_dropped_blocks"] += lb; A[p,"exec_dropped_bytes"] += lB }
			A[p,"known_frees"] += G["g_frees",p,g]; A[p,"freed_bytes"] += G["g_fbytes",p,g]
		}
		A[p,"unknown_frees"] = P["unknown",p]; A[p,"missed_frees"] = P["missed_free",p]
		A[p,"execs"] = P["execs",p]; A[p,"exited"] = P["exited",p]; A[p,"nested"] = P["nested",p]
		A[p,"orphan_returns"] = P["orphan_ret",p]; A[p,"stale_inflight"] = P["stale",p]
		s = sprintf("ORACLE_PROC pid=%s comm=%s", p, c)
		for (i = 1; i <= n; i++) { s = s sprintf(" %s=%d", cols[i], A[p,cols[i]]); T[cols[i]] += A[p,cols[i]] }
		print s
	}
	s = "ORACLE_TOTAL processes=" length(pids)
	for (i = 1; i <= n; i++) if (cols[i] != "exited") s = s sprintf(" %s=%d", cols[i], T[cols[i]])
	print s
	for (i = 1; i <= nw; i++) print "ORACLE_WARN " warn[i]
	printf "ORACLE_WARNINGS %d\n", nw
}' "$raw"
[ -n "${ORACLE_RAW:-}" ] || rm -f "$raw" "$err"
rm -rf "$stopdir"
exit $rc
