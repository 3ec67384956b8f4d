#!/usr/bin/env bash
# Build the base image every Moments image starts FROM, without an image registry:
# debootstrap a minimal Debian bookworm (python3, venv, CA certificates, redis-server) from the Debian
# mirror this machine's apt already uses, then `docker import` it as moments-base:bookworm.
# Cached: does nothing when the image exists (REBUILD=1 to build it again). Needs root.
#   bash scripts/build_base_image.sh
set -euo pipefail

IMAGE=${MOMENTS_BASE_IMAGE:-moments-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,redis-server

if [ -z "${REBUILD:-}" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE exists (REBUILD=1 to rebuild)"
  exit 0
fi

# The first Debian mirror apt is configured with (deb822 .sources or one-line .list), else Debian's CDN.
mirror_from_apt() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) {print $i; exit}}' "$f"
  done
}
MIRROR=${DEBIAN_MIRROR:-$(mirror_from_apt | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }

ROOTFS=$(mktemp -d /var/tmp/moments-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS" "$ROOTFS.log"' EXIT

echo "debootstrap $SUITE from $MIRROR (+ $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 ||
  { tail -n 30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"

# The image's apt reads the same mirror; package lists and caches are not kept in the image.
echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb

tar -C "$ROOTFS" --numeric-owner -c . |
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null
echo "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
