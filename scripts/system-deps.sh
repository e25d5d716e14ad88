#!/usr/bin/env bash
# System packages the project needs on a fresh Debian machine (run as root):
#  - bubblewrap: the evaluation sandbox for model-written code
#  - docker-compose: validates docker-compose.yml without a Docker engine
#  - chromium: the browser the dashboard's tests drive (tests/ui, through Playwright)
# Idempotent: installs only what is missing; does nothing where apt-get is absent
# or we are not root (then the tests that need these skip and say why).
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "system-deps: installed ${need[*]}"
