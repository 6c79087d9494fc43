#!/usr/bin/env bash
# deploy/rdma-lab/lab.sh: the Soft-RoCE lab. Runs the project's RDMA tests against real verbs
# (two rdma_rxe devices on a veth pair) inside a throwaway qemu VM (TCG, no KVM, no network).
#
#   sudo deploy/rdma-lab/lab.sh                  pytest -m rdma tests/rdma inside the VM
#   sudo deploy/rdma-lab/lab.sh -- CMD [ARGS]    run CMD in /opt/hft/src inside the VM instead
#
# Exit status: the guest command's (capped to 0..126), or 125 when the lab itself failed
# (host set-up, guest set-up, qemu error, timeout). Environment: LAB_TIMEOUT_S (qemu wall-clock
# limit, default 900). Cache: .cache/rdma-lab/ (delete it to rebuild everything). See README.md.
set -euo pipefail

LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$LAB_DIR/../.." && pwd)"
CACHE="$REPO/.cache/rdma-lab"
TIMEOUT_S="${LAB_TIMEOUT_S:-900}"
LAB_FAIL=125
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

# What goes into the guest. Each list is part of its cache key.
ROOTFS_PACKAGES=(rdma-core ibverbs-providers python3-pyverbs ibverbs-utils rdmacm-utils perftest
                 iproute2 kmod procps)
KERNEL_MODULES=(rdma_rxe rdma_ucm ib_uverbs veth crc32_generic crc32_pclmul)
GUEST_PY_EXTRA=(pytest hypothesis)
DEFAULT_CMD=(python3 -m pytest -m rdma tests/rdma -p no:cacheprovider -o addopts= --strict-markers
             -ra -v)

say() { printf 'lab: %s\n' "$*" >&2; }
die() { say "error: $*"; exit "$LAB_FAIL"; }
# failed WHAT LOG: name the failed step and its log, show the log's tail, exit 125.
failed() {
    say "error: $1 failed; see $2"
    tail -n 40 "$2" 2>/dev/null | sed 's/^/lab: | /' >&2 || true
    exit "$LAB_FAIL"
}
# Logs live inside the repository (gitignored): host names of URLs and of the package sources
# this machine is configured with are masked before anything is written there.
MASK_SED=(-e 's#([a-z][a-z0-9+.-]*://)([^/@ ]*@)?[^/ :"'"'"']+#\1<host>#g')
add_masked_hosts() {  # add_masked_hosts < TEXT: mask every host named in a URL in TEXT
    local h
    while read -r h; do MASK_SED+=(-e "s#${h//./\\.}#<host>#g"); done < <(
        grep -oE '[a-z][a-z0-9+.-]*://[^/ "'"'"']+' | sed -E 's#^[^:]*://##; s#^.*@##; s#:[0-9]+$##' \
            | grep -E '^[A-Za-z0-9.-]+[.][A-Za-z]+$' | sort -u)
}
mask_hosts() { sed -E "${MASK_SED[@]}"; }
# run_logged LOG CMD...: run CMD, append its output (hosts masked) to LOG, return CMD's status.
run_logged() {
    local log=$1 rc=0
    shift
    "$@" >"$TMP/step.out" 2>&1 || rc=$?
    mask_hosts <"$TMP/step.out" >>"$log"
    rm -f "$TMP/step.out"
    return "$rc"
}
now() { date +%s; }
key_of() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

GUEST_CMD=("${DEFAULT_CMD[@]}")
if [ $# -gt 0 ]; then
    case "$1" in
        --) shift; [ $# -gt 0 ] || usage; GUEST_CMD=("$@") ;;
        -h|--help) usage ;;
        *) say "unknown argument '$1' (a guest command goes after --)"; usage ;;
    esac
fi
case "$TIMEOUT_S" in ''|*[!0-9]*|0) die "LAB_TIMEOUT_S must be a positive number of seconds, not '$TIMEOUT_S'" ;; esac
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and the kernel modules need it): sudo $0"

