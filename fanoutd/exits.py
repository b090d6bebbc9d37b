"""Every exit status a fanoutd process returns, in one table: the commands' (listed in the
README and in each command's --help), the supervisor's, and the ones a worker or the proxy
returns to the supervisor. sysexits.h values come from `os` where one matches."""

import os

OK = os.EX_OK
CHANGE = 1  # doctor: something should be changed
USAGE = 2  # argparse's own usage error
BOOT_FAILED = 3  # a worker or the proxy could not start; repeated, it goes FATAL
RECONNECT = 4  # a worker: the proxy was replaced, start a new worker (an expected restart)
UNAVAILABLE = os.EX_UNAVAILABLE  # 69: an interface, endpoint, port or library is not there
SOFTWARE = os.EX_SOFTWARE  # 70: a worker or the proxy went FATAL
CANTCREAT = os.EX_CANTCREAT  # 73: keygen cannot (or will not) write its key files
NOPERM = os.EX_NOPERM  # 77: a missing privilege (CAP_NET_RAW, CAP_KILL), or refused (CURVE)
CONFIG = os.EX_CONFIG  # 78: the configuration is invalid
INTERRUPTED = 128 + 2  # Ctrl-C, as a shell reports a death by SIGINT
