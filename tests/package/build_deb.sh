#!/usr/bin/env bash
# Build policyd's .deb from a copy of the work tree, so that the build leaves
# nothing in the repository; the .deb, .changes and .buildinfo land in OUTDIR.
# Usage: tests/package/build_deb.sh [OUTDIR]   (default: build/deb)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
outdir=$(mkdir -p "${1:-$repo/build/deb}" && cd "${1:-$repo/build/deb}" && pwd)
version=$(dpkg-parsechangelog -l "$repo/debian/changelog" -S Version)

workdir=$(mktemp -d /tmp/policyd-deb.XXXXXX)
trap 'rm -rf "$workdir"' EXIT

# Tracked files plus new ones not ignored: what a commit of this tree would hold.
srcdir="$workdir/policyd-${version%-*}"
mkdir "$srcdir"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' path; do
        # a tracked file deleted in the work tree is not part of this build
        if [ -e "$path" ]; then printf '%s\0' "$path"; fi
    done | xargs -0 cp --parents -t "$srcdir")

# The system Python must build it: another python3 earlier on PATH (pyenv, a
# venv) lacks the Debian-only modules and writes the wrong interpreter paths.
(cd "$srcdir" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$workdir/build.log" 2>&1) || {
    tail -n 60 "$workdir/build.log" >&2
    echo "build_deb: dpkg-buildpackage failed (last lines above)" >&2
    exit 1
}

# The test lab (tests/lab, package policyd_lab) is for tests, bench and demo only.
if dpkg-deb -c "$workdir"/policyd_"$version"_*.deb | grep -q policyd_lab; then
    echo "build_deb: the .deb holds the test lab (policyd_lab)" >&2
    exit 1
fi

rm -f "$outdir"/policyd_*
cp "$workdir"/policyd_"$version"_* "$outdir"/
ls "$outdir"/policyd_"$version"_*
