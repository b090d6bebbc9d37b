"""Reading the shipped systemd units (deploy/systemd) the way the tests need them: their
settings, and the privileges a unit gives the daemon, as a setpriv command line."""

from __future__ import annotations

from pathlib import Path

UNIT_DIR = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


def unit_settings(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order; repeated keys stay repeated."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: setting outside a section: {raw!r}"
        assert not line.endswith("\\"), f"{path.name}: keep settings on one line: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def section(unit: str, name: str = "Service") -> dict[str, list[str]]:
    """One section of a shipped unit: {key: [values in order]}."""
    out: dict[str, list[str]] = {}
    for key, value in unit_settings(UNIT_DIR / unit).get(name, []):
        out.setdefault(key, []).append(value)
    return out


def single(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}= should be set exactly once, got {values}"
    return values[0]


def capabilities(unit: str, setting: str) -> set[str]:
    """A capability list of the unit (CapabilityBoundingSet=, AmbientCapabilities=), as
    lower-case names without CAP_ (setpriv's spelling)."""
    values = section(unit).get(setting, [])
    return {cap.lower().removeprefix("cap_") for value in values for cap in value.split()}


def setpriv_argv(unit: str, drop: set[str] = frozenset()) -> list[str]:
    """setpriv giving a root process what systemd gives the unit's main process: the
    bounding set, the ambient (and so inheritable) capabilities, no_new_privs. `drop`
    takes capabilities out of the bounding set, to show what happens without them.

    For a root service systemd starts the process with permitted = effective = the
    bounding set; setpriv does the same by shrinking the bounding set before exec."""
    bounding = capabilities(unit, "CapabilityBoundingSet") - drop
    ambient = capabilities(unit, "AmbientCapabilities") & bounding

    def caps(names: set[str]) -> str:
        return ",".join(["-all", *(f"+{n}" for n in sorted(names))])

    argv = ["setpriv", "--bounding-set", caps(bounding), "--inh-caps", caps(ambient),
            "--ambient-caps", caps(ambient)]
    if single(section(unit), "NoNewPrivileges") == "yes":
        argv.append("--no-new-privs")
    return [*argv, "--"]
