#!/usr/bin/env bash
# Build the har-edge images with podman, without Docker Hub; pip installs offline inside the build.
#
#   docker/build.sh [edge|trainer|mlflow|prometheus|base] [--tag IMAGE] [--arch amd64|arm64]
#                                                                 (default: edge, the host's arch)
#   docker/build.sh manifest [--tag LIST] [--from IMAGE]...       a manifest list of built images
#                    (default: localhost/har-edge-multiarch:<version> of har-edge:<version>{,-arm64})
#
# Steps (each skipped when its result is already there):
#   1. install podman, runc, debootstrap, zstd, uidmap with apt when missing; for a
#      foreign --arch also qemu-user-static and binfmt-support, mount binfmt_misc
#      when it is missing and enable the qemu interpreter of that arch;
#   2. write $CACHE/containers.conf (runtime runc, nofile/nproc ulimits) and use it
#      through CONTAINERS_CONF (podman run commands need it too: export it);
#   3. the base image: `debootstrap --variant=minbase` of Debian bookworm with
#      python3 + python3-venv (the stand-in for python:3.11-slim), kept as
#      $CACHE/base-<key>.tar.zst and imported as localhost/har-edge-base:<key>
#      (foreign arch: `debootstrap --foreign --arch`, second stage under qemu);
#   4. wheels of the target's dependencies built on the host with pip into
#      $CACHE/wheels/<target>/ (the Dockerfile installs them with --no-index);
#      for a foreign arch the binary wheels of that platform are downloaded
#      (`pip download --platform manylinux_2_X_aarch64 --only-binary=:all:`)
#      into $CACHE/wheels/<target>-<arch>/, with the host's pure-Python wheels;
#   5. `podman build --format docker --build-arg BASE=...` (network only for the
#      apt-get of git/binutils; the mlflow image builds with --network=none),
#      then the build time and the image size are printed.
# Exit status: 0 built, 1 build failed, 2 usage / wrong host Python, 3 podman
# (or, for a foreign arch, qemu/binfmt_misc) missing and not installable here
# (not root or no apt).
#
# Environment: CACHE (default <repo>/.cache/podman), PYTHON (host Python used
# for the wheels; must be the base's 3.11), DEBIAN_MIRROR, IMAGE (tag),
# WITH_GIT=0 / BYTECODE=0 (edge image build arguments, see Dockerfile.edge),
# ARCH (same as --arch).
set -euo pipefail
# the whole script is one block, read before it runs: editing this file during a build cannot derail it
{

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-$ROOT/.cache/podman}
PYTHON=${PYTHON:-python3}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
BASE_PY=3.11  # the python3 of Debian bookworm, and of python:3.11-slim

target=edge
tag=${IMAGE:-}
arch=${ARCH:-}
from=()
while [ $# -gt 0 ]; do
  case "$1" in
    edge|trainer|mlflow|prometheus|base) target=$1 ;;
    --tag) tag=$2; shift ;;
    --arch) arch=$2; shift ;;
    manifest) target=manifest ;;
    --from) from+=("$2"); shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (edge|trainer|mlflow|prometheus|base [--tag IMAGE] [--arch amd64|arm64])" >&2; exit 2 ;;
  esac
  shift
done
host_arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "$host_arch" in x86_64) host_arch=amd64 ;; aarch64) host_arch=arm64 ;; esac
case "${arch:-$host_arch}" in
  amd64|x86_64) arch=amd64; qemu=x86_64; pyplat=x86_64 ;;
  arm64|aarch64) arch=arm64; qemu=aarch64; pyplat=aarch64 ;;
  *) echo "build.sh: unknown arch $arch (amd64 or arm64)" >&2; exit 2 ;;
