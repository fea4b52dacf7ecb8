"""Run real nbdkit with the cow engine as its python plugin.

    python -m cow.nbdkit --print-plugin-path
    python -m cow.nbdkit [nbdkit options] BACKING [cow-block-size=N] [cow-on-read=...] [cow-on-cache=...]
                         [overlay=FILE [overlay-backing-changed=accept]]
                         [overlay-dir=DIR [max-exports=N]]   (a view per export name)

BACKING is a file or device path, an NBD URI (nbd://, nbds://, nbd+unix://...), or an explicit
file=PATH / uri=URI; with overlay=FILE it may be left out (FILE records it).  nbdkit options (-f, -U SOCKET, -r, --run CMD, --filter=NAME, ...) may come before
or after it, as with nbdkit itself.  The second form replaces this process with

    nbdkit [nbdkit options] [--threads=N] python PLUGIN-PATH file=BACKING|uri=BACKING [cow-*=...]

--threads (nbdkit's threads per connection) is added unless given: DEFAULT_THREADS says why.
"""

import os
import re
import shutil
import sys

PLUGIN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdkit_plugin.py")

# nbdkit(1) options that take a value (in the next word unless given as -Xvalue / --name=value).
_SHORT_WITH_VALUE = set("DegiPptUu")
_LONG_WITH_VALUE = {
    "debug", "exportname", "export", "export-name", "filter", "group", "ipaddr", "ip-addr", "log",
    "mask-handshake", "pidfile", "pid-file", "port", "run", "selinux-label", "threads", "tls",
    "tls-certificates", "tls-psk", "unix", "user",
}
_BACKING_KEYS = ("file=", "uri=")

# nbdkit's threads per connection when the command line gives none (nbdkit's own default is 16).
# Every request runs Python under one GIL.  With a file backing a request takes microseconds, and
# more threads only queue for the GIL: -t 1 serves each connection on its own thread with no
# hand-off and measured fastest (README.md, "Inside nbdkit"; bench/README.md).  A request to an
# NBD backing waits on the network with the GIL released, so there each thread can keep a backing
# read in flight: nbdkit's default.
DEFAULT_THREADS = {"file": 1, "uri": 16}
_PARAM = re.compile(r"[A-Za-z_][\w.-]*=")  # key=value, as nbdkit tells them from a bare value

USAGE = ("usage: python -m cow.nbdkit --print-plugin-path\n"
         "       python -m cow.nbdkit [nbdkit options] BACKING [cow-block-size=N] "
         "[cow-on-read=false|true|/PATH] [cow-on-cache=false|true] [overlay=FILE | "
         "overlay-dir=DIR]\n"
         "       python -m cow.nbdkit [nbdkit options] overlay=FILE [...]   (FILE records BACKING)")


class UsageError(Exception):
    pass


def split_arguments(argv):
    """Split argv into (nbdkit options, plugin parameters); the parameters start with the backing."""
    options, params, _ = parse_arguments(argv)
    return options, params


def parse_arguments(argv):
    """(nbdkit options, plugin parameters, names of the nbdkit options given: "threads", "t"...)."""
    options, params, names = [], [], set()
    backing = None
    words = len(argv)       # from "--" on: the backing and parameters, never an option
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--" and words == len(argv):
            words = i
        elif i <= words and arg.startswith("--") and len(arg) > 2:
            options.append(arg)
            name = arg[2:].split("=", 1)[0]
            names.add(name)
            if "=" not in arg and name in _LONG_WITH_VALUE:
                if i == len(argv):
                    raise UsageError(f"option {arg} needs a value")
                options.append(argv[i])
                i += 1
        elif i <= words and arg.startswith("-") and len(arg) > 1:
            options.append(arg)
            # A cluster such as -fv or -fU SOCKET: a letter taking a value ends the cluster.
            for j, letter in enumerate(arg[1:], start=1):
                names.add(letter)
                if letter in _SHORT_WITH_VALUE:
                    if j == len(arg) - 1:
                        if i == len(argv):
                            raise UsageError(f"option -{letter} needs a value")
                        options.append(argv[i])
                        i += 1
                    break
        elif arg.startswith(_BACKING_KEYS):
            if backing is not None:
                raise UsageError(f"more than one backing: {backing} and {arg}")
            backing = arg
        elif "://" not in arg and _PARAM.match(arg):
            params.append(arg)  # a key=value parameter for the plugin
        elif backing is not None and i > words:
            # cow.server's `-- COMMAND ARGS...`: the shim starts no backing command.
            raise UsageError(f"a backing command ({' '.join(argv[words:])}) is not taken here: "
                             f"serve it with python -m cow.server -- COMMAND, or run it yourself "
                             f"and give its NBD URI as BACKING")
        else:
            if backing is not None:
                raise UsageError(f"more than one backing: {backing} and {arg}")
            backing = ("uri=" if "://" in arg else "file=") + arg
    if backing is None:
        if not any(p.startswith("overlay=") for p in params):
            raise UsageError("no BACKING given")
        return options, params, names
    return options, [backing, *params], names


def nbdkit_command(argv, nbdkit="nbdkit"):
    """The nbdkit command line that serves argv's backing through the plugin."""
    options, params, names = parse_arguments(argv)
    if not names & {"t", "threads"}:
        options.append(f"--threads={DEFAULT_THREADS[_backing_kind(params)]}")
    return [nbdkit, *options, "python", PLUGIN_PATH, *params]


def _backing_kind(params):
    """"file" or "uri": the backing's parameter, or what an overlay= alone records."""
    key = params[0].split("=", 1)[0]
    if key in ("file", "uri"):
        return key
    overlay = next(p for p in params if p.startswith("overlay="))[len("overlay="):]
    try:
        from cow import overlayfile
        recorded = overlayfile.recorded_backing(overlay)
    except (OSError, ValueError):
        return "file"           # the plugin reports what is wrong with it
    return "file" if recorded.kind in (overlayfile.KIND_FILE, overlayfile.KIND_BLOCK_DEVICE) \
        else "uri"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["--print-plugin-path"], ["--plugin-path"]):
        print(PLUGIN_PATH)
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    try:
        cmd = nbdkit_command(argv)
    except UsageError as exc:
        print(f"cow.nbdkit: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    binary = shutil.which("nbdkit")
    if binary is None:
        print("cow.nbdkit: nbdkit is not installed (Debian: apt install nbdkit nbdkit-plugin-python)",
              file=sys.stderr)
        return 127
    os.execv(binary, cmd)


if __name__ == "__main__":
    sys.exit(main())
