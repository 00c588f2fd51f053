#!/usr/bin/env bash
# Installs the Debian packages that corral's tests and lab (or, with `bench`, also the benchmarks) use, as
# listed in tests/deps.txt, then runs tests/preflight.sh. Called by tests/run.sh, tests/lab.sh and bench/.
#
#   sudo tests/deps.sh          # the suite and the lab
#   sudo tests/deps.sh bench    # and the benchmarks' anchors
#
# When any listed package is missing, or one of a `same-version` group is not at the group's version, every
# listed package goes into ONE apt-get transaction (pinned versions for the groups, --allow-downgrades), with
# --no-remove: apt never removes one package to satisfy another (it had removed qemu-utils 10.0 to install
# Debian's qemu-block-extra 7.2, and qemu-img vanished); if it would have to, the install stops and says so.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list=$here/deps.txt
want=${1:-suite}
case $want in
  suite) sets=" suite " ;;
  bench) sets=" suite bench " ;;
  *) echo "usage: $0 [suite|bench]" >&2; exit 2 ;;
esac

pkgs=() groups=()
while read -r name set rest; do
  case $name in
    ''|'#'*) continue ;;
    same-version) groups+=("$set $rest"); continue ;;
  esac
  [[ $sets == *" $set "* ]] && pkgs+=("$name")
done < "$list"

installed_version() {
  dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3 == "installed" { print $4 }' || true
}
# The newest version the configured archives offer (madison lists archive versions only, never a build that
# is installed but comes from no configured archive).
archive_version() {
  apt-cache madison "$1" 2>/dev/null | awk -F'|' 'NR == 1 { gsub(/ /, "", $2); print $2 }' || true
}
listed() { [[ " ${pkgs[*]} " == *" $1 "* ]]; }

# Fills missing, wrong (pkg:have->want) and spec (what to ask apt for: pkg or pkg=version).
survey() {
  missing=() wrong=() spec=()
  declare -gA pin=()
  local g first p v
  for g in "${groups[@]}"; do
    read -r first _ <<<"$g"
    listed "$first" || continue
    v=$(archive_version "$first")
    [ -n "$v" ] || continue   # no package lists yet: an install (after apt-get update) settles it
    for p in $g; do listed "$p" && pin[$p]=$v; done
  done
  for p in "${pkgs[@]}"; do
    v=$(installed_version "$p")
    if [ -z "$v" ]; then
      missing+=("$p")
    elif [ -n "${pin[$p]:-}" ] && [ "$v" != "${pin[$p]}" ]; then
      wrong+=("$p:$v->${pin[$p]}")
    fi
    spec+=("$p${pin[$p]:+=${pin[$p]}}")
  done
}

survey
if [ ${#missing[@]} -gt 0 ] || [ ${#wrong[@]} -gt 0 ]; then
  [ ${#missing[@]} -gt 0 ] && echo "== missing packages: ${missing[*]}"
  [ ${#wrong[@]} -gt 0 ] && echo "== at the wrong version: ${wrong[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "run as root to install them: sudo tests/deps.sh $want" >&2
    exit 1
  fi
  # Packages such as dnsmasq and nginx would start a service on the host's interfaces: keep services from
  # starting while apt runs (and remove the guard afterwards if we put it there).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  survey   # the group versions, now from fresh package lists
  echo "== installing ${#spec[@]} packages in one transaction"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    --no-remove "${spec[@]}" >/dev/null
  survey
  if [ ${#missing[@]} -gt 0 ] || [ ${#wrong[@]} -gt 0 ]; then
    echo "apt-get finished, yet: missing ${missing[*]:-none}; wrong version ${wrong[*]:-none}" >&2
    exit 1
  fi
fi
bash "$here/preflight.sh" "$want"
