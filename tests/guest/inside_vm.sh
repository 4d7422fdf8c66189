#!/bin/sh
# PID 1 of the inside-VM guest, once boot.sh has switched to the root disk.
#
# swap=nbd (the point of it): load the network module, bring up QEMU's user
# network (the host's loopback is 10.0.2.2 from here), then start netswap nbd
# and swap on /dev/nbd0 with deploy/vm's units' own commands -- the functions
# in /etc/netswap/units.sh, generated from the unit files on the host.
# swap=vdb: the same guest swaps on a virtio disk that a frontend on the host
# serves, for comparison.
# Then the hog, and the verdict through QEMU's exit status (isa-debug-exit):
#   16 ok               17 bad kernel cmdline   20 network failed
#   21 a unit or sysctl failed  22 hog failed           23 pswpout too low
#   24 no /proc/vmstat  27 frontend died        28 swap on /dev/vdb failed
# (QEMU exits 2N+1; boot.sh's own failures panic the kernel instead.)

export PATH=/usr/sbin:/usr/bin

report() { # report CODE WORDS...: print the marker line, then end the VM
	code=$1
	shift
	echo "GUEST-RESULT $*"
	hog --exit "$code"
	poweroff -f # only reached without isa-debug-exit
}
fail() { # fail CODE REASON
	report "$1" "fail code=$1 reason=$2"
}

SWAP=nbd
HOG_MIB=600
MIN_PSWPOUT=50000
for arg in $(cat /proc/cmdline); do
	case $arg in
	swap=*) SWAP=${arg#swap=} ;;
	hog_mib=*) HOG_MIB=${arg#hog_mib=} ;;
	min_pswpout=*) MIN_PSWPOUT=${arg#min_pswpout=} ;;
	esac
done
for v in "$HOG_MIB" "$MIN_PSWPOUT"; do
	case $v in
	'' | *[!0-9]*) fail 17 "bad-cmdline hog_mib=$HOG_MIB min_pswpout=$MIN_PSWPOUT" ;;
	esac
done
# deploy/vm/90-netswap.conf, as the VM set-up installs it in /etc/sysctl.d
if [ -f /etc/netswap/sysctl.conf ]; then
	sysctl -p /etc/netswap/sysctl.conf >/dev/null || fail 21 sysctl
fi
echo "GUEST-START kernel=$(uname -r) swap=$SWAP hog_mib=$HOG_MIB min_pswpout=$MIN_PSWPOUT" \
	"min_free_kbytes=$(cat /proc/sys/vm/min_free_kbytes)"
# A task blocked this long is reported (Debian's default is 120 s): a stall
# shows up in the console with its stack.
echo 30 >/proc/sys/kernel/hung_task_timeout_secs

frontend() { # frontend WHEN: what netswap nbd holds, its OOM score, and IO_FLUSHER per thread
	pid=$MAIN_PID_netswap_nbd
	when=$1
	[ -d "/proc/$pid" ] || fail 27 "frontend-gone-$when"
	awk -v when="$when" '/^(VmLck|VmRSS|VmHWM|VmSwap):/ { v = v " " $1 $2 } END { print "FRONTEND " when v }' \
		"/proc/$pid/status"
	threads=0
	flushers=0
	fifo=0
	for task in /proc/"$pid"/task/*; do
		# fields 9 (flags) and 41 (policy) of stat; the name in parentheses before them may hold spaces
		set -- $(sed 's/.*) //' "$task/stat")
		flags=$7
		shift 38
		threads=$((threads + 1))
		# PR_SET_IO_FLUSHER sets PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE (this kernel's values)
		[ $((flags & 0x180000)) -eq $((0x180000)) ] && flushers=$((flushers + 1))
		[ "$1" -eq 1 ] && fifo=$((fifo + 1)) # SCHED_FIFO
	done
	echo "FRONTEND $when oom_score_adj=$(cat "/proc/$pid/oom_score_adj") threads=$threads" \
		"io_flusher_threads=$flushers fifo_threads=$fifo"
}

if [ "$SWAP" = nbd ]; then
	modprobe virtio_net || fail 20 modprobe-virtio_net
	i=0
	while [ ! -e /sys/class/net/eth0 ]; do
		i=$((i + 1))
		[ "$i" -gt 50 ] && fail 20 no-eth0
		sleep 0.1
	done
	ip link set lo up &&
		ip link set eth0 up &&
		ip addr add 10.0.2.15/24 dev eth0 &&
		ip route add default via 10.0.2.2 || fail 20 ip-setup
	. /etc/netswap/units.sh
	start_netswap_nbd || fail 21 netswap-nbd.service
	start_netswap_swap || fail 21 netswap-swap.service
	frontend swapon
	# prints where the frontend is if swap I/O stops for this long
	stallwatch "$MAIN_PID_netswap_nbd" 45 &
else
	mkswap /dev/vdb && swapon /dev/vdb || fail 28 swap-on-vdb
fi
grep . /proc/swaps
free

hog "$HOG_MIB"
rc=$?
[ "$rc" -eq 0 ] || fail 22 "hog-rc-$rc"
[ "$SWAP" = nbd ] && frontend after-hog

pswpout=$(awk '$1 == "pswpout" { print $2 }' /proc/vmstat)
pswpin=$(awk '$1 == "pswpin" { print $2 }' /proc/vmstat)
case $pswpout in
'' | *[!0-9]*) fail 24 no-vmstat ;;
esac
[ "$pswpout" -gt "$MIN_PSWPOUT" ] ||
	fail 23 "pswpout-$pswpout-not-above-$MIN_PSWPOUT"
report 16 "ok pswpout=$pswpout pswpin=$pswpin"
