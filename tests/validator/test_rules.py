"""Each Pre-Sync Gate rule, table-driven: what it must catch and what it must let pass."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exlab_wizard.validator import rules
from exlab_wizard.validator.findings import Finding, sort_findings

# -- unresolved_placeholder_token --------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("<name>", ["<name>"]),
        ("Run_<date>", ["<date>"]),
        ("<sample_id>.csv", ["<sample_id>"]),
        ("<_x1>", ["<_x1>"]),
        ("a<B>b<c>", ["<B>", "<c>"]),
        ("operator: <operator>\nsample: <sample>", ["<operator>", "<sample>"]),
        ("<<name>>", ["<name>"]),
    ],
)
def test_placeholder_found(text: str, tokens: list[str]) -> None:
    assert [hit.token for hit in rules.unresolved_placeholder_token(text)] == tokens


@pytest.mark.parametrize(
    "text",
    [
        "<2 mM>",  # a concentration, not a placeholder
        "<2mM>",  # starts with a digit
        "<>",
        "< name>",
        "<name >",
        "<na me>",
        "<na-me>",
        "<name",
        "name>",
        "a > b < c",
        "plain_name.txt",
        "x<é>",
    ],
)
def test_placeholder_not_found(text: str) -> None:
    assert rules.unresolved_placeholder_token(text) == []


def test_placeholder_offsets() -> None:
    hits = rules.unresolved_placeholder_token("ab <x> cd <y>")
    assert [hit.offset for hit in hits] == [3, 10]


# -- leftover_jinja_marker ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("{{ x }}", ["{{ x }}"]),
        ("{{x}}", ["{{x}}"]),
        ("a{{}}b", ["{{}}"]),
        ("{% if a %}", ["{% if a %}"]),
        ("{%%}", ["{%%}"]),
        ("Run_{{ date }}_{% endif %}", ["{{ date }}", "{% endif %}"]),
        ("{% endif %} then {{ y }}", ["{% endif %}", "{{ y }}"]),
        ("{{ a\nb }}", ["{{ a\nb }}"]),
    ],
)
def test_jinja_found(text: str, tokens: list[str]) -> None:
    assert [hit.token for hit in rules.leftover_jinja_marker(text)] == tokens


@pytest.mark.parametrize(
    "text",
    ["{ x }", "{x}}", "{{ x }", "{% x", "x %}", "{# comment #}", "{{ a } }}", '{"json": {"a": 1}}', "50%", "{{{{{{{"],
)
def test_jinja_not_found(text: str) -> None:
    assert rules.leftover_jinja_marker(text) == []


# -- illegal_filesystem_character --------------------------------------------


@pytest.mark.parametrize(
    ("segment", "tokens"),
    [
        ("a<b", ["<"]),
        ("a>b", [">"]),
        ("a:b", [":"]),
        ('a"b', ['"']),
        ("a/b", ["/"]),
        ("a\\b", ["\\"]),
        ("a|b", ["|"]),
        ("a?b", ["?"]),
        ("a*b", ["*"]),
        ("a\x00b", ["\x00"]),
        ("a\x01b", ["\x01"]),
        ("a\x1fb", ["\x1f"]),
        ("tab\there", ["\t"]),
        ("new\nline", ["\n"]),
        ("cr\rhere", ["\r"]),
        ("trailing.", ["."]),
        ("trailing ", [" "]),
        ("...", ["."]),
        ("a?b?c*", ["?", "*"]),
        ("Run_<date>", ["<", ">"]),
        ("x: y.", [":", "."]),
    ],
)
def test_illegal_character_found(segment: str, tokens: list[str]) -> None:
    assert [hit.token for hit in rules.illegal_filesystem_character(segment)] == tokens


@pytest.mark.parametrize(
    "segment",
    [
        "a.b",
        ".hidden",
        " leading space",
        "inner space",
        "Run_2024-05-01_1410",
        "äöü ñ",
        "del\x7fchar",
        "50%",
        "{x}",
        "a,b;c=d",
    ],
)
def test_illegal_character_not_found(segment: str) -> None:
    assert rules.illegal_filesystem_character(segment) == []


# -- reserved_filesystem_name ------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "stem"),
    [
        ("CON", "CON"),
        ("con", "con"),
        ("Con.txt", "Con"),
        ("con.txt", "con"),
        ("PRN", "PRN"),
        ("aux.json", "aux"),
        ("NUL", "NUL"),
        ("nul.tar.gz", "nul"),
        ("COM1", "COM1"),
        ("com9.csv", "com9"),
        ("LPT1", "LPT1"),
        ("LPT9.csv", "LPT9"),
        ("lPt5.TXT", "lPt5"),
        ("aux .txt", "aux"),
        ("CON ", "CON"),
        ("con.", "con"),
    ],
)
def test_reserved_name_found(segment: str, stem: str) -> None:
    hits = rules.reserved_filesystem_name(segment)
    assert [hit.token for hit in hits] == [stem]


@pytest.mark.parametrize(
    "segment",
    [
        "COM0",
        "LPT0",
        "COM10",
        "LPT10",
        "console.txt",
        "CONS",
        "xcon",
        "com",
        "LPT",
        "nul_data.csv",
        "icon.png",
        ".con",
        "auxiliary",
        "con-1.txt",
        "Run_CON",
    ],
)
def test_reserved_name_not_found(segment: str) -> None:
    assert rules.reserved_filesystem_name(segment) == []


# -- the pre-check is a superset of every name rule ---------------------------


_NAME_CASES = [
    "<name>",
    "a{{x}}",
    "{% x %}",
    "a\x00",
    "a\x1f",
    "a:b",
    "a.",
    "a ",
    "CON",
    "con.txt",
    "LPT9.csv",
    "aux .txt",
    "com1",
    "Con",
    "ok.txt",
    "plain",
    "{x}",
    "a{b",
]


def _any_name_rule(name: str) -> bool:
    return any(check(name) for _, check in rules.NAME_RULES)


@pytest.mark.parametrize("name", _NAME_CASES)
def test_precheck_never_misses(name: str) -> None:
    if _any_name_rule(name):
        assert rules.name_may_offend(name)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('aAcClLnNoOpPrRsStTuUxX0159 .<>{}%_:\x00\x07|?*"/\\')), max_size=12))
def test_precheck_never_misses_random(name: str) -> None:
    if _any_name_rule(name):
        assert rules.name_may_offend(name)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from(list("aAcClLnNoOpPrRtTuUxX19 .<>{}%_:\x07|?é\u0130K")), max_size=8), max_size=6
    )
)
def test_listing_precheck_never_misses(names: list[str]) -> None:
    if any(_any_name_rule(name) for name in names):
        assert rules.names_may_offend(names)


@pytest.mark.parametrize(
    "names", [["é", "con.txt"], ["ok", "CON"], ["x\u0130", "aux .csv"], ["a", "b."], ["a", "{{x}}"]]
)
def test_listing_precheck_examples(names: list[str]) -> None:
    assert rules.names_may_offend(names)
    assert not rules.names_may_offend(
        [
            n.replace("con", "cone")
            .replace("CON", "CONE")
            .replace("aux", "auxx")
            .replace("b.", "b")
            .replace("{{x}}", "x")
            for n in names
        ]
    )


def test_precheck_passes_clean_names() -> None:
    for name in ("Run_2024-05-01", "image_0001.tif", "data.csv", ".exlab-wizard", "checksums.sha256", "con-1.txt"):
        assert not rules.name_may_offend(name)


# -- mode_prefix_mismatch ----------------------------------------------------


@pytest.mark.parametrize(
    ("run_kind", "parent", "leaf", "mismatch"),
    [
        ("experimental", "Runs", "Run_2024", False),
        ("test", "TestRuns", "TestRun_2024", False),
        ("experimental", "TestRuns", "Run_2024", True),
        ("experimental", "Runs", "TestRun_2024", True),
        ("experimental", "TestRuns", "TestRun_2024", True),
        ("test", "Runs", "Run_2024", True),
        ("test", "TestRuns", "Run_2024", True),
        ("test", "Runs", "TestRun_2024", True),
        ("experimental", "Runs", "2024-05-01", True),
        ("experimental", "runs", "Run_2024", True),  # case-sensitive
        ("experimental", "Runs", "run_2024", True),
        (None, "Runs", "Run_2024", False),
        (None, "TestRuns", "TestRun_2024", False),
        (None, "Runs", "TestRun_2024", True),
        (None, "TestRuns", "Run_2024", True),
        (None, "Runs", "2024-05-01", True),
        (None, "elsewhere", "myrun", True),
        ("bogus", "Runs", "Run_2024", False),  # an unknown kind counts as absent
        ("bogus", "Runs", "TestRun_2024", True),
    ],
)
def test_mode_prefix(run_kind: str | None, parent: str, leaf: str, mismatch: bool) -> None:
    hits = rules.mode_prefix_mismatch(run_kind, parent, leaf)
    assert bool(hits) is mismatch
    if hits:
        assert hits[0].token == f"{parent}/{leaf}"


# -- YAML front matter -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "body", "terminated"),
    [
        ("---\na: 1\n---\nprose <x>\n", "a: 1\n", True),
        ("---\r\na: 1\r\n---\r\nprose\r\n", "a: 1\r\n", True),
        ("\ufeff---\na: 1\n---\n", "a: 1\n", True),
        ("--- \na: 1\n--- \n", "a: 1\n", True),
        ("---\n---\n", "", True),
        ("---\na: 1\nno close\n", "a: 1\nno close\n", False),
        ("---", "", False),
        ("---\na: 1\n----\n", "a: 1\n----\n", False),
    ],
)
def test_front_matter_extracted(text: str, body: str, terminated: bool) -> None:
    front = rules.yaml_front_matter(text)
    assert front is not None
    assert (front.body, front.terminated) == (body, terminated)
    assert text[front.offset : front.offset + len(body)] == body


@pytest.mark.parametrize(
    "text", ["# Title\n---\na: 1\n---\n", "", "prose only", " ---\na\n---\n", "----\na\n---\n", "\n---\na\n---\n"]
)
def test_no_front_matter(text: str) -> None:
    assert rules.yaml_front_matter(text) is None
    assert rules.malformed_yaml_front_matter(text) == []


@pytest.mark.parametrize(
    ("text", "malformed"),
    [
        ("---\ntitle: ok\n---\n", False),
        ("---\ntitle: <name>\n---\n", False),  # a placeholder is valid YAML; the hard rule catches it
        ("---\ntitle: ok\n", True),  # never closed
        ("---\n", True),
        ("---\ntitle: [unclosed\n---\n", False),  # closed: the YAML inside is not parsed
        ("# no front matter\n---\n", False),
    ],
)
def test_malformed_front_matter(text: str, malformed: bool) -> None:
    assert bool(rules.malformed_yaml_front_matter(text)) is malformed


# -- creation.json: missing_required_field, orphan -----------------------------

_GOOD = {
    "schema_version": "1.0",
    "level": "run",
    "run_kind": "experimental",
    "paths": {"local": "/data/x", "nas": "//nas/x"},
    "sync_status": "pending",
}


def test_required_fields_complete() -> None:
    assert rules.missing_required_field(_GOOD) == []


@pytest.mark.parametrize(
    ("change", "token"),
    [
        ({"schema_version": None}, "schema_version"),
        ({"level": None}, "level"),
        ({"run_kind": None}, "run_kind"),
        ({"paths": None}, "paths"),
        ({"sync_status": None}, "sync_status"),
        ({"level": "project"}, "level"),
        ({"run_kind": "production"}, "run_kind"),
        ({"sync_status": "done"}, "sync_status"),
        ({"paths": "/data/x"}, "paths"),
        ({"paths": {"nas": "//nas/x"}}, "paths.local"),
        ({"paths": {"local": ""}}, "paths.local"),
        ({"schema_version": 1}, "schema_version"),
    ],
)
def test_required_field_missing_or_wrong(change: dict, token: str) -> None:
    raw = {**_GOOD, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    assert [hit.token for hit in rules.missing_required_field(raw)] == [token]


def test_minimal_engine_record_lacks_only_run_kind() -> None:
    minimal = {k: v for k, v in _GOOD.items() if k != "run_kind"} | {"created_by": "exlab-sync"}
    assert [hit.token for hit in rules.missing_required_field(minimal)] == ["run_kind"]


def test_orphan_and_symlink() -> None:
    assert rules.orphan(True) == []
    assert [h.token for h in rules.orphan(False)] == ["creation.json"]
    hit = rules.symlink_skipped("link", "/etc/passwd")[0]
    assert hit.token == "link" and "/etc/passwd" in hit.detail


def test_every_rule_has_a_tier() -> None:
    assert set(rules.HARD_RULES) | set(rules.SOFT_RULES) == set(rules.RULE_TIERS)
    assert not set(rules.HARD_RULES) & set(rules.SOFT_RULES)
    for rule in (
        "unresolved_placeholder_token",
        "leftover_jinja_marker",
        "illegal_filesystem_character",
        "reserved_filesystem_name",
        "mode_prefix_mismatch",
    ):
        assert rules.RULE_TIERS[rule] == "hard"
    for rule in ("orphan", "malformed_yaml_front_matter", "missing_required_field", "symlink_skipped"):
        assert rules.RULE_TIERS[rule] == "soft"


# -- Finding -------------------------------------------------------------------


def _finding(rule: str, tier: str, path: str, token: str = "t") -> Finding:
    return Finding(
        rule=rule,
        tier=tier,
        run_path="/r",
        offending_path=path,
        offending_kind="file_name",
        matched_token=token,
        rule_detail="d",
    )


def test_finding_order_and_dict() -> None:
    findings = [
        _finding("orphan", "soft", "/a"),
        _finding("reserved_filesystem_name", "hard", "/b"),
        _finding("illegal_filesystem_character", "hard", "/b", "z"),
        _finding("illegal_filesystem_character", "hard", "/b", "a"),
        _finding("unresolved_placeholder_token", "hard", "/a"),
    ]
    ordered = sort_findings(findings)
    assert [(f.tier, f.offending_path, f.rule, f.matched_token) for f in ordered] == [
        ("hard", "/a", "unresolved_placeholder_token", "t"),
        ("hard", "/b", "illegal_filesystem_character", "a"),
        ("hard", "/b", "illegal_filesystem_character", "z"),
        ("hard", "/b", "reserved_filesystem_name", "t"),
        ("soft", "/a", "orphan", "t"),
    ]
    data = ordered[0].to_dict()
    assert list(data) == [
        "rule",
        "tier",
        "run_path",
        "offending_path",
        "offending_kind",
        "matched_token",
        "rule_detail",
        "synced_under_prior_policy",
        "override_active",
    ]
    assert Finding.from_dict(data) == ordered[0]


def test_finding_rejects_bad_tier() -> None:
    with pytest.raises(ValueError):
        _finding("x", "medium", "/a")
