"""``load_config``: the DESIGN example, every default, paths, times, errors."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import textwrap
from pathlib import Path

import pytest

from exlab_wizard.config import (
    BandwidthWindow,
    Config,
    ConfigError,
    EquipmentConfig,
    MountTransportConfig,
    RcloneTransportConfig,
    RsyncSshTransportConfig,
    load_config,
)

VALID = Path(__file__).parent / "valid"
DESIGN_MD = Path(__file__).resolve().parents[3] / "shared" / "DESIGN.md"

DESIGN_EXTENSIONS = (
    ".txt",
    ".md",
    ".csv",
    ".tsv",
    ".json",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".conf",
    ".sh",
    ".py",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $HOME, so ``~`` expansion is observable."""
    fake = tmp_path / "home"
    fake.mkdir()
    monkeypatch.setenv("HOME", str(fake))
    return fake


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


MINIMAL_EQUIPMENT = "equipment: [{id: A, local_root: /data, transport: {type: mount, mount_path: /m}}]\n"


# --- the full DESIGN example ---------------------------------------------------


def test_design_example_loads_with_exactly_the_design_values(home: Path):
    config = load_config(VALID / "design_example.yaml")

    assert len(config.equipment) == 1
    eq = config.equipment[0]
    assert isinstance(eq, EquipmentConfig)
    assert eq.id == "CONFOCAL_01"
    assert eq.label == "Confocal Microscope 1"
    assert eq.local_root == Path("/data/lab")
    assert eq.nas_root == "//nas01/lab"
    assert eq.completeness_signal == "sentinel_file"
    assert eq.sentinel_filename == "acquisition_complete.flag"
    assert eq.manifest_filename == "run_manifest.json"
    assert eq.equipment_root == Path("/data/lab/CONFOCAL_01")

    tr = eq.transport
    assert isinstance(tr, MountTransportConfig)
    assert tr.type == "mount"
    assert tr.mount_path == Path("/mnt/nas/lab/CONFOCAL_01")
    assert tr.mount_marker == ".exlab-nas"
    assert tr.remote_root == "/mnt/nas/lab/CONFOCAL_01"
    assert tr.bandwidth.upload_mbps == 50
    assert tr.bandwidth.schedule == (
        BandwidthWindow(days=("mon", "tue", "wed", "thu", "fri"), start=dt.time(8, 0), end=dt.time(18, 0)),
    )

    assert config.nas_cleanup.enabled is False
    assert config.nas_cleanup.min_verify_passes == 2
    assert config.nas_cleanup.min_age_hours == 24
    assert config.nas_cleanup.retain_cache is True

    assert config.sync.enabled is True
    assert config.sync.max_parallel_jobs == 2
    assert config.sync.backoff_s == (30, 120, 480, 1800, 7200)
    assert config.sync.audit_interval_s == 86400
    assert config.sync.scan_interval_s == 30
    assert config.sync.verify_max_stream_bytes == 1073741824

    assert config.validator.content_scan_max_mib == 5
    assert config.validator.content_scan_extensions == DESIGN_EXTENSIONS
    assert ".xml" not in config.validator.content_scan_extensions

    assert config.state_dir == home / ".local" / "state" / "exlab-wizard"
    assert config.queue_db == config.state_dir / "queue.db"


DESIGN_BLOCK_SHA256 = VALID / "design_block.sha256"