# ---------------------------------------------------------------------------------------------
# Cleanup: temp dir, mounts left by an interrupted debootstrap, a running qemu.
TMP=""
QEMU_PID=""
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        findmnt -rn -o TARGET | grep -F "$TMP/" | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null
        done
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another lab run holds $CACHE/.lock; waiting for it"
    flock -w 1800 9 || die "could not lock $CACHE/.lock within 30 minutes"
fi
rm -rf "$CACHE"/tmp.*     # left by a run that was killed (we hold the lock, so none is live)
TMP="$(mktemp -d "$CACHE/tmp.XXXXXX")"
T_START=$(now)

# ---------------------------------------------------------------------------------------------
# 1. Host tools.
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    say "apt-get update"
    run_logged "$CACHE/apt.log" apt-get update -q || failed "apt-get update" "$CACHE/apt.log"
    APT_UPDATED=1
}

HOST_PY=""
if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -m pip --version >/dev/null 2>&1; then
    HOST_PY="$REPO/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    HOST_PY=python3
fi
add_masked_hosts < <(cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true
    [ -z "$HOST_PY" ] || "$HOST_PY" -m pip config list 2>/dev/null || true
    env | grep -iE '^(pip_|[a-z_]*proxy=)' || true)
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
command -v depmod >/dev/null 2>&1 || missing+=(kmod)
command -v zstd >/dev/null 2>&1 || missing+=(zstd)
command -v strip >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1 || missing+=(binutils)
command -v git >/dev/null 2>&1 || missing+=(git)
[ -n "$HOST_PY" ] || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    t=$(now)
    say "installing ${missing[*]}"
    run_logged "$CACHE/apt.log" apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || failed "apt-get install ${missing[*]}" "$CACHE/apt.log"
    say "installed in $(( $(now) - t )) s"
    [ -n "$HOST_PY" ] || HOST_PY=python3
fi
"$HOST_PY" -c 'import tomllib' 2>/dev/null || die "$HOST_PY has no tomllib: the host needs Python 3.11+"

