#!/usr/bin/env bash
# Idempotent: installs what tests/multihost.py needs from Debian (sshd, ssh client, iproute2,
# util-linux's unshare). Skips apt entirely when every tool is already there. The bridge is made
# with `ip link add type bridge`, so bridge-utils is not needed.
set -euo pipefail
say() { printf '[setup_multihost] %s\n' "$*"; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)

if [ ${#missing[@]} -eq 0 ]; then
    say "sshd, ssh, ip and unshare found"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${missing[*]}; install them as root (apt-get install ${missing[*]})." >&2
    say "the multihost tests will be skipped until then" >&2
    exit 0   # not fatal: the multihost tests skip with a clear reason
fi

# openssh-server's postinst would start a system sshd on port 22: forbid service starts
# for the duration of the install (Docker images already ship such a policy-rc.d).
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
trap '[ -z "$made_policy" ] || rm -f "$policy"' EXIT

say "installing ${missing[*]} from Debian"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
say "installed ${missing[*]}"