def _design_block(text: str) -> str:
    """The config example of DESIGN section 3, dedented."""
    section = text.split("## 3. Configuration", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    equipment:"))
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip()


def test_design_example_file_matches_design_md():
    """valid/design_example.yaml is the DESIGN block verbatim (guards drift).

    Beside the shared folder the block is read from DESIGN.md, and the digest
    recorded in valid/design_block.sha256 must be its digest; in a bare
    checkout the example is checked against that recorded digest.
    """
    ours = (VALID / "design_example.yaml").read_text(encoding="utf-8").split("\n", 1)[1].strip()
    recorded = DESIGN_BLOCK_SHA256.read_text(encoding="ascii").split()[0]
    if DESIGN_MD.is_file():
        design = _design_block(DESIGN_MD.read_text(encoding="utf-8"))
        assert ours == design
        assert hashlib.sha256(design.encode("utf-8")).hexdigest() == recorded, (
            f"DESIGN's config example changed: record its new digest in {DESIGN_BLOCK_SHA256.name}"
        )
    assert hashlib.sha256(ours.encode("utf-8")).hexdigest() == recorded


# --- defaults ----------------------------------------------------------------


def test_every_default_is_the_design_default(home: Path):
    config = load_config(VALID / "minimal.yaml")
    eq = config.equipment[0]

    # equipment
    assert eq.label == ""
    assert eq.nas_root == ""
    assert eq.completeness_signal == "sentinel_file"
    assert eq.sentinel_filename == "acquisition_complete.flag"
    assert eq.manifest_filename == "run_manifest.json"
    # transport
    assert eq.transport.mount_marker == ".exlab-nas"
    assert eq.transport.bandwidth.upload_mbps is None
    assert eq.transport.bandwidth.schedule == ()
    # nas_cleanup
    assert config.nas_cleanup.enabled is False
    assert config.nas_cleanup.min_verify_passes == 2
    assert config.nas_cleanup.min_age_hours == 24
    assert config.nas_cleanup.retain_cache is True
    # sync
    assert config.sync.enabled is True
    assert config.sync.max_parallel_jobs == 2
    assert config.sync.backoff_s == (30, 120, 480, 1800, 7200)
    assert config.sync.audit_interval_s == 86400
    assert config.sync.scan_interval_s == 30
    assert config.sync.verify_max_stream_bytes == 1073741824
    # validator
    assert config.validator.content_scan_max_mib == 5
    assert config.validator.content_scan_extensions == DESIGN_EXTENSIONS
    # state_dir: ~ expanded against the current HOME
    assert config.state_dir == home / ".local" / "state" / "exlab-wizard"
    assert "~" not in str(config.state_dir)


def test_rsync_ssh_defaults(tmp_path: Path):
    path = write(
        tmp_path,
        """\
        equipment:
          - id: A
            local_root: /data
            transport: {type: rsync_ssh, ssh_target: u@h, ssh_key_path: /k, remote_path: /srv/x/}
        """,
    )
    tr = load_config(path).equipment[0].transport
    assert isinstance(tr, RsyncSshTransportConfig)
    assert tr.ssh_port == 22
    assert tr.ssh_known_hosts is None
    assert tr.remote_path == "/srv/x"  # trailing slash dropped
    assert tr.remote_root == "/srv/x"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "~\n", "{}\n", "equipment: []\n", "equipment:\n"])
def test_a_config_without_equipment_is_refused(tmp_path: Path, text: str):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems[0].startswith("equipment: ")
    assert "defines no equipment" in caught.value.problems[0]


# --- paths -----------------------------------------------------------------------


def test_tilde_expanded_in_every_path(home: Path):
    config = load_config(VALID / "three_transports.yaml")
    mount, rsync, rclone = config.equipment
    for eq in config.equipment:
        assert eq.local_root == home / "data" / "lab"
    assert isinstance(mount.transport, MountTransportConfig)
    assert mount.transport.mount_path == home / "mnt" / "nas" / "CONFOCAL_01"
    assert isinstance(rsync.transport, RsyncSshTransportConfig)
    assert rsync.transport.ssh_key_path == home / ".ssh" / "id_ed25519"
    assert rsync.transport.ssh_known_hosts == home / ".ssh" / "known_hosts_lab"
    assert isinstance(rclone.transport, RcloneTransportConfig)
    assert rclone.transport.rclone_config == home / ".config" / "rclone" / "rclone.conf"
    assert config.state_dir == home / "state" / "exlab"
    assert mount.equipment_root == home / "data" / "lab" / "CONFOCAL_01"


def test_paths_need_not_exist(tmp_path: Path):
    path = write(
        tmp_path,
        f"""\
        equipment:
          - id: A
            local_root: {tmp_path}/nope/never
            transport: {{type: mount, mount_path: {tmp_path}/also/missing}}
        state_dir: {tmp_path}/state/missing
        """,
    )
    config = load_config(path)
    assert not config.equipment[0].local_root.exists()
    assert not config.state_dir.exists()  # loading creates nothing


def test_three_transports_values(home: Path):
    _, rsync, rclone = load_config(VALID / "three_transports.yaml").equipment
    assert rsync.completeness_signal == "manifest"
    assert rsync.transport.bandwidth.upload_mbps == 20.5
    assert rclone.completeness_signal == "none"
    assert rclone.transport.rclone_remote == "lab-nas"  # trailing ':' dropped
    assert rclone.transport.remote_root == "lab-nas:lab/FACS_3"
    assert rclone.transport.bandwidth.upload_mbps is None


# --- durations -------------------------------------------------------------------