# ---------------------------------------------------------------------------------------------
# 2. The Debian mirror and suite, from the host's apt configuration.
# Prints "URI SUITE" for every deb entry serving main, in apt's order of files.
apt_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do
        [ -r "$f" ] || continue
        case "$f" in
        *.list)
            awk '{ sub(/#.*/, "") }
                 $1 == "deb" {
                     i = 2
                     if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                     uri = $i; suite = $(i + 1)
                     for (j = i + 2; j <= NF; j++) if ($j == "main") { print uri, suite; break }
                 }' "$f" ;;
        *.sources)
            awk 'function flush(   nu, ns, u, s, U, S) {
                     if (f["types"] ~ /(^| )deb( |$)/ && f["components"] ~ /(^| )main( |$)/ &&
                         tolower(f["enabled"]) !~ /^ *(no|false)/) {
                         nu = split(f["uris"], U, " "); ns = split(f["suites"], S, " ")
                         for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++) print U[u], S[s]
                     }
                     delete f; key = ""
                 }
                 /^#/ { next }
                 /^[ \t]*$/ { flush(); next }
                 /^[ \t]/ { if (key != "") f[key] = f[key] " " $0; next }
                 { c = index($0, ":"); if (!c) next
                   key = tolower(substr($0, 1, c - 1)); f[key] = substr($0, c + 1) }
                 END { flush() }' "$f" ;;
        esac
    done
}
# The file apt keeps a suite's InRelease in, for URI.
apt_release_file() {
    local p="${1#*://}"
    p="${p#*@}"
    p="${p%/}/dists/$2/InRelease"
    printf '/var/lib/apt/lists/%s' "${p//\//_}"
}
find_mirror() {  # prints "URI SUITE"; status 2 when apt's lists confirmed no candidate
    local codename="" uri suite first=""
    codename="$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")" || true
    while read -r uri suite; do
        case "$uri" in http://*|https://*|ftp://*|file:/*) ;; *) continue ;; esac
        case "$uri $suite" in *security*) continue ;; esac
        case "$suite" in */*|*-*) continue ;; esac          # bookworm, not bookworm-updates
        [ -z "$codename" ] || [ "$suite" = "$codename" ] || continue
        # Prefer an entry that apt's lists show to be the Debian archive (not a vendor repository
        # that happens to have a 'main' component).
        if grep -qs '^Origin: Debian$' "$(apt_release_file "$uri" "$suite")"; then
            echo "$uri $suite"; return 0
        fi
        [ -n "$first" ] || first="$uri $suite"
    done < <(apt_entries)
    [ -n "$first" ] || return 1
    echo "$first"
    return 2
}
rc=0; MIRROR_LINE="$(find_mirror)" || rc=$?
if [ "$rc" -eq 2 ] && [ "$APT_UPDATED" = 0 ]; then   # no lists yet to tell Debian's entry apart
    apt_update_once
    rc=0; MIRROR_LINE="$(find_mirror)" || rc=$?
fi
[ -n "$MIRROR_LINE" ] \
    || die "no Debian archive entry serving 'main' in /etc/apt/sources.list or /etc/apt/sources.list.d/"
read -r MIRROR SUITE <<<"$MIRROR_LINE"
[ "$SUITE" = bookworm ] || say "warning: the host's suite is '$SUITE'; the lab was made for bookworm"
# debootstrap fetches with wget: give it apt's proxy if apt has one.
if [ -z "${http_proxy:-}" ]; then
    eval "$(apt-config shell http_proxy Acquire::http::Proxy)"
    [ -z "${http_proxy:-}" ] || export http_proxy
fi

# ---------------------------------------------------------------------------------------------
# 3. Cached parts: rootfs, kernel + modules, Python packages. Each is built in $TMP and moved into
# the cache when complete; the key of each part covers its inputs and the function that builds it.
pack_cpio() {  # pack_cpio DIR OUT LEVEL: DIR's contents as a zstd-compressed newc cpio
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        | zstd -q -T0 "-$3" -o "$2"
}
prune() {  # prune PREFIX KEY: remove the cache entries PREFIX-* whose names lack KEY
    local p
    for p in "$CACHE/$1"-*; do
        case "$p" in *"$2"*) ;; *) [ ! -e "$p" ] || rm -rf "$p" ;; esac
    done
}

build_rootfs() {  # build_rootfs OUT.cpio.zst OUT.env
    local dir="$TMP/rootfs" log="$CACHE/debootstrap.log" includes
    includes="$(IFS=,; echo "${ROOTFS_PACKAGES[*]}")"
    : >"$log"
    if ! run_logged "$log" debootstrap --variant=minbase --include="$includes" "$SUITE" "$dir" \
            "$MIRROR" || [ ! -x "$dir/usr/bin/python3" ]; then
        [ -f "$dir/debootstrap/debootstrap.log" ] && mask_hosts <"$dir/debootstrap/debootstrap.log" >>"$log"
        failed debootstrap "$log"
    fi
    # Smaller image (the guest boots faster): no docs, man pages, translations, apt caches, udev
    # hardware database, iconv modules. The byte-code stays: without it every Python start in the
    # emulated guest compiles its imports again (numpy + pytest + hypothesis: 30 s instead of 9 s).
    rm -rf "$dir"/usr/share/{doc,man,info,locale,lintian,linda,bash-completion} \
        "$dir"/usr/share/misc/pci.ids "$dir"/usr/lib/udev/hwdb.* "$dir"/usr/lib/x86_64-linux-gnu/gconv \
        "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/var/log/* "$dir"/var/cache/debconf/*-old
    local py glibc
    py="$(readlink "$dir/usr/bin/python3")"; py="${py#python}"
    glibc="$(dpkg-query --admindir="$dir/var/lib/dpkg" -W -f='${Version}' libc6)"
    glibc="$(echo "$glibc" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')"
    printf 'GUEST_PY=%s\nGUEST_GLIBC=%s\n' "$py" "$glibc" >"$2.tmp"
    pack_cpio "$dir" "$1.tmp" 15
    rm -rf "$dir"
    mv "$2.tmp" "$2"; mv "$1.tmp" "$1"
}

build_kernel() {  # build_kernel OUTDIR: OUTDIR/vmlinuz, [OUTDIR/vmlinux.zst], OUTDIR/modules.cpio.zst
    local work="$TMP/kernel" log="$CACHE/kernel.log" m path
    # usr/lib/modules: the bookworm rootfs has merged /usr (/lib -> usr/lib), and a 'lib' directory
    # in a later initramfs part would replace that symlink.
    mkdir -p "$work/x" "$work/out/usr/lib/modules/$KVER" "$1.tmp"
    : >"$log"
    if ! run_logged "$log" env -C "$work" apt-get download -q -o APT::Sandbox::User=root "$KPKG"; then
        apt_update_once
        run_logged "$log" env -C "$work" apt-get download -q -o APT::Sandbox::User=root "$KPKG" \
            || failed "apt-get download $KPKG" "$log"
    fi
    dpkg -x "$work"/"$KPKG"_*.deb "$work/x" >>"$log" 2>&1 || failed "dpkg -x $KPKG" "$log"
    local src="$work/x/lib/modules/$KVER" dst="$work/out/usr/lib/modules/$KVER"
    [ -d "$src" ] || src="$work/x/usr/lib/modules/$KVER"
    local base="${src%/lib/modules/$KVER}"
    depmod -b "$base" "$KVER" >>"$log" 2>&1 || failed "depmod (full tree)" "$log"
    for m in "${KERNEL_MODULES[@]}"; do
        modprobe -d "$base" -S "$KVER" --show-depends "$m" >>"$work/deps" 2>>"$log" \
            || failed "module closure of $m" "$log"
    done
    awk '$1 == "insmod" { print $2 }' "$work/deps" | sort -u | while read -r path; do
        mkdir -p "$dst/$(dirname "${path#"$src"/}")"
        cp "$path" "$dst/${path#"$src"/}"
    done
    cp "$src"/modules.order "$src"/modules.builtin* "$dst"/
    rm -f "$dst"/*.bin
    depmod -b "$work/out/usr" "$KVER" >>"$log" 2>&1 || failed "depmod (lab modules)" "$log"
    cp "$work/x/boot/vmlinuz-$KVER" "$1.tmp/vmlinuz"
    # The uncompressed ELF kernel boots through its PVH entry about 4 s sooner under TCG than the
    # xz-compressed bzImage (which decompresses itself in the emulated CPU). Optional.
    if "$HOST_PY" - "$1.tmp/vmlinuz" "$work/vmlinux" >>"$log" 2>&1 <<'PY'; then
import lzma, sys
data = open(sys.argv[1], "rb").read()
elf = lzma.LZMADecompressor().decompress(data[data.index(b"\xfd7zXZ\x00"):])
assert elf[:4] == b"\x7fELF", "not an ELF image"
open(sys.argv[2], "wb").write(elf)
PY
        zstd -q -T0 -9 "$work/vmlinux" -o "$1.tmp/vmlinux.zst"
    else
        echo "no ELF kernel extracted from vmlinuz; the lab boots the bzImage" >>"$log"
    fi
    pack_cpio "$work/out" "$1.tmp/modules.cpio.zst" 15
    rm -rf "$work"
    mv "$1.tmp" "$1"
}

compile_pyc() {  # compile_pyc DIR: byte-code the guest can use, if the host's Python is the guest's
    # unchecked-hash: valid whatever the files' times; the guest never writes byte-code.
    if [ "$("$HOST_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$GUEST_PY" ]; then
        "$HOST_PY" -m compileall -q -j0 --invalidation-mode unchecked-hash "$1" >/dev/null 2>&1 || true
    fi
}

build_site() {  # build_site OUT.cpio.zst: the project's dependencies for the guest's Python
    local dir="$TMP/site" log="$CACHE/pip.log" plats=() i
    # manylinux wheels for the guest's glibc and older, e.g. manylinux_2_36 .. manylinux_2_5.
    for ((i = ${GUEST_GLIBC#*.}; i >= 5; i--)); do plats+=(--platform "manylinux_2_${i}_x86_64"); done
    plats+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    mkdir -p "$dir/opt/hft"
    : >"$log"
    run_logged "$log" "$HOST_PY" -m pip install -q --disable-pip-version-check --no-compile \
        --no-warn-script-location --target "$dir/opt/hft/site" --only-binary=:all: \
        --implementation cp --python-version "$GUEST_PY" --abi "cp${GUEST_PY/./}" "${plats[@]}" \
        "${PY_DEPS[@]}" "${GUEST_PY_EXTRA[@]}" || failed "pip install --target (guest Python packages)" "$log"
    # Smaller image: no scripts, no test suites of the packages, no debug info.
    rm -rf "$dir/opt/hft/site/bin"
    find "$dir" -name tests -type d -prune -exec rm -rf {} +
    find "$dir" -name '*.so*' -type f | while read -r f; do
        if readelf -S "$f" 2>/dev/null | grep -q '[.]debug_info'; then
            strip --strip-debug "$f" 2>>"$log" || true
        fi
    done
    compile_pyc "$dir/opt/hft/site"
    pack_cpio "$dir" "$1.tmp" 15
    rm -rf "$dir"
    mv "$1.tmp" "$1"
}

# rootfs
ROOTFS_KEY="$(key_of "$SUITE" "${ROOTFS_PACKAGES[@]}" "$(declare -f build_rootfs pack_cpio)")"
ROOTFS="$CACHE/rootfs-$ROOTFS_KEY.cpio.zst"
if [ ! -f "$ROOTFS" ] || [ ! -f "$CACHE/rootfs-$ROOTFS_KEY.env" ]; then
    t=$(now)
    say "building the guest rootfs (debootstrap $SUITE, about 80 s; log: $CACHE/debootstrap.log)"
    build_rootfs "$ROOTFS" "$CACHE/rootfs-$ROOTFS_KEY.env"
    prune rootfs "$ROOTFS_KEY"
    say "rootfs built in $(( $(now) - t )) s ($(du -h "$ROOTFS" | cut -f1))"
fi
# shellcheck disable=SC1090
. "$CACHE/rootfs-$ROOTFS_KEY.env"
[ -n "${GUEST_PY:-}" ] && [ -n "${GUEST_GLIBC:-}" ] || die "bad $CACHE/rootfs-$ROOTFS_KEY.env; delete $CACHE"

# kernel: the version the host's linux-image-amd64 depends on
kernel_pkg() {
    { apt-cache depends linux-image-amd64 2>/dev/null || true; } \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && !p { print $2; p = 1 }'
}
KPKG="$(kernel_pkg)"
if [ -z "$KPKG" ]; then apt_update_once; KPKG="$(kernel_pkg)"; fi
[ -n "$KPKG" ] || die "apt-cache depends linux-image-amd64 names no linux-image-<version> package"
KVER="${KPKG#linux-image-}"
KERNEL_KEY="$KVER-$(key_of "${KERNEL_MODULES[@]}" "$(declare -f build_kernel pack_cpio)")"
KERNEL_DIR="$CACHE/kernel-$KERNEL_KEY"
if [ ! -d "$KERNEL_DIR" ]; then
    t=$(now)
    say "fetching kernel $KVER and its RDMA modules (log: $CACHE/kernel.log)"
    build_kernel "$KERNEL_DIR"
    prune kernel "$KERNEL_KEY"
    say "kernel ready in $(( $(now) - t )) s"
fi

# Python packages: the project's runtime dependencies plus the test tools
mapfile -t PY_DEPS < <("$HOST_PY" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"].get("dependencies", [])))' "$REPO/pyproject.toml") \
    || die "could not read [project].dependencies from $REPO/pyproject.toml"
SITE_KEY="$(key_of "$GUEST_PY" "$GUEST_GLIBC" "${PY_DEPS[@]}" "${GUEST_PY_EXTRA[@]}" \
    "$(declare -f build_site compile_pyc pack_cpio)")"
SITE="$CACHE/site-$SITE_KEY.cpio.zst"
if [ ! -f "$SITE" ]; then
    t=$(now)
    say "installing the guest's Python packages for CPython $GUEST_PY (log: $CACHE/pip.log)"
    build_site "$SITE"
    prune site "$SITE_KEY"
    say "Python packages ready in $(( $(now) - t )) s ($(du -h "$SITE" | cut -f1))"
fi

# ---------------------------------------------------------------------------------------------
# 4. This run: the project's working tree, /init and the command, then boot.
RUN="$TMP/run"
mkdir -p "$RUN/opt/hft/src"
git -c safe.directory="$REPO" -C "$REPO" ls-files -z -co --exclude-standard >"$TMP/files" \
    || die "git ls-files failed in $REPO"
while IFS= read -r -d '' f; do
    case "$f" in .cache/*|.venv/*) continue ;; esac
    if [ -e "$REPO/$f" ] || [ -L "$REPO/$f" ]; then printf '%s\0' "$f"; fi
done <"$TMP/files" | (cd "$REPO" && cpio -0 -pdm --quiet "$RUN/opt/hft/src") \
    || die "copying the working tree into the image failed"

{
    echo '#!/bin/bash'
    echo 'cd /opt/hft/src || exit 125'
    printf 'exec'; printf ' %q' "${GUEST_CMD[@]}"; echo
} >"$RUN/opt/hft/lab-command"
compile_pyc "$RUN/opt/hft/src"
chmod 755 "$RUN/opt/hft/lab-command"

cat >"$RUN/init" <<'EOF'
#!/bin/bash
# /init of the Soft-RoCE lab guest (written by deploy/rdma-lab/lab.sh).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
say() { echo "lab-guest: $*"; }
# report N: qemu's isa-debug-exit (port 0xf4) makes qemu exit with 2N+1; power off if it did not.
report() {
    say "exit status $1"
    printf "\\$(printf %03o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 30
}
setup() { "$@" || { say "set-up failed: $*"; report 125; }; }

setup mount -t proc proc /proc
setup mount -t sysfs sysfs /sys
setup mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
setup mount -t devpts devpts /dev/pts
setup mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
setup mount -t tmpfs -o mode=1777 tmpfs /tmp
setup mount -t tmpfs -o mode=755 tmpfs /run
hostname rdma-lab
say "/init started after $(cut -d' ' -f1 /proc/uptime) s of uptime"

# rxe asks the crypto layer for crc32, which modules.dep does not list: load it first.
setup modprobe crc32_generic
modprobe crc32_pclmul 2>/dev/null || true
for m in rdma_rxe rdma_ucm ib_uverbs veth; do setup modprobe "$m"; done

setup ip link set lo up
setup ip link add veth0 type veth peer name veth1
setup ip addr add 10.99.0.1/24 dev veth0
setup ip addr add 10.99.0.2/24 dev veth1
setup ip link set veth0 up
setup ip link set veth1 up
# Both rxe devices share one namespace: traffic to the peer's (local) address must leave through
# the veth, not lo. Accept local source addresses and route via table 100 for locally made packets.
for i in all default lo veth0 veth1; do
    echo 1 >/proc/sys/net/ipv4/conf/$i/accept_local
    echo 0 >/proc/sys/net/ipv4/conf/$i/rp_filter
done
setup ip route add 10.99.0.2 dev veth0 src 10.99.0.1 table 100
setup ip route add 10.99.0.1 dev veth1 src 10.99.0.2 table 100
setup ip rule add pref 10 iif lo lookup 100
setup ip rule add pref 1000 lookup local
setup ip rule del pref 0 lookup local
setup rdma link add rxe0 type rxe netdev veth0
setup rdma link add rxe1 type rxe netdev veth1

# Wait (up to 20 s) for both ports to be ACTIVE with the IPv4 GID at index 1.
n=0
while :; do
    ok=1
    for d in rxe0 rxe1; do
        grep -q ACTIVE /sys/class/infiniband/$d/ports/1/state 2>/dev/null || ok=0
        grep -q ':ffff:0a63:' /sys/class/infiniband/$d/ports/1/gids/1 2>/dev/null || ok=0
    done
    [ $ok = 1 ] && break
    n=$((n + 1))
    if [ $n -ge 40 ]; then say "set-up failed: rxe ports not ACTIVE with GID index 1"; rdma link; report 125; fi
    sleep 0.5
done
rdma link
ibv_devices
for d in rxe0 rxe1; do say "$d gid[1] $(cat /sys/class/infiniband/$d/ports/1/gids/1)"; done
say "ready after $(cut -d' ' -f1 /proc/uptime) s of uptime; running: $(tail -n 1 /opt/hft/lab-command | cut -c6-)"

ulimit -l unlimited
export HOME=/tmp LANG=C.UTF-8 TERM=dumb COLUMNS=120 \
    PYTHONPATH=/opt/hft/src:/opt/hft/site PYTHONDONTWRITEBYTECODE=1 \
    HFT_RDMA_LAB=1 HFT_RDMA_SERVER_DEVICE=rxe0 HFT_RDMA_CLIENT_DEVICE=rxe1 HFT_RDMA_GID_INDEX=1 \
    HFT_RDMA_SERVER_ADDR=10.99.0.1 HFT_RDMA_CLIENT_ADDR=10.99.0.2
cd /opt/hft/src
/opt/hft/lab-command </dev/null
rc=$?
[ $rc -le 126 ] || rc=126
say "command finished after $(cut -d' ' -f1 /proc/uptime) s of uptime"
report $rc
EOF
chmod 755 "$RUN/init"
# The initramfs goes to qemu uncompressed: under TCG the guest kernel unpacks the ~225 MB of plain
# cpio in about 5 s, and took about 15 s for the same parts compressed with zstd.
zstd -q -d -c "$ROOTFS" "$KERNEL_DIR/modules.cpio.zst" "$SITE" >"$TMP/initrd" \
    || die "decompressing the cached image parts failed (delete $CACHE to rebuild them)"
(cd "$RUN" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >>"$TMP/initrd"
KERNEL="$KERNEL_DIR/vmlinuz"
if [ -f "$KERNEL_DIR/vmlinux.zst" ]; then
    zstd -q -d "$KERNEL_DIR/vmlinux.zst" -o "$TMP/vmlinux" && KERNEL="$TMP/vmlinux"
fi
say "image ready after $(( $(now) - T_START )) s ($(du -h "$TMP/initrd" | cut -f1) initramfs); booting (timeout ${TIMEOUT_S} s)"

# ---------------------------------------------------------------------------------------------
# 5. Boot. The serial console goes to stdout and to $CACHE/console.log. '-display none' rather than
# '-nographic': the latter turns on the BIOS's serial console, which resets the caller's terminal.
CONSOLE="$CACHE/console.log"
t=$(now)
timeout -k 10 "$TIMEOUT_S" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
    -display none -vga none -no-reboot -nic none -monitor none \
    -chardev "stdio,id=console,signal=on,logfile=$CONSOLE" -serial chardev:console \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$KERNEL" -initrd "$TMP/initrd" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init" </dev/null &
QEMU_PID=$!
rc=0
wait "$QEMU_PID" || rc=$?
QEMU_PID=""
secs=$(( $(now) - t ))

if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    die "qemu timed out after $TIMEOUT_S s (LAB_TIMEOUT_S); console log: $CONSOLE"
fi
# An odd status is 2N+1 from the guest's isa-debug-exit write, if the guest also said so: qemu's
# own errors exit with 1.
if [ $((rc % 2)) -eq 1 ]; then
    n=$(( (rc - 1) / 2 ))
    if [ "$(grep -ao 'lab-guest: exit status [0-9]*' "$CONSOLE" | tail -n 1)" = "lab-guest: exit status $n" ]; then
        if grep -aq 'lab-guest: set-up failed' "$CONSOLE"; then
            die "the guest's set-up failed (see 'lab-guest: set-up failed' above; console log: $CONSOLE)"
        fi
        say "guest command exited with status $n (VM ran $secs s, total $(( $(now) - T_START )) s)"
        exit "$n"
    fi
fi
die "qemu exited with status $rc without a result from the guest (qemu error, kernel panic or /init died; console log: $CONSOLE)"
