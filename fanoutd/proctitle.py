"""Process names, so `ps`, `top` and /proc/PID/comm tell the supervisor's children apart."""

import setproctitle


def set_process_name(name: str) -> None:
    """Set the command line `ps` shows and the kernel's comm (15 characters at most)."""
    setproctitle.setproctitle(name)
    setproctitle.setthreadtitle(name)  # prctl(PR_SET_NAME): /proc/PID/comm, pgrep, top
