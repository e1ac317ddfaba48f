#!/usr/bin/env bash
# Build the har-edge images with podman, without Docker Hub; pip installs offline inside the build.
#
#   docker/build.sh [edge|trainer|mlflow|base] [--tag IMAGE]      (default: edge)
#
# Steps (each skipped when its result is already there):
#   1. install podman, runc, debootstrap, zstd, uidmap with apt when missing;
#   2. write $CACHE/containers.conf (runtime runc, nofile/nproc ulimits) and use it
#      through CONTAINERS_CONF (podman run commands need it too: export it);
#   3. the base image: `debootstrap --variant=minbase` of Debian bookworm with
#      python3 + python3-venv (the stand-in for python:3.11-slim), kept as
#      $CACHE/base-<key>.tar.zst and imported as localhost/har-edge-base:<key>;
#   4. wheels of the target's dependencies built on the host with pip into
#      $CACHE/wheels/<target>/ (the Dockerfile installs them with --no-index);
#   5. `podman build --format docker --build-arg BASE=...` (network only for the
#      apt-get of git/binutils; the mlflow image builds with --network=none),
#      then the build time and the image size are printed.
# Exit status: 0 built, 1 build failed, 2 usage / wrong host Python, 3 podman
# missing and not installable here (not root or no apt).
#
# Environment: CACHE (default <repo>/.cache/podman), PYTHON (host Python used
# for the wheels; must be the base's 3.11), DEBIAN_MIRROR, IMAGE (tag),
# WITH_GIT=0 / BYTECODE=0 (edge image build arguments, see Dockerfile.edge).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-$ROOT/.cache/podman}
PYTHON=${PYTHON:-python3}
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
BASE_PY=3.11  # the python3 of Debian bookworm, and of python:3.11-slim

target=edge
tag=${IMAGE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    edge|trainer|mlflow|base) target=$1 ;;
    --tag) tag=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (edge|trainer|mlflow|base [--tag IMAGE])" >&2; exit 2 ;;
  esac
  shift
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)
mlflow_version=$(sed -n 's/.*"mlflow-skinny==\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -1)
[ "$target" = mlflow ] && version=$mlflow_version  # the server image carries MLflow's version
tag=${tag:-localhost/har-$target:$version}

say() { printf 'build.sh: %s\n' "$*" >&2; }

# -- 1. tools -------------------------------------------------------------------
need=()
for tool in podman:podman runc:runc debootstrap:debootstrap zstd:zstd newuidmap:uidmap; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
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

# -- 3. base image ------------------------------------------------------------------
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
mirror=${mirror:-http://deb.debian.org/debian}
key=$(printf '%s %s minbase r2' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
base=localhost/har-edge-base:$key
tarball=$CACHE/base-$SUITE-$key.tar.zst
if ! podman image exists "$base"; then
  if [ ! -s "$tarball" ]; then
    say "debootstrap $SUITE ($BASE_PACKAGES) from $mirror: about 3 minutes, once"
    t0=$SECONDS
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf --one-file-system "$rootfs"' EXIT  # never into a proc/sys left mounted
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
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
  zstd -dc "$tarball" | podman import -q \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' \
    --change 'CMD=["python3"]' \
    - "$base" >/dev/null
  say "imported $base"
fi
podman tag "$base" localhost/har-edge-base:latest
if [ "$target" = base ]; then
  echo "$base"
  exit 0
fi

# -- 4. wheels on the host --------------------------------------------------------------
case "$target" in
  edge)    reqs=(".[edge]") ;;
  trainer) reqs=(".[trainer]") ;;
  mlflow)  reqs=("mlflow==$mlflow_version") ;;
esac
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

# -- 5. build -------------------------------------------------------------------------
# pip installs offline from the wheels; the network is there only for the
# `apt-get install` of the trainer image and of the edge image with WITH_GIT=1 (Debian mirror, HTTP)
net=--network=none
[ "$target" != mlflow ] && net=--network=host
extra=()
[ -n "${WITH_GIT:-}" ] && extra+=(--build-arg "WITH_GIT=$WITH_GIT")
[ -n "${BYTECODE:-}" ] && extra+=(--build-arg "BYTECODE=$BYTECODE")
[ "$target" = mlflow ] && extra+=(--build-arg "MLFLOW_VERSION=$mlflow_version")
say "podman build $tag (BASE=$base)"
t0=$(date +%s.%N)
podman build "$net" --format docker --layers \
  --build-arg BASE="$base" "${extra[@]}" -f "$ROOT/docker/Dockerfile.$target" -t "$tag" "$ROOT" >"$CACHE/build-$target.log" 2>&1 \
  || { tail -40 "$CACHE/build-$target.log" >&2; say "build failed; full log: $CACHE/build-$target.log"; exit 1; }
t1=$(date +%s.%N)
size=$(podman image inspect --format '{{.Size}}' "$tag")
awk -v tag="$tag" -v size="$size" -v t0="$t0" -v t1="$t1" \
  'BEGIN { printf "image %s size %.0f bytes (%.0f MB) build %.1f s\n", tag, size, size / 1e6, t1 - t0 }'
