"""Policy as plain data: limits, allowed programs and their options, the jail's file system view, denied calls.

Reviewers start here. Nothing in this file runs anything; the other modules read these tables.
"""

from __future__ import annotations

from typing import NamedTuple

# ---- limits ------------------------------------------------------------------------------------------------
# Per request. A request may ask for less, never for more than MAX_LIMITS. "Run" below means the whole process tree
# of one request: every process it forks is held to the same budget (one cgroup per run, cgroup.py), and each
# process is also held by an rlimit of its own (soft = hard, so nothing can raise it).
DEFAULT_LIMITS: dict[str, int | float] = {
    "wall_seconds": 5.0,  # the whole run is killed after this, whatever it is doing
    "cpu_seconds": 2,  # CPU time of the whole run (cgroup usage, checked by the sandbox); RLIMIT_CPU per process
    "memory_bytes": 256 << 20,  # memory of the whole run (cgroup, no swap, its tmpfs pages included); RLIMIT_AS
    "processes": 16,  # processes of the whole run at once (cgroup pids); RLIMIT_NPROC too
    "file_bytes": 8 << 20,  # RLIMIT_FSIZE: the largest file a run may write
    "open_files": 64,  # RLIMIT_NOFILE, per process
    "output_bytes": 64 << 10,  # stdout and stderr each: more is dropped and the run marked truncated
    "tmp_bytes": 16 << 20,  # size of the run's /tmp (a tmpfs of its own)
    "work_bytes": 16 << 20,  # size of the run's /work (a tmpfs of its own)
}
MAX_LIMITS: dict[str, int | float] = {
    "wall_seconds": 60.0,
    "cpu_seconds": 30,
    "memory_bytes": 1 << 30,
    "processes": 64,
    "file_bytes": 64 << 20,
    "open_files": 256,
    "output_bytes": 512 << 10,  # x2 streams, x6 for JSON escapes of control bytes: stays under MAX_FRAME_BYTES
    "tmp_bytes": 64 << 20,
    "work_bytes": 64 << 20,
}

MIN_LIMITS: dict[str, float] = {"wall_seconds": 0.1, "cpu_seconds": 1, "memory_bytes": 32 << 20, "processes": 1,
                                 "open_files": 16, "output_bytes": 1, "tmp_bytes": 1 << 20, "work_bytes": 1 << 20,
                                 "file_bytes": 1}  # fmt: skip

RUN_CPU_CORES = 1.0  # a run's processes together get at most this many cores' worth of time (cgroup CPU bandwidth)
TMPFS_INODES = 4096  # files and directories each of /work and /tmp may hold
FILES_QUOTA_BYTES = 64 << 20  # a bot's /files as a whole (bytes of files and directories), checked by every write
FILES_QUOTA_ENTRIES = 10_000  # files and directories in a bot's /files

MAX_FRAME_BYTES = 8 << 20  # the largest request or response frame on the pipes
MAX_LANES = 64  # runs one sandbox process holds at once (each in a lane: a process and a run cgroup of its own)
MAX_ARGV_BYTES = 64 << 10  # total size of a shell command's argv
MAX_SCRIPT_BYTES = 64 << 10  # largest custom script source
MAX_FILE_BYTES = 1 << 20  # largest file a file_operation reads or writes
MAX_LIST_ENTRIES = 1000  # entries returned by a file_operation "list"
MAX_PATH_CHARS = 1024  # a file_operation's path
MAX_PATH_DEPTH = 16  # directories in a file_operation's path

# ---- shell programs ----------------------------------------------------------------------------------------
# How a program reads its command line (shell.py parses the command exactly this way before anything runs):
GETOPT = "getopt"  # GNU getopt_long, permuting: options anywhere before "--", then operands
GETOPT_POSIX = "getopt+"  # getopt_long with "+": options only before the first operand
NO_OPTIONS = "none"  # no options; a leading "--" is skipped (printf, expr, true, false)
ECHO = "echo"  # coreutils echo: leading clusters of -n/-e/-E are options; "--" is printed, not skipped


class Program(NamedTuple):
    """One allowlisted program: where it is, the only options it may get, and the audit's verdict.

    ``short`` is a getopt optstring: a letter alone takes no argument, ``x:`` takes one (attached or the next
    element), ``x::`` an optional one (attached only). ``long`` lists long options spelled out in full: ``name``
    takes no argument, ``name=`` one (``--name=v`` or the next element), ``name[=]`` an optional one (``--name=v``).
    Abbreviations of long options are refused, so what the program sees is exactly what is listed here. Every
    parameter value fills an operand (or an option's argument), never an option: the command becomes
    ``program OPTIONS -- OPERANDS`` with one short option per element and its argument apart (``-rnk2`` is given as
    ``-r -n -k 2``, so no program's own reading of a cluster, such as tail's obsolete ``-cf`` "follow", applies);
    see ``shell.build_argv``. ``echo``, which has no ``--``, refuses a value it would read as an option.
    """

    path: str
    verdict: str
    short: str = ""
    long: tuple[str, ...] = ()
    syntax: str = GETOPT


