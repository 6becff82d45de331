#!/usr/bin/env bash
# Builds a stand-in for the Dockerfile's base image (debian:bookworm-slim) when no registry can be
# reached: `debootstrap --variant=minbase bookworm` from the Debian mirror this machine's apt uses,
# trimmed like the official slim image, then `docker import`ed under the Dockerfile's FROM tag.
#
# The stand-in differs from the published image in two build-machine details only, so that the
# shipped Dockerfile builds here unchanged:
#   - apt points at the mirror apt uses on this machine (and, like this machine's apt, does not
#     reject a snapshot mirror's expired Release files);
#   - pip trusts this machine's CA bundle (PIP_CERT, when set: TLS to PyPI may be inspected here).
#
# Cached: does nothing when an image with that tag already exists (`--force` rebuilds it).
# Usage: tests/docker/make_base_image.sh [--force]    (needs root, debootstrap and a running dockerd)
set -euo pipefail
cd "$(dirname "$0")/../.."

tag=$(awk 'toupper($1) == "FROM" { print $2; exit }' Dockerfile)
suite=bookworm
[ "$tag" = "debian:${suite}-slim" ] || { echo "make_base_image: the Dockerfile's FROM is $tag, this script builds debian:${suite}-slim" >&2; exit 1; }

if [ "${1:-}" != "--force" ] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "make_base_image: $tag exists, nothing to do"
    exit 0
fi

# The URI apt uses here for a suite (one-line and deb822 sources); DEBIAN_MIRROR /
# DEBIAN_SECURITY_MIRROR override.
apt_uri() {
    local want=$1 f files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [ -f "$f" ]; then files+=("$f"); fi
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v want="$want" '
            /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i + 1) == want) { print $i; exit } break } }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want && uri != "") { print uri; exit } }
            /^$/ { uri = "" }' "${files[@]}"
}
mirror=${DEBIAN_MIRROR:-$(apt_uri "$suite")}
mirror=${mirror:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-$(apt_uri "$suite-security")}
security=${security:-http://deb.debian.org/debian-security}

root=$(mktemp -d /var/tmp/stand-in-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root" # it becomes the image's /: mktemp's 0700 would lock every other user out
echo "make_base_image: debootstrap $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# As the official image: apt's sources in deb822 form, no docs/man pages/locales installed later,
# no package caches or lists kept.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
cat >"$root/etc/apt/apt.conf.d/99build-host" <<'CONF'
// Stand-in base only: this machine's mirror may be a dated snapshot.
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
CONF
# The apt settings debuerreotype gives the official images: no package caches, compressed
# indexes, no translations.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CONF
find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/var/cache/debconf/*-old "$root"/var/log/*.log

changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'CMD ["bash"]' --change 'LABEL org.ilink-fixproxy.stand-in=true')
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    install -D -m 0644 "$PIP_CERT" "$root/usr/local/share/build-host-ca/ca-bundle.pem"
    changes+=(--change 'ENV PIP_CERT=/usr/local/share/build-host-ca/ca-bundle.pem')
fi

tar --numeric-owner -C "$root" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
echo "make_base_image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
