#!/bin/sh
# /init of the swap-test initramfs (busybox sh). Puts swap on the virtio disk
# /dev/vda (an NBD export on the host), runs /hog to force heavy swapping, and
# hands the verdict to the host as QEMU's exit status via isa-debug-exit.
#
# Guest codes (QEMU exits 2N+1). Success is 16, not 0: QEMU's own failures
# (e.g. it cannot reach the NBD server) also exit 1, which guest code 0 would
# be indistinguishable from.
#   16 ok               17 bad kernel cmdline   18 module load failed
#   19 no /dev/vda      20 mkswap failed        21 swapon failed
#   22 hog failed       23 pswpout too low      24 /proc/vmstat unreadable
# If /init dies anyway the kernel panics, and panic=-1 -no-reboot ends QEMU.

/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# The initial console may be missing if the kernel had no /dev/console to
# open; re-attach stdio to it now that devtmpfs provides one.
exec </dev/console >/dev/console 2>&1

report() { # report CODE WORDS...: print the marker line, then end the VM
	code=$1
	shift
	echo "GUEST-RESULT $*"
	/hog --exit "$code"
	poweroff -f # only reached without isa-debug-exit
}
fail() { # fail CODE REASON
	report "$1" "fail code=$1 reason=$2"
}

HOG_MIB=280
HOG_SAME=0
MIN_PSWPOUT=50000
for arg in $(cat /proc/cmdline); do
	case $arg in
	hog_mib=*) HOG_MIB=${arg#hog_mib=} ;;
	hog_same=*) HOG_SAME=${arg#hog_same=} ;;
	min_pswpout=*) MIN_PSWPOUT=${arg#min_pswpout=} ;;
	esac
done
for v in "$HOG_MIB" "$HOG_SAME" "$MIN_PSWPOUT"; do
	case $v in
	'' | *[!0-9]*) fail 17 "bad-cmdline hog_mib=$HOG_MIB hog_same=$HOG_SAME min_pswpout=$MIN_PSWPOUT" ;;
	esac
done
echo "GUEST-START kernel=$(uname -r) hog_mib=$HOG_MIB hog_same=$HOG_SAME min_pswpout=$MIN_PSWPOUT"

# /modules/order lists the virtio modules in dependency order; the host side
# writes it because it knows which of them this kernel builds as modules.
while read -r mod; do
	insmod "/modules/$mod.ko" || fail 18 "insmod-$mod"
done </modules/order

# virtio_blk probes asynchronously; give the node a moment to appear.
i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ "$i" -gt 50 ] && fail 19 "no-dev-vda"
	sleep 0.1
done

mkswap /dev/vda || fail 20 mkswap
swapon /dev/vda || fail 21 swapon
grep . /proc/swaps
free

/hog "$HOG_MIB" "$HOG_SAME"
rc=$?
[ "$rc" -eq 0 ] || fail 22 "hog-rc-$rc"

pswpout=$(awk '$1 == "pswpout" { print $2 }' /proc/vmstat)
pswpin=$(awk '$1 == "pswpin" { print $2 }' /proc/vmstat)
case $pswpout in
'' | *[!0-9]*) fail 24 no-vmstat ;;
esac
[ "$pswpout" -gt "$MIN_PSWPOUT" ] ||
	fail 23 "pswpout-$pswpout-not-above-$MIN_PSWPOUT"
report 16 "ok pswpout=$pswpout pswpin=$pswpin"
