"""Policy as plain data: limits, allowed programs, the jail's file system view and the denied system calls.

Reviewers start here. Nothing in this file runs anything; the other modules read these tables.
"""

from __future__ import annotations

# ---- limits ------------------------------------------------------------------------------------------------
# Per request. A request may ask for less, never for more than MAX_LIMITS. Hard limit = soft limit everywhere,
# so a script cannot raise its own limits.
DEFAULT_LIMITS: dict[str, int | float] = {
    "wall_seconds": 5.0,  # killed (whole process tree) after this, whatever it is doing
    "cpu_seconds": 2,  # RLIMIT_CPU: SIGKILL at the limit (soft = hard)
    "memory_bytes": 256 << 20,  # RLIMIT_AS of the running process
    "processes": 16,  # RLIMIT_NPROC for the jail's uid (a uid of its own per sandbox process)
    "file_bytes": 8 << 20,  # RLIMIT_FSIZE: largest file a run may write
    "open_files": 64,  # RLIMIT_NOFILE
    "output_bytes": 64 << 10,  # stdout and stderr each: more is dropped and the run marked truncated
    "tmp_bytes": 16 << 20,  # size of the jail's /tmp (a tmpfs of its own)
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
}

MIN_LIMITS: dict[str, float] = {"wall_seconds": 0.1, "cpu_seconds": 1, "memory_bytes": 32 << 20, "processes": 1,
                                 "open_files": 16, "output_bytes": 1, "tmp_bytes": 1 << 20, "file_bytes": 1}  # fmt: skip

MAX_FRAME_BYTES = 8 << 20  # the largest request or response frame on the pipes
MAX_ARGV_BYTES = 64 << 10  # total size of a shell command's argv
MAX_SCRIPT_BYTES = 64 << 10  # largest custom script source
MAX_FILE_BYTES = 1 << 20  # largest file a file_operation reads or writes
MAX_LIST_ENTRIES = 1000  # entries returned by a file_operation "list"

# ---- shell programs ----------------------------------------------------------------------------------------
# name -> (absolute path inside the jail, why it is safe). Only bare names are accepted; the path is fixed here,
# never looked up in PATH. None of these runs another program, opens a network connection or is set-uid.
# Programs that write files or run others (find, xargs, env, timeout, awk, sed, tar, git, curl, sh...) are
# deliberately absent: the jail would contain them, but they are not needed.
SHELL_PROGRAMS: dict[str, tuple[str, str]] = {
    "echo": ("/usr/bin/echo", "prints its arguments"),
    "printf": ("/usr/bin/printf", "formats its arguments"),
    "date": ("/usr/bin/date", "prints the time (-f reads only files inside the jail)"),
    "ls": ("/usr/bin/ls", "lists directories inside the jail"),
    "cat": ("/usr/bin/cat", "reads files inside the jail"),
    "head": ("/usr/bin/head", "reads the start of files"),
    "tail": ("/usr/bin/tail", "reads the end of files"),
    "wc": ("/usr/bin/wc", "counts lines, words, bytes"),
    "sort": ("/usr/bin/sort", "sorts lines (-o writes only where the jail lets it)"),
    "uniq": ("/usr/bin/uniq", "filters repeated lines"),
    "cut": ("/usr/bin/cut", "selects columns"),
    "tr": ("/usr/bin/tr", "translates characters"),
    "grep": ("/usr/bin/grep", "searches text"),
    "du": ("/usr/bin/du", "sizes of files inside the jail"),
    "basename": ("/usr/bin/basename", "strips directories from a name"),
    "dirname": ("/usr/bin/dirname", "strips the last part of a name"),
    "seq": ("/usr/bin/seq", "prints number sequences"),
    "base64": ("/usr/bin/base64", "encodes and decodes base64"),
    "sha256sum": ("/usr/bin/sha256sum", "hashes files"),
    "md5sum": ("/usr/bin/md5sum", "hashes files"),
    "rev": ("/usr/bin/rev", "reverses lines"),
    "nl": ("/usr/bin/nl", "numbers lines"),
    "fold": ("/usr/bin/fold", "wraps lines"),
    "expr": ("/usr/bin/expr", "evaluates expressions"),
    "true": ("/usr/bin/true", "exits 0"),
    "false": ("/usr/bin/false", "exits 1"),
}

# The environment of a shell command, built from nothing (plus one secret variable when the tool names one).
SHELL_ENV: dict[str, str] = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/work", "TZ": "UTC"}
SECRET_ENV_NAME = r"[A-Z][A-Z0-9_]{0,63}"  # a secret's variable name must match this
# ... and must not be one that changes how programs or the C library behave (loader, locale, charset conversion,
# resolver, allocator, temp dir) or one of SHELL_ENV's.
FORBIDDEN_ENV_NAMES = frozenset({
    "PATH", "HOME", "IFS", "ENV", "BASH_ENV", "SHELL", "TMPDIR", "TZ", "TZDIR", "LANG", "LANGUAGE", "NLSPATH",
    "GCONV_PATH", "LOCPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN", "PYTHONPATH", "PYTHONHOME",
})  # fmt: skip
FORBIDDEN_ENV_PREFIXES: tuple[str, ...] = ("LD_", "LC_", "MALLOC_", "GLIBC_", "PYTHON")

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
# Writable mounts (nosuid, nodev, noexec): /work is a fresh directory per run, /files the bot's own files,
# /tmp a small tmpfs per run.
WORK_DIR = "/work"
FILES_DIR = "/files"
HOSTNAME = "sandbox"

# ---- system calls --------------------------------------------------------------------------------------------
# Denied with EPERM by the seccomp filter of every run (x86_64 and aarch64 numbers are in seccomp.py).
# Network sockets: socket() is allowed only for AF_UNIX; the network namespace has no interface but loopback
# (down) anyway. clone() with any namespace flag and clone3() (whose flags a filter cannot read) are denied.
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
)  # fmt: skip
ALLOWED_SOCKET_FAMILIES: tuple[int, ...] = (1,)  # AF_UNIX

# ---- confinement ---------------------------------------------------------------------------------------------
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
)
OPTIONAL_LAYERS: tuple[str, ...] = ("landlock",)
