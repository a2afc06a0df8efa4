#!/usr/bin/env bash
# Ensure a guest kernel with ublk support is downloaded and unpacked in the
# cache, then print the directory that holds it on stdout:
#
#   <dir>/vmlinuz          bootable kernel image
#   <dir>/version          kernel release (uname -r in the guest)
#   <dir>/package-version  Debian package version it came from
#   <dir>/config           kernel .config (if the package ships it)
#   <dir>/modules/*.ko     decompressed modules: configfs null_blk ublk_drv
#                          loop nbd tls gcm ctr (+ $UBLKD_VM_EXTRA_MODULES) and every
#                          module they depend on
#   <dir>/modules/modules.dep   "<name>.ko: <dep>.ko ..." one line per module
#
# The kernel comes from Debian's trixie-backports (metapackage
# linux-image-cloud-amd64), fetched with a private apt configuration so the
# host's apt state is never touched. The mirror is read from the host's own
# apt sources. Once cached, the script uses no network and returns at once.
#
# Usage: tests/vm/kernel.sh [--update]
#   --update   re-resolve the newest kernel in trixie-backports (network)
#
# Environment:
#   UBLKD_VM_CACHE          cache root (default /var/cache/ublkd-vm)
#   UBLKD_VM_DEBIAN_MIRROR  override the Debian mirror URI read from apt sources
#   UBLKD_VM_KERNEL_SUITE   default trixie-backports
#   UBLKD_VM_KERNEL_META    default linux-image-cloud-amd64
#   UBLKD_VM_EXTRA_MODULES  extra module names to extract (space separated)
set -euo pipefail

PROG=kernel.sh
CACHE=${UBLKD_VM_CACHE:-/var/cache/ublkd-vm}
SUITE=${UBLKD_VM_KERNEL_SUITE:-trixie-backports}
META=${UBLKD_VM_KERNEL_META:-linux-image-cloud-amd64}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# tls, gcm and ctr: kernel TLS with AES-GCM for the nbd target's TLS tests; veth: a
# server in another network namespace that looks remote (tests/src/remote_net.rs).
WANTED_MODULES=(configfs null_blk ublk_drv loop nbd tls gcm ctr veth)
# shellcheck disable=SC2206 # word splitting intended
WANTED_MODULES+=(${UBLKD_VM_EXTRA_MODULES:-})

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

usage() { sed -n '/^# Usage:/,/^#   --update/s/^# \{0,1\}//p' "$0" >&2; }

