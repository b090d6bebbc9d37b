"""The command line without a daemon: usage errors, help texts, check-config's report,
keygen, and what tail and stats print."""

from fanoutd import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """cli.main(argv) -> (exit status, stdout, stderr); argparse's exits included."""
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- check-config


def test_check_config_reports_every_problem_on_its_own_line(capsys, tmp_path):
    path = tmp_path / "fanoutd.yaml"
    path.write_text("interface: lo\nsurprise: 1\nworkers: many\n"
                    "ring: {block_size: 1000, frame_size: 100}\n")
    status, out, err = run(capsys, "check-config", "-c", str(path), "--block-count", "1")
    assert status == 78 and out == ""
    assert sorted(line.split(": ")[1] for line in err.splitlines()) == [
        "ring.block_count (--block-count)", "ring.block_size", "ring.frame_size", "surprise",
        "workers"], err


# --------------------------------------------------------------------------- keygen


def test_keygen_refuses_to_overwrite_a_key_pair(capsys, tmp_path):
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 0
    public, secret = tmp_path / "server.key", tmp_path / "server.key_secret"
    before = public.read_bytes(), secret.read_bytes()
    status, out, err = run(capsys, "keygen", str(tmp_path), "--name", "server")
    assert status == 73 and out == ""
    assert str(public) in err and "--force" in err and len(err.splitlines()) == 1, err
    assert (public.read_bytes(), secret.read_bytes()) == before
    public.unlink()  # either file of the pair is enough to refuse
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 73
    assert secret.read_bytes() == before[1]


def test_keygen_force_replaces_the_pair(capsys, tmp_path):
    assert run(capsys, "keygen", str(tmp_path), "--name", "server")[0] == 0
    secret = tmp_path / "server.key_secret"
    old = secret.read_bytes()
    secret.chmod(0o644)  # a replaced secret key must not keep a wider mode
    assert run(capsys, "keygen", str(tmp_path), "--name", "server", "--force")[0] == 0
    assert secret.read_bytes() != old
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o644


def test_keygen_into_something_that_is_not_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    status, out, err = run(capsys, "keygen", str(target))
    assert (status, out) == (73, "") and err == f"fanoutd keygen: {target}: not a directory\n"