def test_fractional_durations_accepted():
    config = load_config(VALID / "fractional_durations.yaml")
    assert config.sync.backoff_s == (0.5,)
    assert config.sync.scan_interval_s == 0.1
    assert config.sync.audit_interval_s == 2.5
    assert config.nas_cleanup.min_age_hours == 0.5


def test_empty_backoff_means_no_retry(tmp_path: Path):
    config = load_config(write(tmp_path, MINIMAL_EQUIPMENT + "sync: {backoff_s: []}\n"))
    assert config.sync.backoff_s == ()


# --- bandwidth windows -------------------------------------------------------------


def test_window_from_to_are_start_end_in_code():
    fields = BandwidthWindow.model_fields
    assert "start" in fields and "end" in fields
    assert fields["start"].alias == "from" and fields["end"].alias == "to"
    window = BandwidthWindow.model_validate({"days": ["mon"], "from": "08:00", "to": "18:00"})
    assert (window.start, window.end) == (dt.time(8, 0), dt.time(18, 0))
    assert not hasattr(window, "from_")


@pytest.mark.parametrize("name", ["unquoted_times.yaml", "yaml11_sexagesimal_times.yaml"])
def test_unquoted_times_are_times_of_day(name: str):
    schedule = load_config(VALID / name).equipment[0].transport.bandwidth.schedule
    assert schedule[0].days == ("mon", "tue", "wed", "thu", "fri")  # lower-cased
    assert (schedule[0].start, schedule[0].end) == (dt.time(8, 0), dt.time(18, 30))
    # overnight window: to < from is allowed
    assert (schedule[1].start, schedule[1].end) == (dt.time(22, 0), dt.time(6, 0))


def test_yaml11_fixture_really_produces_integers():
    """Guard: the YAML 1.1 fixture exercises the integer path, not strings."""
    from ruamel.yaml import YAML

    raw = YAML(typ="safe", pure=True).load((VALID / "yaml11_sexagesimal_times.yaml").read_text())
    schedule = raw["equipment"][0]["transport"]["bandwidth"]["schedule"]
    assert schedule[0]["to"] == 1110 and schedule[1]["from"] == 1320


def test_sexagesimal_integer_is_a_time_of_day():
    # YAML 1.1 turns 08:00 into 480 and 18:30 into 1110.
    window = BandwidthWindow.model_validate({"days": ["mon"], "from": 480, "to": 1110})
    assert (window.start, window.end) == (dt.time(8, 0), dt.time(18, 30))


@pytest.mark.parametrize("text", ["8:00", '"8:00"', "08:00", '"08:00"'])
def test_quoted_and_unquoted_times_agree(tmp_path: Path, text: str):
    path = write(
        tmp_path,
        f"""\
        equipment:
          - id: A
            local_root: /data
            transport:
              type: mount
              mount_path: /m
              bandwidth:
                upload_mbps: 5
                schedule: [{{days: [mon], from: {text}, to: "18:00"}}]
        """,
    )
    window = load_config(path).equipment[0].transport.bandwidth.schedule[0]
    assert window.start == dt.time(8, 0)


def test_whole_day_window(tmp_path: Path):
    schedule = load_config(VALID / "unquoted_times.yaml").equipment[0].transport.bandwidth.schedule
    assert schedule[2].start == schedule[2].end == dt.time(0, 0)


# --- errors ---------------------------------------------------------------------------


def test_missing_file_is_config_error(tmp_path: Path):
    missing = tmp_path / "no" / "config.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("<file>: ")
    assert str(missing) in str(caught.value)


