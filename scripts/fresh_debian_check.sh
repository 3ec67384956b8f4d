#!/usr/bin/env bash
# Check the README's quick start on a fresh Debian 12: debootstrap a bookworm chroot, put a fresh
# clone of this checkout's HEAD in /root/moments, then run both README commands exactly as written,
# as root: `bash scripts/demo.sh` and `bash .ci/run`. Not run by CI: it needs root, debootstrap and
# the network (Debian and PyPI), and takes about 30 minutes on 2 cores (measured: debootstrap 3.7,
# the demo with its apt and pip installs 5.8, the whole test suite 17.8 while other tests shared the
# cores). The chroot is removed at the end (KEEP=1 keeps it).
#
#   sudo bash scripts/fresh_debian_check.sh                     # debootstrap into a temporary folder
#   sudo BASE=/var/tmp/bookworm bash scripts/fresh_debian_check.sh  # copy a pristine debootstrap instead
#
# Machines whose pip installs from local folders (a pip.conf naming find-links / extra-index-url
# folders, e.g. a pre-downloaded torch, and a custom CA bundle) get that configuration copied into the
# chroot and those folders bind-mounted read-only, standing in for PyPI; a user's machine downloads
# from PyPI instead. Local CA certificates (/usr/local/share/ca-certificates, e.g. a TLS-inspecting
# proxy's) are copied too, so the chroot reaches PyPI the way this machine does. The output says what
# it copied.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${DEBIAN_MIRROR:-}  # empty: debootstrap's default mirror
ROOT=${ROOT:-$(mktemp -d /var/tmp/moments-fresh-debian.XXXXXX)}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap and chroot)" >&2; exit 2; }

mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $ROOT"; else rm -rf --one-file-system "$ROOT"; fi
}
trap cleanup EXIT
bind() {  # bind <host path> [ro]: mount a host path at the same place in the chroot
  mkdir -p "$ROOT$1"
  mount --bind "$1" "$ROOT$1"
  mounts+=("$ROOT$1")
  if [ "${2:-}" = ro ]; then mount -o remount,bind,ro "$ROOT$1"; fi
}
step() { echo; echo "=== $* ($(date +%T))"; }
started=$(date +%s)

step "a fresh Debian 12 in $ROOT"
if [ -n "${BASE:-}" ]; then
  cp -a "$BASE/." "$ROOT/"
else
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  debootstrap bookworm "$ROOT" $MIRROR >/dev/null
fi
grep -q bookworm "$ROOT/etc/os-release" || { echo "not a bookworm root: $ROOT" >&2; exit 1; }
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
for fs in proc sys dev dev/pts; do
  mkdir -p "$ROOT/$fs"
  case $fs in
    proc) mount -t proc proc "$ROOT/proc" ;;
    sys) mount -t sysfs sys "$ROOT/sys" ;;
    *) mount --bind "/$fs" "$ROOT/$fs" ;;
  esac
  mounts+=("$ROOT/$fs")
done
mount -t tmpfs tmpfs "$ROOT/dev/shm"; mounts+=("$ROOT/dev/shm")

step "a fresh clone of $(git -C "$REPO" rev-parse --short HEAD) in /root/moments"
git clone -q --no-hardlinks "$REPO" "$ROOT/root/moments"
git -C "$ROOT/root/moments" checkout -q --detach "$(git -C "$REPO" rev-parse HEAD)"

if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  echo "copying local CA certificates /usr/local/share/ca-certificates/*.crt"
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
# What this machine's pip reads (files and PIP_* variables), carried over to stand in for PyPI.
pip_env=()
for conf in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip"; do
  [ -e "$conf" ] || continue
  echo "copying pip configuration $conf"
  mkdir -p "$ROOT$(dirname "$conf")"
  cp -a "$conf" "$ROOT$conf"
done
while IFS='=' read -r name value; do pip_env+=("$name=$value"); done < <(env | grep '^PIP_' || true)
for folder in $( (cat /etc/pip.conf /etc/xdg/pip/*.conf "$HOME"/.config/pip/*.conf 2>/dev/null; env | grep '^PIP_') \
                 | grep -oE '(file://)?/[^ ]+' | sed 's#^file://##' | sort -u); do
  if [ -d "$folder" ]; then
    top=/$(echo "$folder" | cut -d/ -f2-3)  # e.g. /opt/pypi for /opt/pypi/simple
    mountpoint -q "$ROOT$top" || { echo "bind-mounting $top read-only"; bind "$top" ro; }
  elif [ -f "$folder" ] && [ ! -e "$ROOT$folder" ]; then
    echo "copying $folder"
    mkdir -p "$ROOT$(dirname "$folder")"
    cp "$folder" "$ROOT$folder"
  fi
done

in_chroot() {
  chroot "$ROOT" env -i HOME=/root TERM=dumb LANG=C.UTF-8 CI=true "${pip_env[@]}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/moments && $1"
}

step "README: bash scripts/demo.sh"
t0=$(date +%s)
in_chroot "bash scripts/demo.sh"
demo_s=$(( $(date +%s) - t0 ))

step "README: bash .ci/run"
t0=$(date +%s)
in_chroot "bash .ci/run"
ci_s=$(( $(date +%s) - t0 ))

step "both README commands passed on a fresh Debian 12: demo ${demo_s} s, .ci/run ${ci_s} s, \
all $(( $(date +%s) - started )) s"
