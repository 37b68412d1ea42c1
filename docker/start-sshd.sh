#!/usr/bin/env bash
# Multi-node launches (deepspeed's pdsh runner, mpirun) reach a container over ssh: this starts an sshd as the
# image's non-root user on SSH_PORT (default 2222), host key and config in ~/.ssh, and points ssh/pdsh there.
# Usage: start-sshd.sh [--foreground]   (put the job's public key in ~/.ssh/authorized_keys on every node)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=docker/common.sh
. "$here/common.sh"
port=${SSH_PORT:-2222}
if ! [[ "$port" =~ ^[0-9]{4,5}$ ]] || [ "$port" -lt 1024 ] || [ "$port" -gt 65535 ]; then
  die "SSH_PORT=$port is not a port a non-root sshd can use — pick one in 1024-65535"
fi
case "${1:-}" in "" | --foreground) ;; *) die "unknown argument '$1' — usage: start-sshd.sh [--foreground]" ;; esac
d=$HOME/.ssh
mkdir -p "$d" && chmod 700 "$d"
[ -f "$d/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/ssh_host_ed25519_key"
touch "$d/authorized_keys" && chmod 600 "$d/authorized_keys"
cat >"$d/sshd_config" <<CONF
Port $port
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
PermitUserEnvironment no
AcceptEnv DS_* NCCL_* MASTER_* PYTHON* OMP_*
CONF
# The launchers ssh to the other nodes on the same port.
grep -qs "^# dsfleet sshd" "$d/config" || printf '# dsfleet sshd\nHost *\n  Port %s\n  StrictHostKeyChecking accept-new\n' "$port" >>"$d/config"
chmod 600 "$d/config"
if [ "${1:-}" = --foreground ]; then exec /usr/sbin/sshd -D -e -f "$d/sshd_config"; fi
/usr/sbin/sshd -f "$d/sshd_config"
echo "sshd for $(id -un) on port $port (pid $(cat "$d/sshd.pid" 2>/dev/null || echo '?'))"