def test_directory_instead_of_file_is_config_error(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems[0].startswith("<file>: ")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_multiple_problems_are_all_reported_in_one_error(tmp_path: Path):
    path = write(
        tmp_path,
        """\
        equipment:
          - id: confocal
            local_root: ''
            transport: {type: mount}
          - id: B
            local_root: /data
            transport: {type: rsync_ssh, ssh_target: host, ssh_key_path: /k, remote_path: rel, ssh_port: 0}
        nas_cleanup: {min_verify_passes: 0}
        sync: {max_parallel_jobs: two, backoff_s: [1, -1], audit_interval_s: 0}
        validator: {content_scan_max_mib: -1}
        surprise: 1
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = {problem.split(": ", 1)[0] for problem in caught.value.problems}
    assert keys >= {
        "equipment[0].id",
        "equipment[0].local_root",
        "equipment[0].transport.mount_path",
        "equipment[1].transport.ssh_target",
        "equipment[1].transport.remote_path",
        "equipment[1].transport.ssh_port",
        "nas_cleanup.min_verify_passes",
        "sync.max_parallel_jobs",
        "sync.backoff_s",
        "sync.audit_interval_s",
        "validator.content_scan_max_mib",
        "surprise",
    }
    message = str(caught.value)
    for problem in caught.value.problems:
        assert problem in message


def test_one_bad_day_is_one_problem(tmp_path: Path):
    """A bad day name is reported once, not also as an 'empty days' list."""
    path = write(
        tmp_path,
        """\
        equipment:
          - id: A
            local_root: /data
            transport:
              type: mount
              mount_path: /m
              bandwidth: {schedule: [{days: [monday], from: "08:00", to: "18:00"}]}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith("equipment[0].transport.bandwidth.schedule[0].days[0]: ")


# --- equipment lookup ---------------------------------------------------------------


@pytest.fixture
def two_instruments(tmp_path: Path) -> Config:
    return load_config(
        write(
            tmp_path,
            f"""\
        equipment:
          - id: SCOPE
            local_root: {tmp_path}/lab
            transport: {{type: mount, mount_path: /m1}}
          - id: SCOPE_2
            local_root: {tmp_path}/lab
            transport: {{type: mount, mount_path: /m2}}
          - id: READER
            local_root: {tmp_path}/other
            transport: {{type: mount, mount_path: /m3}}
        """,
        )
    )


def test_equipment_root_is_local_root_joined_with_id(two_instruments: Config, tmp_path: Path):
    roots = [eq.equipment_root for eq in two_instruments.equipment]
    assert roots == [tmp_path / "lab" / "SCOPE", tmp_path / "lab" / "SCOPE_2", tmp_path / "other" / "READER"]


def test_equipment_for_run(two_instruments: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lab = tmp_path / "lab"
    find = two_instruments.equipment_for_run
    assert find(lab / "SCOPE" / "PROJ-0042" / "Runs" / "Run_X").id == "SCOPE"
    assert find(lab / "SCOPE" / "PROJ-0042" / "TestRuns" / "TestRun_X").id == "SCOPE"
    # SCOPE is a string prefix of SCOPE_2 but not a path prefix
    assert find(lab / "SCOPE_2" / "P" / "Runs" / "Run_1").id == "SCOPE_2"
    assert find(tmp_path / "other" / "READER" / "P" / "Runs" / "R").id == "READER"
    # the equipment root itself is not a run; unknown folders match nothing
    assert find(lab / "SCOPE") is None
    assert find(lab / "UNKNOWN" / "P" / "Runs" / "R") is None
    assert find(lab) is None
    assert find(Path("/elsewhere/SCOPE/P/Runs/R")) is None
    # '..' is normalised before matching
    assert find(lab / "SCOPE" / ".." / "UNKNOWN" / "P") is None
    # a relative run path is taken against the working directory
    monkeypatch.chdir(tmp_path)
    assert find(Path("lab/SCOPE/P/Runs/R")).id == "SCOPE"


def test_equipment_by_id(two_instruments: Config):
    assert two_instruments.equipment_by_id("READER").id == "READER"
    with pytest.raises(KeyError):
        two_instruments.equipment_by_id("NOPE")


def test_config_is_frozen(two_instruments: Config):
    with pytest.raises(Exception):  # noqa: B017 - which error a frozen model raises is pydantic's choice
        two_instruments.sync = None  # type: ignore[misc]


def test_a_config_path_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path):
    """``--config`` naming a FIFO (or a device) is a ConfigError at once, never a read that blocks."""
    import threading

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            load_config(fifo)
        except ConfigError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("load_config blocked on a FIFO")
    assert "not a regular file" in str(outcome["error"])


# --- the transport type names its own key -----------------------------------------


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("{type: ftp, mount_path: /m}", "equipment[1].transport.type: 'ftp' is not a transport type"),
        ("{mount_path: /m}", "equipment[1].transport.type: missing"),
    ],
)
def test_unknown_or_missing_transport_type_names_the_type_key(tmp_path: Path, transport: str, expected: str):
    path = write(
        tmp_path,
        f"""\
        equipment:
          - {{id: A, local_root: /data, transport: {{type: mount, mount_path: /m}}}}
          - {{id: B, local_root: /data, transport: {transport}}}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].startswith(expected)
    assert "mount, rclone, rsync_ssh" in caught.value.problems[0]
