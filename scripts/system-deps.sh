#!/usr/bin/env bash
# System (Debian) packages some tests need: prometheus (the server and promtool), docker-compose
# (validates docker-compose.yml; no Docker engine needed), openssl (certificates for the client
# TLS tests), and redis-server, nginx and haproxy (the scale-out tests run them on loopback:
# tests/cluster.py). Installs only what is missing, only
# as root with apt-get; otherwise says what is missing and exits 0 (those tests then skip).
# Quiet and fast when everything is there. Called by .ci/run and scripts/test.sh.
set -euo pipefail

# command -> Debian package that ships it
declare -A PACKAGE_OF=([prometheus]=prometheus [promtool]=prometheus [openssl]=openssl
                       [docker-compose]=docker-compose [redis-server]=redis-server
                       [nginx]=nginx [haproxy]=haproxy)

# nginx and haproxy live in /usr/sbin, which a non-root PATH may lack.
missing=()
for cmd in "${!PACKAGE_OF[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 && continue
  pkg=${PACKAGE_OF[$cmd]}
  [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]} (install with apt-get as root); the tests that need" \
       "them will skip" >&2
  exit 0
fi

echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
# A fresh machine has no package lists yet: update once, then retry.
apt_install 2>/dev/null || { apt-get update -qq >/dev/null && apt_install; }
