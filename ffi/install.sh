#!/bin/sh
# Installs flatmerge's C library for C and C++ projects:
#
#   ffi/install.sh PREFIX
#
# builds it in release mode (cargo build --release -p flatmerge-ffi) and copies
#   PREFIX/lib/libflatmerge.so, PREFIX/lib/libflatmerge.a
#   PREFIX/include/flatmerge.h
#   PREFIX/lib/pkgconfig/flatmerge.pc              (pkg-config flatmerge)
#   PREFIX/lib/pkgconfig/flatmerge-static.pc       (the same, linking libflatmerge.a)
#   PREFIX/lib/cmake/flatmerge/flatmergeConfig.cmake and its version file
#                                                  (find_package(flatmerge))
# FLATMERGE_LIB_DIR=DIR installs the libraries already built in DIR (for
# example target/debug) instead of building.
set -eu

if [ "$#" -ne 1 ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

if [ -n "${FLATMERGE_LIB_DIR:-}" ]; then
    libs=$FLATMERGE_LIB_DIR
else
    (cd "$root" && cargo build --release -p flatmerge-ffi)
    libs=${CARGO_TARGET_DIR:-$root/target}/release
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
major=${version%%.*}
rest=${version#*.}
minor=${rest%%.*}
# What `rustc --print native-static-libs` lists for a Linux staticlib.
libs_private="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/flatmerge" "$prefix/include"
cp "$libs/libflatmerge.so" "$libs/libflatmerge.a" "$prefix/lib/"
cp "$root/include/flatmerge.h" "$prefix/include/"
for pc in flatmerge flatmerge-static; do
    sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@LIBS_PRIVATE@|$libs_private|" \
        "$root/ffi/$pc.pc.in" > "$prefix/lib/pkgconfig/$pc.pc"
done
cp "$root/ffi/cmake/flatmergeConfig.cmake" "$prefix/lib/cmake/flatmerge/"
sed -e "s|@VERSION@|$version|" -e "s|@VERSION_MAJOR@|$major|" -e "s|@VERSION_MINOR@|$minor|" \
    "$root/ffi/cmake/flatmergeConfigVersion.cmake.in" \
    > "$prefix/lib/cmake/flatmerge/flatmergeConfigVersion.cmake"
echo "installed flatmerge $version into $prefix"