esac
foreign=0
[ "$arch" != "$host_arch" ] && foreign=1
if [ "$foreign" = 1 ] && [ "$target" != edge ] && [ "$target" != base ]; then
  echo "build.sh: --arch $arch is for the edge image (and its base) only" >&2
  exit 2
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)
mlflow_version=$(sed -n 's/.*"mlflow-skinny==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)
[ "$target" = mlflow ] && version=$mlflow_version  # the server image carries MLflow's version
[ "$target" = prometheus ] && version=2.42  # Debian bookworm's prometheus package
if [ "$target" = manifest ]; then
  [ ${#from[@]} -gt 0 ] || from=("localhost/har-edge:$version" "localhost/har-edge:$version-arm64")
  tag=${tag:-localhost/har-edge-multiarch:$version}
fi
suffix=""
[ "$foreign" = 1 ] && suffix="-$arch"  # localhost/har-edge:0.1.0-arm64
tag=${tag:-localhost/har-$target:$version$suffix}

say() { printf 'build.sh: %s\n' "$*" >&2; }

# -- 1. tools -------------------------------------------------------------------
need=()
for tool in podman:podman runc:runc debootstrap:debootstrap zstd:zstd newuidmap:uidmap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ "$foreign" = 1 ]; then
  for tool in qemu-$qemu-static:qemu-user-static update-binfmts:binfmt-support; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
  done
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    say "missing ${need[*]}: install them (apt-get install -y ${need[*]}) and run again"
    exit 3
  fi
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
# a foreign arch runs its binaries (debootstrap's second stage, the RUN steps) through
# qemu-user-static, registered in binfmt_misc with the F flag (the interpreter is
# opened at registration, so it works inside chroots and containers too)
if [ "$foreign" = 1 ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    say "binfmt_misc has no qemu-$qemu entry and only root can add it: as root run" \
      "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-$qemu"
    exit 3
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || { say "cannot mount binfmt_misc (a container without the privilege?)"; exit 3; }
  fi
  update-binfmts --enable "qemu-$qemu" >/dev/null 2>&1 || true
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$qemu" ] || { say "update-binfmts did not register qemu-$qemu"; exit 3; }
  say "binfmt_misc: qemu-$qemu enabled"
fi

# LiteRT's Interpreter segfaults or hangs under bookworm's qemu-user 7.2 (every QEMU_CPU tried);
# qemu-user 10 runs it. Its Debian package (trixie's) ships static binaries: as root, when the
# registered interpreter is older than 8, this fetches that one package from the Debian mirror,
# checks its sha256, keeps its qemu-$qemu under $CACHE/qemu/ and registers it (flags FP) in place
# of the old one. Nothing is installed into the system and no apt source is added.
QEMU_DEB=qemu-user_10.0.13+ds-0+deb13u1_amd64.deb
QEMU_DEB_SHA256=ca6ede739327a20ae5a3498230c8a3a9a072c586e131bc6bcc1201eb1725e336
if [ "$foreign" = 1 ]; then
  interp=$(sed -n 's/^interpreter //p' "/proc/sys/fs/binfmt_misc/qemu-$qemu")
  qver=$({ "$interp" --version 2>/dev/null || true; } | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -1)
  if [ "${qver:-0}" -lt 8 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      say "binfmt_misc runs qemu-$qemu ${qver:-older than 8}, under which LiteRT crashes: as root this script" \
        "registers qemu-user 10 from Debian trixie (package $QEMU_DEB)"
      exit 3
    fi
    qdir="$CACHE/qemu"
    mkdir -p "$qdir"
    if [ ! -x "$qdir/qemu-$qemu" ]; then
      mirror_q=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
      url="${mirror_q:-http://deb.debian.org/debian}/pool/main/q/qemu/$QEMU_DEB"
      say "fetching $url"
      curl -fsSL -o "$qdir/$QEMU_DEB" "$url" || { say "could not fetch $url"; exit 3; }
      echo "$QEMU_DEB_SHA256  $qdir/$QEMU_DEB" | sha256sum -c --quiet - \
        || { say "$QEMU_DEB: sha256 mismatch, refused"; rm -f "$qdir/$QEMU_DEB"; exit 3; }
      rm -rf "$qdir/x" && mkdir "$qdir/x" && dpkg-deb -x "$qdir/$QEMU_DEB" "$qdir/x"
      install -m 755 "$qdir/x/usr/bin/qemu-$qemu" "$qdir/qemu-$qemu" && rm -rf "$qdir/x" "$qdir/$QEMU_DEB"
    fi
    entry=$(cat "/proc/sys/fs/binfmt_misc/qemu-$qemu")
    magic=$(sed -n 's/^magic //p' <<<"$entry" | sed 's/../\\x&/g')
    mask=$(sed -n 's/^mask //p' <<<"$entry" | sed 's/../\\x&/g')
    echo -1 >"/proc/sys/fs/binfmt_misc/qemu-$qemu"
    printf ':qemu-%s:M::%s:%s:%s:FP\n' "$qemu" "$magic" "$mask" "$qdir/qemu-$qemu" >/proc/sys/fs/binfmt_misc/register
    say "binfmt_misc: qemu-$qemu is now $("$qdir/qemu-$qemu" --version | head -1)"
  fi
fi

# -- 2. podman settings ---------------------------------------------------------------
mkdir -p "$CACHE"
export CONTAINERS_CONF="$CACHE/containers.conf"
cat >"$CONTAINERS_CONF.tmp" <<'EOF'
# written by docker/build.sh: podman's default ulimits fail without a privileged setrlimit ("Operation not permitted")
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"

# -- manifest list: the images already built, one per platform -------------------------
if [ "$target" = manifest ]; then
  for image in "${from[@]}"; do
    podman image exists "$image" || { say "$image is not built (docker/build.sh edge [--arch arm64])"; exit 1; }
  done
  podman manifest exists "$tag" 2>/dev/null && podman manifest rm "$tag" >/dev/null
  podman manifest create "$tag" >/dev/null
  for image in "${from[@]}"; do
    # the entry's os/arch come from the image's own configuration (podman import --arch, build --platform)
    podman manifest add "$tag" "containers-storage:$image" >/dev/null
    say "$tag += $image ($(podman image inspect --format '{{.Os}}/{{.Architecture}}' "$image"))"
  done
  echo "$tag"
  exit 0
fi

# -- 3. base image ------------------------------------------------------------------
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
mirror=${mirror:-http://deb.debian.org/debian}
archkey=""
[ "$arch" != amd64 ] && archkey=" $arch"  # amd64 keeps the key it always had (cached bases stay valid)
key=$(printf '%s %s minbase r2%s' "$SUITE" "$BASE_PACKAGES" "$archkey" | sha256sum | cut -c1-12)
base=localhost/har-edge-base:$key
tarball=$CACHE/base-$SUITE-$arch-$key.tar.zst
[ "$arch" = amd64 ] && tarball=$CACHE/base-$SUITE-$key.tar.zst
if ! podman image exists "$base"; then
  if [ ! -s "$tarball" ]; then
    t0=$SECONDS
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf --one-file-system "$rootfs"' EXIT  # never into a proc/sys left mounted
    log=$CACHE/debootstrap-$arch.log
    if [ "$foreign" = 0 ]; then
      say "debootstrap $SUITE ($BASE_PACKAGES) from $mirror: about 3 minutes, once"
      debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$log" 2>&1 \
        || { tail -20 "$log" >&2; exit 1; }
    else
      say "debootstrap --arch=$arch $SUITE ($BASE_PACKAGES) from $mirror, second stage under qemu: about 5 minutes, once"
      debootstrap --foreign --arch="$arch" --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
      chroot "$rootfs" /debootstrap/debootstrap --second-stage >>"$log" 2>&1 \
        || { tail -20 "$log" >&2; tail -20 "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null; exit 1; }
    fi
    # what python:3.11-slim also leaves out: package caches, lists, docs, man pages
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    tar -C "$rootfs" --numeric-owner -c . | zstd -q -T0 -10 -o "$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$rootfs"
    trap - EXIT
    say "base tarball $(du -h "$tarball" | cut -f1) in $((SECONDS - t0)) s: $tarball"
  fi
  zstd -dc "$tarball" | podman import -q --os linux --arch "$arch" \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' \
    --change 'CMD=["python3"]' \
    - "$base" >/dev/null
  say "imported $base"
fi
podman tag "$base" "localhost/har-edge-base:latest$suffix"
if [ "$target" = base ]; then
  echo "$base"
  exit 0
fi

# -- 4. wheels on the host --------------------------------------------------------------
case "$target" in
  edge)    reqs=(".[edge]") ;;
  trainer) reqs=(".[trainer]") ;;
  mlflow)  reqs=("mlflow==$mlflow_version") ;;
  prometheus) reqs=() ;;  # Debian's package, installed by apt in the build
esac
wheel_dir=""
if [ ${#reqs[@]} -gt 0 ]; then
host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$host_py" != "$BASE_PY" ]; then
  say "$PYTHON is Python $host_py; the wheels must be built by Python $BASE_PY (the image's): set PYTHON=python$BASE_PY"
  exit 2
fi
wheels=$CACHE/wheels/$target
stamp=$(cat "$ROOT/pyproject.toml" <(printf '%s %s' "${reqs[*]}" "$host_py") | sha256sum | cut -c1-16)
if [ "$(cat "$wheels/.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "pip wheel ${reqs[*]} -> $wheels"
  t0=$SECONDS
  mkdir -p "$wheels"
  # setuptools and wheel: the build backend pip needs to build the project inside the image
  (cd "$ROOT" && "$PYTHON" -m pip wheel -q --disable-pip-version-check --find-links "$wheels" -w "$wheels" \
    "${reqs[@]}" "setuptools>=68" wheel 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2))
  rm -f "$wheels"/har_edge-*.whl  # the image builds the project from its own copy of the source
  echo "$stamp" >"$wheels/.stamp"
  say "wheels ready in $((SECONDS - t0)) s ($(du -sh "$wheels" | cut -f1))"
fi
wheel_dir=$target
if [ "$foreign" = 1 ]; then
  # The foreign platform's binary wheels come from PyPI as they are (no compiler for it here):
  # pip download for manylinux_2_17 .. manylinux_2_36 (bookworm's glibc is 2.36) of $pyplat.
  # The host's wheel directory is a --find-links source for the pure-Python wheels that pip
  # built from sdists above (e.g. antlr4-python3-runtime); its x86_64 wheels do not match.
  wheels_arch=$CACHE/wheels/$target-$arch
  stamp_arch=$(printf '%s %s' "$stamp" "$arch" | sha256sum | cut -c1-16)
  if [ "$(cat "$wheels_arch/.stamp" 2>/dev/null)" != "$stamp_arch" ]; then
    say "pip download --platform manylinux_2_*_$pyplat ${reqs[*]} -> $wheels_arch"
    t0=$SECONDS
    rm -rf "$wheels_arch"
    mkdir -p "$wheels_arch"
    "$PYTHON" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; \
      print("\n".join(p["dependencies"] + p["optional-dependencies"][sys.argv[2]]))' \
      "$ROOT/pyproject.toml" "$target" >"$wheels_arch/requirements.txt"
    platforms=(--platform "manylinux2014_$pyplat" --platform "linux_$pyplat")
    for v in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${v}_$pyplat"); done
    "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
      --python-version "$BASE_PY" --implementation cp --abi "cp${BASE_PY/./}" "${platforms[@]}" \
      --find-links "$wheels" -d "$wheels_arch" -r "$wheels_arch/requirements.txt" "setuptools>=68" wheel \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) || { say "pip download for $pyplat failed: a dependency without a $pyplat wheel for CPython $BASE_PY?"; exit 1; }
    echo "$stamp_arch" >"$wheels_arch/.stamp"
    say "$pyplat wheels ready in $((SECONDS - t0)) s ($(du -sh "$wheels_arch" | cut -f1))"
  fi
  wheel_dir=$target-$arch
fi
fi

# -- 5. build -------------------------------------------------------------------------
# pip installs offline from the wheels; the network is there only for the
# `apt-get install` of the trainer image and of the edge image with WITH_GIT=1 (Debian mirror, HTTP)
net=--network=none
[ "$target" != mlflow ] && net=--network=host
extra=(--platform "linux/$arch")
# the Dockerfiles take their wheels from .cache/podman/wheels/$WHEELS/ of the build context
[ "$target" = edge ] && extra+=(--build-arg "WHEELS=$wheel_dir")
[ -n "${WITH_GIT:-}" ] && extra+=(--build-arg "WITH_GIT=$WITH_GIT")
# Under qemu-user 7.2 (bookworm) `har-edge health` (LiteRT running the golden windows) dies with
# SIGSEGV in the BYTECODE=1 warm-up step: a foreign build leaves the warm-up out unless asked for it
[ "$foreign" = 1 ] && BYTECODE=${BYTECODE:-0}
[ -n "${BYTECODE:-}" ] && extra+=(--build-arg "BYTECODE=$BYTECODE")
[ "$target" = mlflow ] && extra+=(--build-arg "MLFLOW_VERSION=$mlflow_version")
say "podman build $tag (BASE=$base)"
t0=$(date +%s.%N)
podman build "$net" --format docker --layers \
  --build-arg BASE="$base" "${extra[@]}" -f "$ROOT/docker/Dockerfile.$target" -t "$tag" "$ROOT" >"$CACHE/build-$target$suffix.log" 2>&1 \
  || { tail -40 "$CACHE/build-$target$suffix.log" >&2; say "build failed; full log: $CACHE/build-$target$suffix.log"; exit 1; }
t1=$(date +%s.%N)
size=$(podman image inspect --format '{{.Size}}' "$tag")
awk -v tag="$tag" -v size="$size" -v t0="$t0" -v t1="$t1" \
  'BEGIN { printf "image %s size %.0f bytes (%.0f MB) build %.1f s\n", tag, size, size / 1e6, t1 - t0 }'
exit 0
}
