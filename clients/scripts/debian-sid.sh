# shellcheck shell=bash
# Run editors from Debian sid on an older Debian/Ubuntu without installing
# them: `apt-get download` the packages and their dependency closure from
# sid, unpack them under one root, and start their binaries through sid's
# own dynamic loader with sid's libraries (sid's glibc is newer than the
# host's, so the host loader cannot run them).
#
#   source clients/scripts/debian-sid.sh
#   sid_fetch neovim            # once; cached under $EXLSP_SID_DIR
#   sid_run /usr/bin/nvim --version
#
# Needs apt-get and access to a Debian mirror ($EXLSP_SID_MIRROR). Nothing is
# installed on the host; the apt state lives in $EXLSP_SID_DIR too.

# EXLSP_DEBIAN_SUITE picks another suite the same way (e.g. trixie, for Neovim 0.10).
SID_SUITE=${EXLSP_DEBIAN_SUITE:-sid}
SID_DIR=${EXLSP_SID_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/exlsp-$SID_SUITE}
SID_MIRROR=${EXLSP_SID_MIRROR:-http://deb.debian.org/debian}
SID_ROOT=$SID_DIR/root

sid_apt() {
  APT_CONFIG=$SID_DIR/apt.conf "$@"
}

sid_init() {
  mkdir -p "$SID_DIR/lists/partial" "$SID_DIR/cache/archives/partial" "$SID_DIR/debs" "$SID_ROOT"
  cat >"$SID_DIR/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $SID_MIRROR $SID_SUITE main
EOF
  cat >"$SID_DIR/apt.conf" <<EOF
Dir::Etc::SourceList "$SID_DIR/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$SID_DIR/lists";
Dir::State::Status "$SID_DIR/status";
Dir::Cache "$SID_DIR/cache";
APT::Architecture "amd64";
APT::Sandbox::User "$(id -un)";
EOF
  touch "$SID_DIR/status"
  # Refresh the package lists at most once a day.
  if [ -z "$(find "$SID_DIR/lists" -name '*_Packages' -mtime -1 2>/dev/null)" ]; then
    sid_apt apt-get update -qq
  fi
}

# sid_fetch PACKAGE...: download the packages and everything they depend on,
# unpack each once into $SID_ROOT.
sid_fetch() {
  sid_init
  local pkgs
  pkgs=$(sid_apt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "$@" | grep -E '^[a-z0-9]' | sort -u)
  (
    cd "$SID_DIR/debs" || exit 1
    local p
    for p in $pkgs; do
      if ! compgen -G "${p}_*.deb" >/dev/null; then
        sid_apt apt-get download -qq "$p" || echo "sid: could not download $p" >&2
      fi
    done
    local deb
    for deb in *.deb; do
      if [ ! -e "$deb.unpacked" ]; then
        dpkg-deb -x "$deb" "$SID_ROOT" && touch "$deb.unpacked"
      fi
    done
  )
}

sid_loader() {
  local ld
  for ld in "$SID_ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
    "$SID_ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
    "$SID_ROOT/usr/lib64/ld-linux-x86-64.so.2"; do
    if [ -e "$ld" ]; then
      echo "$ld"
      return 0
    fi
  done
  echo "sid: no dynamic loader under $SID_ROOT (sid_fetch libc6 first)" >&2
  return 1
}

# sid_run /usr/bin/PROGRAM ARGS...: run a sid binary with sid's loader and libraries.
sid_run() {
  local bin=$1
  shift
  local libs="$SID_ROOT/usr/lib/x86_64-linux-gnu:$SID_ROOT/lib/x86_64-linux-gnu:$SID_ROOT/usr/lib"
  "$(sid_loader)" --library-path "$libs" "$SID_ROOT$bin" "$@"
}

# sid_wrapper NAME /usr/bin/PROGRAM [VAR=VALUE...]: write an executable
# $SID_DIR/bin/NAME that runs the program (for tools that exec an editor by
# name, e.g. tmux).
sid_wrapper() {
  local name=$1 bin=$2
  shift 2
  mkdir -p "$SID_DIR/bin"
  {
    echo '#!/usr/bin/env bash'
    local kv
    for kv in "$@"; do
      printf 'export %q\n' "$kv"
    done
    printf 'exec %q --library-path %q %q "$@"\n' "$(sid_loader)" \
      "$SID_ROOT/usr/lib/x86_64-linux-gnu:$SID_ROOT/lib/x86_64-linux-gnu:$SID_ROOT/usr/lib" \
      "$SID_ROOT$bin"
  } >"$SID_DIR/bin/$name"
  chmod +x "$SID_DIR/bin/$name"
  echo "$SID_DIR/bin/$name"
}
