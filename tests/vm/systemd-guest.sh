# Sourced by tests/vm/run.sh for --systemd: prepares the unpacked Debian root file
# system in $ROOT to boot with systemd as PID 1 and run the guest command in a service.
# Uses run.sh's ROOT, KDIR, KVER, guest_cmd and die.

setup_systemd_guest() {
    local name units=$ROOT/etc/systemd/system
    # Modules where modprobe finds them (the Debian kmod of the root file system).
    cp "$KDIR"/modules/*.ko "$ROOT/usr/lib/modules/$KVER/"
    chroot "$ROOT" /sbin/depmod -a "$KVER" || die "depmod in the root file system failed"
    printf 'ublkd-vm\n' >"$ROOT/etc/hostname"
    printf '%s' "$guest_cmd" >"$ROOT/etc/ublkd-vm/cmd"
    # Nothing that competes for the serial console or wakes up during the tests.
    for name in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
        apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        systemd-timesyncd.service; do
        ln -sfn /dev/null "$units/$name"
    done

    cat >"$ROOT/etc/ublkd-vm/run" <<'GUEST'
#!/bin/sh
# ublkd VM test harness: runs the guest command under systemd (tests/vm/systemd-guest.sh).
exec </dev/null >/dev/console 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C
for m in configfs ublk_drv loop nbd; do
    modprobe "$m" || echo "ublkd-vm: modprobe $m failed"
done
cmd=$(cat /etc/ublkd-vm/cmd)
read -r up _ </proc/uptime
echo "ublkd-vm: kernel $(uname -r), $(systemctl --version | head -n1), up in ${up}s; running: $cmd"
cd /root
/bin/sh -c "$cmd"
rc=$?
read -r up _ </proc/uptime
printf '\nublkd-vm: guest command exited with %s at %ss\n' "$rc" "$up"
echo "UBLKD_VM_EXIT=$rc"
sync
systemctl poweroff --force --force
GUEST
    chmod 0755 "$ROOT/etc/ublkd-vm/run"

    cat >"$units/ublkd-vm.service" <<'GUEST'
[Unit]
Description=ublkd VM test command
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/etc/ublkd-vm/run
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
GUEST
    mkdir -p "$units/multi-user.target.wants"
    ln -sfn ../ublkd-vm.service "$units/multi-user.target.wants/ublkd-vm.service"
}
