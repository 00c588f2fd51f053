#!/usr/bin/env bash
# Checks, before any test runs, that every command and file tests/deps.txt lists for a set is here: commands
# in PATH (the PATH the tests will run with), files by path or glob. Prints each missing one with its package
# and exits 1, so a broken install stops with one clear message instead of a test failing half-way.
# Plain bash (builtins only), so it can be run against a PATH that lacks almost everything.
#
#   tests/preflight.sh          # what tests/run.sh and tests/lab.sh need
#   tests/preflight.sh bench    # that and what the benchmarks need
#   CORRAL_DEPS_LIST=FILE ...   # another list (the preflight test uses one)
set -uo pipefail
list=${CORRAL_DEPS_LIST:-$(cd "$(dirname "$0")" && pwd)/deps.txt}
case ${1:-suite} in
  suite) sets=" suite " ;;
  bench) sets=" suite bench " ;;
  *) echo "usage: $0 [suite|bench]" >&2; exit 2 ;;
esac
[ -r "$list" ] || { echo "preflight: no list at $list" >&2; exit 2; }

missing=() commands=0 files=0
while read -r pkg set provides; do
  case $pkg in ''|'#'*|same-version) continue ;; esac
  [[ $sets == *" $set "* ]] || continue
  for what in $provides; do
    if [[ $what == /* ]]; then
      files=$((files + 1))
      compgen -G "$what" >/dev/null || missing+=("$what (file, from package $pkg)")
    else
      commands=$((commands + 1))
      command -v "$what" >/dev/null || missing+=("$what (command, from package $pkg)")
    fi
  done
done < "$list"

if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "preflight: ${#missing[@]} of $((commands + files)) prerequisites missing, so no test runs:"
    printf '  %s\n' "${missing[@]}"
    echo "install them with: sudo tests/deps.sh${1:+ $1}   (PATH=$PATH)"
  } >&2
  exit 1
fi
echo "preflight: all $commands commands and $files files present"
