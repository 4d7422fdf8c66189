#!/bin/sh
# /init of the inside-VM guest's initramfs (busybox sh): mount the root disk
# (/dev/vda, a read-only ext4 image built by tests/guest/rootfs.py) and switch
# to it. /config -- this boot's own files, a cpio archive the host appends --
# becomes /etc/netswap there. A failure here prints GUEST-RESULT and ends
# init, so the kernel panics and QEMU (panic=-1, -no-reboot) ends too.

/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1

fail() { # fail CODE REASON
	echo "GUEST-RESULT fail code=$1 reason=$2"
	exit 1
}

while read -r mod; do
	insmod "/modules/$mod.ko" || fail 18 "insmod-$mod"
done </modules/order

i=0
while [ ! -b /dev/vda ]; do
	i=$((i + 1))
	[ "$i" -gt 50 ] && fail 19 "no-dev-vda"
	sleep 0.1
done

mkdir /newroot
mount -t ext4 -o ro /dev/vda /newroot || fail 25 mount-root
mount -t tmpfs -o mode=0755,size=4m run /newroot/run || fail 26 mount-run
mount -t tmpfs -o mode=1777,size=4m tmp /newroot/tmp || fail 26 mount-tmp
mount -t tmpfs -o mode=0700,size=1m config /newroot/etc/netswap || fail 26 mount-config
cp -a /config/. /newroot/etc/netswap/ || fail 26 copy-config
for fs in proc sys dev; do
	mount --move "/$fs" "/newroot/$fs" || fail 26 "move-$fs"
done
exec switch_root /newroot /sbin/netswap-guest-init