# Only bare names are accepted; the path is fixed here, never looked up in PATH. Each verdict comes from the
# program's manual and source (coreutils 9.1, grep 3.8, util-linux 2.38): what an allowed option or operand can
# execute, write or read. None of the allowed options executes anything; writes land only where the jail lets a run
# write (/work and /tmp, tmpfs of capped size; /files is read-only for shell runs); reads see only the jail.
# fmt: off
SHELL_PROGRAMS: dict[str, Program] = {
    "echo": Program("/usr/bin/echo", "prints its arguments; nothing else", "neE", syntax=ECHO),
    "printf": Program(
        "/usr/bin/printf", "formats its arguments; no %n (coreutils refuses it); nothing else", syntax=NO_OPTIONS
    ),
    "date": Program(
        "/usr/bin/date",
        "prints and parses times. Refused: -s/--set (sets the clock). An operand other than +FORMAT asks to set the "
        "clock too and fails (no CAP_SYS_TIME; seccomp denies the calls). -f/--file and -r/--reference read a file",
        "d:f:I::r:Ru",
        ("date=", "file=", "iso-8601[=]", "reference=", "rfc-email", "rfc-3339=", "utc", "universal", "debug"),
    ),
    "ls": Program(
        "/usr/bin/ls",
        "lists directories (metadata only). Not listed: --color, --hyperlink, -D/--dired, -Z/--context",
        "aAbBcCdfFghGHiklLmnNopqQrRsStuUvw:xXT:I:1",
        ("all", "almost-all", "escape", "ignore-backups", "directory", "classify[=]", "file-type", "full-time",
         "group-directories-first", "no-group", "human-readable", "si", "dereference-command-line", "hide=",
         "ignore=", "indicator-style=", "inode", "kibibytes", "dereference", "numeric-uid-gid", "literal",
         "hide-control-chars", "show-control-chars", "quote-name", "quoting-style=", "reverse", "recursive", "size",
         "sort=", "time=", "time-style=", "tabsize=", "width=", "format=", "block-size=", "zero"),
    ),
    "cat": Program(
        "/usr/bin/cat",
        "reads files",
        "benstuvAET",
        ("show-all", "number-nonblank", "show-ends", "number", "squeeze-blank", "show-tabs", "show-nonprinting"),
    ),
    "head": Program(
        "/usr/bin/head",
        "reads the start of files. Not listed: the obsolete -NUM form",
        "c:n:qvz",
        ("bytes=", "lines=", "quiet", "silent", "verbose", "zero-terminated"),
    ),
    "tail": Program(
        "/usr/bin/tail",
        "reads the end of files. Refused: -f/-F/--follow, --retry, --pid, -s (they wait for more input), -NUM",
        "c:n:qvz",
        ("bytes=", "lines=", "quiet", "silent", "verbose", "zero-terminated"),
    ),
    "wc": Program(
        "/usr/bin/wc",
        "counts lines, words, bytes; --files0-from reads a list of files",
        "clLmw",
        ("bytes", "chars", "lines", "words", "max-line-length", "files0-from="),
    ),
    "sort": Program(
        "/usr/bin/sort",
        "sorts lines; -o/--output writes one file (in /work or /tmp). Refused: --compress-program (runs a program: "
        "the audit's escape), -T/--temporary-directory, -S/--buffer-size, --parallel, --batch-size, "
        "--random-source, --files0-from, -y",
        "bcCdfghik:mMno:rRst:uVz",
        ("ignore-leading-blanks", "dictionary-order", "ignore-case", "general-numeric-sort", "ignore-nonprinting",
         "month-sort", "human-numeric-sort", "numeric-sort", "random-sort", "reverse", "sort=", "version-sort",
         "check[=]", "key=", "merge", "output=", "stable", "field-separator=", "unique", "zero-terminated", "debug"),
    ),
    "uniq": Program(
        "/usr/bin/uniq",
        "filters repeated lines; a second operand names an output file (written in /work or /tmp). Not listed: "
        "the obsolete -NUM and +NUM forms (an operand after -- is always a file)",
        "cdDf:is:uw:z",
        ("count", "repeated", "all-repeated[=]", "group[=]", "skip-fields=", "skip-chars=", "check-chars=",
         "ignore-case", "unique", "zero-terminated"),
    ),
    "cut": Program(
        "/usr/bin/cut",
        "selects columns of files",
        "b:c:d:f:nsz",
        ("bytes=", "characters=", "delimiter=", "fields=", "complement", "only-delimited", "output-delimiter=",
         "zero-terminated"),
    ),
    "grep": Program(
        "/usr/bin/grep",
        "searches files; -r reads directories; -f/--file and --exclude-from read a file. Not listed: -X (an "
        "undocumented matcher switch), -y (obsolete), -D/--devices, --color, -NUM",
        "EFGPe:f:iwxzsvVA:B:C:abHhnoqrRlLcTZUIm:d:",
        ("extended-regexp", "fixed-strings", "basic-regexp", "perl-regexp", "regexp=", "file=", "ignore-case",
         "no-ignore-case", "word-regexp", "line-regexp", "null-data", "no-messages", "invert-match", "max-count=",
         "byte-offset", "line-number", "with-filename", "no-filename", "label=", "only-matching", "quiet", "silent",
         "binary-files=", "text", "directories=", "recursive", "dereference-recursive", "include=", "exclude=",
         "exclude-from=", "exclude-dir=", "files-without-match", "files-with-matches", "count", "initial-tab", "null",
         "before-context=", "after-context=", "context="),
    ),
    "du": Program(
        "/usr/bin/du",
        "sizes of files; -X/--exclude-from and --files0-from read a file",
        "0abcd:DhHkLlmPsSt:xB:X:",
        ("null", "all", "apparent-size", "block-size=", "bytes", "total", "dereference-args", "max-depth=",
         "files0-from=", "human-readable", "inodes", "dereference", "count-links", "no-dereference", "separate-dirs",
         "si", "summarize", "threshold=", "time[=]", "time-style=", "exclude-from=", "exclude=", "one-file-system"),
    ),
    "basename": Program(
        "/usr/bin/basename", "strips directories from names", "as:z", ("multiple", "suffix=", "zero"), GETOPT_POSIX
    ),
    "dirname": Program("/usr/bin/dirname", "strips the last part of names", "z", ("zero",)),
    "seq": Program(
        "/usr/bin/seq",
        "prints number sequences (a negative first number goes after --)",
        "f:s:w",
        ("format=", "separator=", "equal-width"),
        GETOPT_POSIX,
    ),
    "base64": Program(
        "/usr/bin/base64", "encodes and decodes files", "diw:", ("decode", "ignore-garbage", "wrap=")
    ),
    "sha256sum": Program(
        "/usr/bin/sha256sum",
        "hashes files; -c/--check reads a list of files and hashes them",
        "bctwz",
        ("binary", "check", "ignore-missing", "quiet", "status", "strict", "tag", "text", "warn", "zero"),
    ),
    "md5sum": Program(
        "/usr/bin/md5sum",
        "hashes files; -c/--check reads a list of files and hashes them",
        "bctwz",
        ("binary", "check", "ignore-missing", "quiet", "status", "strict", "tag", "text", "warn", "zero"),
    ),
    "rev": Program("/usr/bin/rev", "reverses the lines of files (util-linux)"),
    "nl": Program(
        "/usr/bin/nl",
        "numbers the lines of files",
        "b:d:f:h:i:l:n:ps:v:w:",
        ("body-numbering=", "section-delimiter=", "footer-numbering=", "header-numbering=", "line-increment=",
         "join-blank-lines=", "number-format=", "no-renumber", "number-separator=", "starting-line-number=",
         "number-width="),
    ),
    "fold": Program(
        "/usr/bin/fold", "wraps lines of files. Not listed: the obsolete -NUM", "bsw:", ("bytes", "spaces", "width=")
    ),
    "expr": Program("/usr/bin/expr", "evaluates an expression of its operands; nothing else", syntax=NO_OPTIONS),
    "true": Program("/usr/bin/true", "exits 0", syntax=NO_OPTIONS),
    "false": Program("/usr/bin/false", "exits 1", syntax=NO_OPTIONS),
}
# fmt: on
# Deliberately absent: anything that runs another program (sh, env, find, xargs, timeout, nohup, awk, sed, perl,
# python3, git, tar...), opens a connection (curl, wget), copies or writes files by design (cp, tee, dd, mv, ln),
# or reads only standard input, which is always /dev/null here (tr: removed for that reason).