update=0
while (($#)); do
    case $1 in
        --update) update=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
    shift
done

KDIR_ROOT=$CACHE/kernel
CURRENT=$KDIR_ROOT/current

# kernel_dir_ok DIR: DIR holds a complete kernel with every wanted module
# (either extracted or built in).
kernel_dir_ok() {
    local m
    [[ -f $1/vmlinuz && -s $1/version && -f $1/modules/modules.dep ]] || return 1
    for m in "${WANTED_MODULES[@]}"; do
        m=${m//-/_}
        [[ -f $1/modules/$m.ko ]] && continue
        [[ -f $1/modules.builtin ]] && grep -qE "/${m//_/[-_]}\.ko\$" "$1/modules.builtin" && continue
        return 1
    done
}

# Fast path: cached, no network, no lock.
if ((update == 0)) && kernel_dir_ok "$CURRENT"; then
    readlink -f "$CURRENT"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb xz flock; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found; run tests/vm/setup-host.sh"
done

mkdir -p "$KDIR_ROOT" || die "cannot create cache dir $KDIR_ROOT (set UBLKD_VM_CACHE to a writable path)"
exec 9>"$CACHE/.lock"
flock -w 1800 9 || die "timed out waiting for the cache lock $CACHE/.lock"

# Another process may have filled the cache while we waited for the lock.
if ((update == 0)) && kernel_dir_ok "$CURRENT"; then
    readlink -f "$CURRENT"
    exit 0
fi

# --- find the Debian mirror in the host's apt sources ------------------------

# Prints "uri suites..." for every enabled binary ("deb") source entry.
list_apt_sources() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled !~ /^[Nn][Oo]$/)
                    for (i = 1; i <= nu; i++) print uris[i], suites
                types = ""; suites = ""; enabled = ""; nu = 0; last = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (last == "uris") { n = split($0, a, /[ \t]+/); for (j = 1; j <= n; j++) if (a[j] != "") uris[++nu] = a[j] }
                       else if (last == "suites") suites = suites " " $0
                       next }
            {
                key = tolower($0); sub(/:.*/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                last = key
                if (key == "types") types = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = val
                else if (key == "uris") { n = split(val, a, /[ \t]+/); for (j = 1; j <= n; j++) if (a[j] != "") uris[++nu] = a[j] }
            }
            END { flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # deb [opts] uri suite components...
        awk '
            $1 != "deb" { next }
            {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if (i + 1 <= NF) print $i, $(i + 1)
            }
        ' "$f"
    done
}

find_mirror() {
    local uri suites best="" fallback=""
    while read -r uri suites; do
        [[ -n $uri ]] || continue
        case $uri in http://*|https://*) ;; *) continue ;; esac
        # Skip security / debug / ports archives.
        [[ $uri == *security* || $suites == *-security* || $uri == *debug* || $uri == *ports* ]] && continue
        if [[ $uri =~ /debian/?$ ]]; then
            best=${uri%/}
            break
        fi
        [[ -n $fallback ]] || fallback=${uri%/}
    done < <(list_apt_sources)
    if [[ -n $best ]]; then
        printf '%s\n' "$best"
    elif [[ -n $fallback ]]; then
        printf '%s\n' "$fallback"
    fi
}

MIRROR=${UBLKD_VM_DEBIAN_MIRROR:-$(find_mirror)}
[[ -n $MIRROR ]] || die "could not find a Debian archive URI in /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set UBLKD_VM_DEBIAN_MIRROR"
[[ -r $KEYRING ]] || die "$KEYRING missing; install debian-archive-keyring (tests/vm/setup-host.sh)"

# --- private apt configuration ---------------------------------------------

APTDIR=$CACHE/apt
mkdir -p "$APTDIR/lists/partial" "$APTDIR/archives/partial" "$APTDIR/empty.d"
: >"$APTDIR/status"
printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$SUITE" >"$APTDIR/sources.list"

APT_OPTS=(
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::State::status=$APTDIR/status"
    -o "Dir::Etc::SourceList=$APTDIR/sources.list"
    -o "Dir::Etc::SourceParts=$APTDIR/empty.d"
    -o "Dir::Etc::Preferences=$APTDIR/empty.d/preferences"
    -o "Dir::Etc::PreferencesParts=$APTDIR/empty.d"
    -o "Dir::Cache::archives=$APTDIR/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "APT::Architecture=amd64"
    -o "APT::Architectures=amd64"
    -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none"
    -o "Acquire::Retries=3"
)

log "fetching $SUITE package lists from $MIRROR"
apt-get "${APT_OPTS[@]}" -qq update >&2 || die "apt-get update for $SUITE from $MIRROR failed (network?)"

# Prints the Depends of the candidate version of package $1, one package name
# per line (first alternative of each "a | b" group, version constraints dropped).
pkg_depends() {
    apt-cache "${APT_OPTS[@]}" show --no-all-versions "$1" 2>/dev/null \
        | awk '/^Depends:/ { sub(/^Depends:[ \t]*/, ""); n = split($0, d, /,[ \t]*/)
                for (i = 1; i <= n; i++) { split(d[i], alt, /[ \t]*\|[ \t]*/); sub(/[ \t(].*/, "", alt[1]); print alt[1] } }'
}
pkg_version() {
    apt-cache "${APT_OPTS[@]}" show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ { print $2; exit }'
}

IMAGE_PKG=$(pkg_depends "$META" | grep -E '^linux-image-[0-9]' | head -n1 || true)
[[ -n $IMAGE_PKG ]] || die "could not resolve the kernel image package from $META's Depends in $SUITE"
UNAME=${IMAGE_PKG#linux-image-}
PKG_VERSION=$(pkg_version "$IMAGE_PKG")
[[ -n $PKG_VERSION ]] || die "no candidate version for $IMAGE_PKG in $SUITE"
log "$META -> $IMAGE_PKG $PKG_VERSION"

if ((update == 1)) && kernel_dir_ok "$KDIR_ROOT/$UNAME"; then
    ln -sfn "$UNAME" "$CURRENT.tmp" && mv -T "$CURRENT.tmp" "$CURRENT"
    readlink -f "$CURRENT"
    exit 0
fi

# Packages that carry the files: the image package and its versioned
# dependencies (linux-binary-*, linux-modules-*, linux-base-* in 7.x; older
# layouts ship everything in linux-image-* itself).
PKGS=("$IMAGE_PKG")
while read -r dep; do
    [[ $dep == *"$UNAME"* ]] && PKGS+=("$dep")
done < <(pkg_depends "$IMAGE_PKG")

WORK=$(mktemp -d "$KDIR_ROOT/.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/x" "$WORK/out/modules"

log "downloading ${PKGS[*]}"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PKGS[@]}") >&2 \
    || die "apt-get download ${PKGS[*]} failed"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/x" || die "cannot unpack $deb"
done

MODROOT=""
for d in "$WORK/x/usr/lib/modules/$UNAME" "$WORK/x/lib/modules/$UNAME"; do
    if [[ -d $d/kernel ]]; then MODROOT=$d; break; fi
done
[[ -n $MODROOT ]] || die "no lib/modules/$UNAME/kernel in ${PKGS[*]}"

VMLINUZ=""
for f in "$WORK/x/usr/lib/modules/$UNAME/vmlinuz" "$WORK/x/lib/modules/$UNAME/vmlinuz" "$WORK/x/boot/vmlinuz-$UNAME"; do
    if [[ -f $f ]]; then VMLINUZ=$f; break; fi
done
[[ -n $VMLINUZ ]] || die "no vmlinuz found in ${PKGS[*]}"

cp "$VMLINUZ" "$WORK/out/vmlinuz"
for f in config modules.builtin; do
    if [[ -f $MODROOT/$f ]]; then cp "$MODROOT/$f" "$WORK/out/$f"; fi
done
if [[ ! -f $WORK/out/config && -f $WORK/x/boot/config-$UNAME ]]; then
    cp "$WORK/x/boot/config-$UNAME" "$WORK/out/config"
fi

# Index every module file by module name ("-" and "_" are equivalent).
declare -A MODFILE=()
while IFS= read -r -d '' f; do
    name=${f##*/}
    name=${name%%.ko*}
    MODFILE[${name//-/_}]=$f
done < <(find "$MODROOT/kernel" -name '*.ko*' -print0)

is_builtin() {
    [[ -f $MODROOT/modules.builtin ]] && grep -qE "/${1//_/[-_]}\.ko$" "$MODROOT/modules.builtin"
}

# Prints the value of a .modinfo key of a decompressed module.
modinfo_field() {
    tr '\0' '\n' <"$1" | grep -a -m1 "^$2=" | cut -d= -f2- || true
}

declare -A SEEN=()
: >"$WORK/out/modules/modules.dep"
extract_module() {
    local name=$1 src dst deps dep vermagic
    [[ -z ${SEEN[$name]:-} ]] || return 0
    SEEN[$name]=1
    src=${MODFILE[$name]:-}
    if [[ -z $src ]]; then
        is_builtin "$name" && { log "note: $name is built into the kernel"; return 0; }
        die "module $name not found in ${PKGS[*]}"
    fi
    dst=$WORK/out/modules/$name.ko
    case $src in
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) command -v zstd >/dev/null || die "zstd needed to unpack $src"; zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *.ko) cp "$src" "$dst" ;;
        *) die "unknown module compression: $src" ;;
    esac
    vermagic=$(modinfo_field "$dst" vermagic)
    [[ $vermagic == "$UNAME "* ]] || die "$name.ko has vermagic '$vermagic', expected $UNAME"
    deps=$(modinfo_field "$dst" depends)
    local line="$name.ko:"
    for dep in ${deps//,/ }; do
        dep=${dep//-/_}
        line+=" $dep.ko"
        extract_module "$dep"
    done
    printf '%s\n' "$line" >>"$WORK/out/modules/modules.dep"
}
for m in "${WANTED_MODULES[@]}"; do
    extract_module "${m//-/_}"
done

printf '%s\n' "$UNAME" >"$WORK/out/version"
printf '%s\n' "$PKG_VERSION" >"$WORK/out/package-version"

rm -rf "${KDIR_ROOT:?}/$UNAME"
mv -T "$WORK/out" "$KDIR_ROOT/$UNAME"
ln -sfn "$UNAME" "$CURRENT.tmp"
mv -T "$CURRENT.tmp" "$CURRENT"
log "cached $UNAME ($PKG_VERSION) in $KDIR_ROOT/$UNAME: $(cd "$KDIR_ROOT/$UNAME/modules" && echo *.ko)"
readlink -f "$CURRENT"
