#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost (Debian's Slurm 22.05), for the slurm launcher's test.
# Idempotent and fast when the cluster is already up. Needs root (apt-get, the daemons); where it cannot
# bring the cluster up it says why and exits 0, and the test that needs the cluster is skipped, saying so.
set -uo pipefail

say() { echo "slurm-up: $*" >&2; }

if command -v sinfo >/dev/null && sinfo --noheader --states=idle,mix,alloc -o %n 2>/dev/null | grep -q .; then
    exit 0  # already up, with a usable node
fi
if [ "$(id -u)" != 0 ]; then
    say "not root, cannot install or start SLURM; the slurm launcher's test will be skipped"
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >/dev/null 2>&1 \
        || { say "apt-get install slurm-wlm munge failed; the slurm launcher's test will be skipped"; exit 0; }
fi

# munge: a key owned by munge, then the daemon.
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || { say "munged did not start"; exit 0; }
fi

# slurm.conf for this host (no cgroup.conf: 22.05 rejects CgroupPlugin=disabled; its default plugin loads).
host=$(hostname -s)
conf=/etc/slurm/slurm.conf
want=$(cat <<CONF
ClusterName=peftbench
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MpiDefault=none
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
restart=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
    printf '%s\n' "$want" > "$conf"
    restart=1
fi
if [ "$restart" = 1 ]; then
    for d in slurmd slurmctld; do
        [ -f "/run/$d.pid" ] && kill "$(cat "/run/$d.pid")" 2>/dev/null
    done
    sleep 1
fi
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || { say "slurmctld did not start (see /var/log/slurm/slurmctld.log)"; exit 0; }
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || { say "slurmd did not start (see /var/log/slurm/slurmd.log)"; exit 0; }

for _ in $(seq 30); do
    if sinfo --noheader --states=idle,mix,alloc -o %n 2>/dev/null | grep -q .; then
        exit 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1
    sleep 1
done
say "the node did not come up (sinfo: $(sinfo --noheader 2>&1 | head -1)); the slurm launcher's test will be skipped"
exit 0