# The environment of a shell command, built from nothing (plus one secret variable when the tool names one).
SHELL_ENV: dict[str, str] = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/work", "TZ": "UTC"}
SECRET_ENV_NAME = r"[A-Z][A-Z0-9_]{0,63}"  # a secret's variable name must match this
# ... and must not be one that changes how programs or the C library behave (loader, locale, charset conversion,
# resolver, allocator, temp dir, option parsing, the allowlisted programs' own variables) or one of SHELL_ENV's.
FORBIDDEN_ENV_NAMES = frozenset({
    "PATH", "HOME", "IFS", "ENV", "BASH_ENV", "SHELL", "TMPDIR", "TZ", "TZDIR", "LANG", "LANGUAGE", "NLSPATH",
    "GCONV_PATH", "LOCPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN", "PYTHONPATH", "PYTHONHOME",
    "POSIXLY_CORRECT", "GREP_OPTIONS", "GREP_COLOR", "GREP_COLORS", "LS_COLORS", "QUOTING_STYLE", "TIME_STYLE",
    "BLOCK_SIZE", "BLOCKSIZE", "DU_BLOCK_SIZE", "LS_BLOCK_SIZE", "COLUMNS", "TABSIZE", "TERM", "OUTPUT_CHARSET",
})  # fmt: skip
FORBIDDEN_ENV_PREFIXES: tuple[str, ...] = ("LD_", "LC_", "MALLOC_", "GLIBC_", "LIBC_", "PYTHON", "OMP_")

