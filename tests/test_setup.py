"""The README's two set-up commands are the ones CI runs and the ones that exist."""

import grp
import pwd
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The indented command lines of the README's set-up section."""
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in setup.splitlines() if line.startswith("    ./")]


def test_readme_has_the_two_commands():
    install, tests = readme_commands()
    assert install.startswith("./scripts/install.sh && .venv/bin/fanoutd run"), install
    assert tests.startswith("./scripts/install.sh --test && "), tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), f"{tests!r} is not a line of .ci/run:\n{ci}"


def test_install_script_takes_the_options_the_readme_uses():
    script = (ROOT / "scripts" / "install.sh").read_text()
    for command in readme_commands():
        for option in re.findall(r"install\.sh((?: --[\w-]+)*)", command)[0].split():
            assert f"{option})" in script, f"install.sh does not handle {option}"


def test_install_script_creates_the_service_user():
    """The workers' default user is an account of their own that install.sh creates in
    both its modes (the tests run after `./scripts/install.sh --test`): a system account
    with no home and no login shell."""
    from fanoutd.config import Config

    script = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r"^if ! getent passwd fanoutd ", script, re.M), \
        "install.sh creates the user at its top level, whatever the mode"
    user = Config().user
    entry = pwd.getpwnam(user)
    assert user == "fanoutd" and entry.pw_uid != 0
    assert entry.pw_shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    assert not Path(entry.pw_dir).exists(), entry.pw_dir
    assert grp.getgrgid(entry.pw_gid).gr_name == user
