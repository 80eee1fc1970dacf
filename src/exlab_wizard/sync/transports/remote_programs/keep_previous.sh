# Keeping the verified files a push is about to replace: arguments <remote root> <run folder>
# <previous folder> <new|again> <path>...; each regular file <run>/<path> (no symlink on the way)
# is moved to <previous>/<path> unless something is there already (never overwritten). "new": the
# round's first keep there, so a <previous> folder that exists is an earlier round's: exit 5,
# nothing moved. Prints the marker line, then "<path>\0" for each path now kept there; exit 3 when
# the root is missing, 4 when a move fails. The moves are made durable (sync -f) before it exits: 6
# when no sync works there (missing, or failing: EIO or ENOSPC of a thin volume whose pool is full).

echo exlab-keep
root=$1 run=$2 keep=$3 mode=$4
shift 4
[ -d "$root" ] || exit 3
if [ "$mode" = new ] && { [ -e "$keep" ] || [ -L "$keep" ]; }; then exit 5; fi
plain() {  # is every folder from $run down to the parent of $1 a real folder?
    dir=$run rest=$1
    [ -d "$dir" ] && [ ! -L "$dir" ] || return 1
    while case $rest in */*) true;; *) false;; esac; do
        dir=$dir/${rest%%/*} rest=${rest#*/}
        [ -d "$dir" ] && [ ! -L "$dir" ] || return 1
    done
}
moved=
for rel do
    dst=$keep/$rel
    if [ -e "$dst" ] || [ -L "$dst" ]; then
        [ -f "$dst" ] && [ ! -L "$dst" ] && printf '%s\0' "$rel"
        continue
    fi
    plain "$rel" && [ -f "$run/$rel" ] && [ ! -L "$run/$rel" ] || continue
    mkdir -p -- "${dst%/*}" && mv -- "$run/$rel" "$dst" || exit 4
    printf '%s\0' "$rel"
    moved=1
done
# sync -f; a whole sync (which reports no error) only where sync has no -f or the kernel no syncfs
if [ -n "$moved" ]; then
    _e=$(LC_ALL=C sync -f -- "$keep" 2>&1) || case $_e in
        *option*|*"not implemented"*|*"Invalid argument"*) sync || exit 6;;
        *) printf '%s\n' "$_e" >&2; exit 6;;
    esac
fi
exit 0
