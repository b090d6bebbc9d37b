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