# ---- the jail's file system --------------------------------------------------------------------------------
# Host directories bind-mounted read-only (nosuid, nodev) into the jail. Everything else of the host is absent.
READ_ONLY_BINDS: tuple[str, ...] = ("/usr",)
# Covered by an empty read-only tmpfs inside those binds: locally installed software and its configuration
# (credentials in /usr/local/etc, for instance) are none of a run's business.
HIDDEN_PATHS: tuple[str, ...] = ("/usr/local",)
SYMLINKS: dict[str, str] = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/bin"}
DEVICES: tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# /etc inside the jail: these files only, with this content (no host users, no host name, no resolver).
ETC_FILES: dict[str, str] = {
    "passwd": "root:x:0:0:root:/:/nonexistent\nsandbox:x:{uid}:{gid}:sandbox:/work:/nonexistent\n",
    "group": "root:x:0:\nsandbox:x:{gid}:\n",
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1 localhost sandbox\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}
# Writable mounts are nosuid, nodev, noexec. /work and /tmp: tmpfs of their own per run (work_bytes, tmp_bytes,
# TMPFS_INODES), gone with the run. /files: the bot's own directory, writable only in file operations (whose every
# write is checked against FILES_QUOTA_*), read-only in shell runs, absent from script runs.
WORK_DIR = "/work"
FILES_DIR = "/files"
HOSTNAME = "sandbox"

# ---- system calls --------------------------------------------------------------------------------------------
# Denied with EPERM by the seccomp filter of every run (x86_64 and aarch64 numbers are in seccomp.py).
# Sockets: none at all. socket() fails with EAFNOSUPPORT whatever the family and socketpair() is denied: nothing a
# run does needs one, and a unix socket can outlive its run (one holding its own descriptors in flight is freed
# only when the kernel's unix garbage collector next runs), keeping memory charged to the lane's group or names
# bound in the lane's network namespace for a later run to find. The network namespace has no interface but
# loopback (down) anyway. clone() with any namespace flag and clone3() (whose flags a filter cannot read) are denied.
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    "unshare", "setns", "clone3",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init",
    "personality", "mbind", "set_mempolicy", "migrate_pages", "move_pages",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    # System V IPC and POSIX message queues: nothing a run does needs them, and refusing them replaces an IPC
    # namespace per run (nothing for a run to share with a concurrent or a later one)
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "socketpair",
)  # fmt: skip
ALLOWED_SOCKET_FAMILIES: tuple[int, ...] = ()  # socket() of any family: EAFNOSUPPORT

# ---- confinement ---------------------------------------------------------------------------------------------
# cgroup controllers every run is placed under (v2 where the host has them there, else the v1 hierarchies; the
# v1 "cpuacct" hierarchy gives the run's CPU usage). cgroup.py keeps one group per run slot of a sandbox process.
CGROUP_CONTROLLERS: tuple[str, ...] = ("memory", "pids", "cpu")
# Layers the sandbox requires before it runs untrusted code. A machine that cannot give one of them makes the
# sandbox refuse every request, unless the operator sets the development flag (SANDBOX_ALLOW_WEAK=1 in the
# worker), which is logged loudly at start-up and in every result.
REQUIRED_LAYERS: tuple[str, ...] = (
    "namespaces",
    "pivot_root",
    "unprivileged_uid",
    "no_new_privs",
    "rlimits",
    "seccomp",
    "cgroup",
)
OPTIONAL_LAYERS: tuple[str, ...] = ("landlock",)
