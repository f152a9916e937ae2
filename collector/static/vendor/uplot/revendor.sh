#!/bin/sh
# Re-vendors uPlot at the pinned version from the npm registry: the tarball must match its pinned
# sha256, then the served files and the licence are copied over the ones here unmodified.
set -eu
VERSION=1.6.32
TARBALL_SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null)
echo "$TARBALL_SHA256  $tmp/uplot-$VERSION.tgz" | sha256sum -c -
tar -xzf "$tmp/uplot-$VERSION.tgz" -C "$tmp"
cp "$tmp/package/dist/uPlot.esm.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$here/"
sha256sum "$here/uPlot.esm.js" "$here/uPlot.min.css" "$here/LICENSE"
