#!/usr/bin/env python3
"""Writes docker/seccomp-io_uring.json, the seccomp profile the compose file gives the
tribunal containers: an allowlist of the system calls tribunal, loadgen, librdkafka and the
healthcheck's bash make (measured with `strace -f` over a loaded cluster, plus what the
runtime and error paths may call), with io_uring's three calls, which newer Docker
versions' default profile no longer allows. Anything else fails with ENOSYS."""
import json
import pathlib

IO_URING = ["io_uring_setup", "io_uring_enter", "io_uring_register"]
SYSCALLS = """
accept accept4 access arch_prctl bind brk capget chdir chmod clock_getres clock_gettime
clock_nanosleep clone clone3 close close_range connect copy_file_range dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2
execve exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown
fcntl fdatasync flock fstat fstatfs fsync ftruncate futex futex_waitv getcpu getcwd
getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage
getsid getsockname getsockopt gettid gettimeofday getuid inotify_add_watch inotify_init
inotify_init1 inotify_rm_watch ioctl kill link linkat listen lseek lstat madvise membarrier
memfd_create mincore mkdir mkdirat mlock mlock2 mmap mprotect mremap msync munlock munmap
nanosleep newfstatat open openat openat2 pause pidfd_open pipe pipe2 poll ppoll prctl pread64
preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink
readlinkat readv recvfrom recvmmsg recvmsg rename renameat renameat2 restart_syscall rmdir
rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getparam sched_getscheduler
sched_setaffinity sched_yield select sendfile sendmmsg sendmsg sendto set_robust_list
set_tid_address setitimer setpgid setpriority setsid setsockopt shutdown sigaltstack
socket socketpair splice stat statfs statx symlink symlinkat sync_file_range sysinfo tgkill
timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname unlink
unlinkat utimensat wait4 waitid write writev
setgroups setuid setgid setresuid setresgid setreuid setregid setfsuid setfsgid capset
""".split()

profile = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
    "syscalls": [{"names": sorted(set(SYSCALLS)), "action": "SCMP_ACT_ALLOW"},
                 {"names": IO_URING, "action": "SCMP_ACT_ALLOW",
                  "comment": "glommio's io_uring; not in newer Docker defaults"}],
}
out = pathlib.Path(__file__).resolve().parent.parent / "docker" / "seccomp-io_uring.json"
out.write_text(json.dumps(profile, indent=1) + "\n")
print(f"{out}: {len(set(SYSCALLS)) + len(IO_URING)} system calls allowed")
