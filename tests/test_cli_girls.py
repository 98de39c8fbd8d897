"""The operator's roster commands as real processes: girls_list, girls_add, girls_import and
girls_export against a real PostgreSQL, JSON and CSV round trips into a fresh database, bad rows
(exit 1, nothing changed) and bad files (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from girls_manager import GirlsManager
from multiprocess_connection_manager import Migrator
from tests.conftest import ROOT, create_database, drop_database

CLI = [sys.executable, str(ROOT / "enhanced_ipc_commands.py")]
FILE_ID = "AgACAgIAAxkBAAIBY2Zk3_file-id_0123456789"


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def roster(db):
    """The roster of the database the CLI uses, for arranging and checking."""
    Migrator(db).migrate()
    return GirlsManager(db, "test")


@pytest.fixture
def varied_roster(roster):
    roster.add("Анна", bio="многострочный\nбио, с запятой и \"кавычками\"", tags="ru,tea",
               photo="https://example.com/a.jpg")
    roster.add("🌸 Sakura", bio="  ", photo=FILE_ID)
    roster.add("Zed", tags="x")
    roster.hide("Zed")
    return roster


@pytest.fixture
def fresh_env(pg_admin_dsn, cli_env):
    """The CLI environment for a second, empty database."""
    dsn = create_database(pg_admin_dsn)
    yield {**cli_env, "DATABASE_URL": dsn}
    drop_database(pg_admin_dsn, dsn)


def test_added_profiles_are_listed_and_hidden_ones_only_with_all(cli_env, roster):
    added = run_cli("girls_add", "Ann", "--bio", "likes tea and long walks by the sea, every evening",
                    "--tags", "tea, Walks", "--photo", "https://example.com/ann.jpg", env=cli_env)
    assert (added.returncode, added.stdout.strip()) == (0, "added 'Ann' (id 1)"), added.stderr
    bea = json.loads(run_cli("girls_add", "Bea", "--json", env=cli_env).stdout)["girl"]
    assert (bea["name"], bea["tags"], bea["visible"]) == ("Bea", [], True)
    roster.hide("Bea")

    table = run_cli("girls_list", env=cli_env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "ID  NAME  VISIBLE  TAGS       BIO",
        "1   Ann   yes      tea,walks  likes tea and long walks by the sea, ev…",
    ]
    listed = json.loads(run_cli("girls_list", "--all", "--json", env=cli_env).stdout)["girls"]
    assert [(g["name"], g["visible"]) for g in listed] == [("Ann", True), ("Bea", False)]
    assert listed[0]["bio"] == "likes tea and long walks by the sea, every evening"


def test_girls_add_refuses_a_bad_or_duplicate_profile_with_exit_1_and_the_reason(cli_env, roster):
    roster.add("Ann")
    for args, reason in [(["Ann"], "a profile named 'Ann' already exists"),
                         (["Bea", "--bio", "b" * 1001], "bio is 1001 characters; the limit is 1000"),
                         (["Bea", "--tags", "ok,Not/Ok"], "tags: 'Not/Ok' must match [a-z0-9_-]{1,32}")]:
        refused = run_cli("girls_add", *args, env=cli_env)
        assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
        assert refused.stderr.strip() == f"girls_add: {reason}"
    assert [p.name for p in roster.all_profiles()] == ["Ann"]


def test_json_export_imported_into_a_fresh_database_exports_the_same_bytes(cli_env, fresh_env, varied_roster,
                                                                          tmp_path):
    exported = run_cli("girls_export", env=cli_env)
    assert exported.returncode == 0, exported.stderr
    assert [row["name"] for row in json.loads(exported.stdout)] == ["Zed", "Анна", "🌸 Sakura"]
    path = tmp_path / "roster.json"
    path.write_text(exported.stdout, encoding="utf-8")

    imported = run_cli("girls_import", str(path), "--json", env=fresh_env)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"file": str(path), "format": "json", "replace": False,
                                           "added": 3, "updated": 0, "unchanged": 0, "deleted": 0}
    assert run_cli("girls_export", env=fresh_env).stdout == exported.stdout

    again = run_cli("girls_import", str(path), env=fresh_env)
    assert again.stdout.strip() == f"imported {path}: 0 added, 0 updated, 3 unchanged"


def test_csv_export_imported_into_a_fresh_database_exports_the_same_bytes(cli_env, fresh_env, varied_roster,
                                                                         tmp_path):
    path = tmp_path / "roster.csv"
    written = run_cli("girls_export", "--output", str(path), env=cli_env)
    assert written.stdout.strip() == f"exported 3 profiles to {path} (csv)", written.stderr
    assert path.read_text(encoding="utf-8").splitlines()[0] == "name,bio,tags,photo,visible,created_at,updated_at"

    imported = run_cli("girls_import", str(path), env=fresh_env)
    assert imported.stdout.strip() == f"imported {path}: 3 added, 0 updated, 0 unchanged", imported.stderr
    assert run_cli("girls_export", "--format", "csv", env=fresh_env).stdout == path.read_text(encoding="utf-8")
    assert run_cli("girls_export", env=fresh_env).stdout == run_cli("girls_export", env=cli_env).stdout


def test_export_json_object_imports_back_and_replace_deletes_what_the_file_does_not_name(cli_env, varied_roster,
                                                                                        tmp_path):
    report = json.loads(run_cli("girls_export", "--json", env=cli_env).stdout)
    assert (report["format"], report["count"], len(report["girls"])) == ("json", 3, 3)
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"girls": [g for g in report["girls"] if g["name"] != "Zed"]}), encoding="utf-8")
    replaced = run_cli("girls_import", str(path), "--replace", env=cli_env)
    assert replaced.stdout.strip() == f"imported {path}: 0 added, 0 updated, 2 unchanged, 1 deleted", replaced.stderr
    assert [p.name for p in varied_roster.all_profiles()] == ["Анна", "🌸 Sakura"]


def test_import_with_bad_rows_exits_1_listing_every_bad_row_and_changes_nothing(cli_env, roster, tmp_path):
    roster.add("Keep", bio="as it was")
    rows = [{"name": "Good"}, {"name": "Bad", "tags": ["Bad Tag"]}, {"name": ""}, {"name": "Keep", "bio": "new"}]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(rows), encoding="utf-8")
    refused = run_cli("girls_import", str(bad_json), "--replace", env=cli_env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "girls_import: 2 bad rows, nothing imported:",
        "row 2: tags: 'Bad Tag' must match [a-z0-9_-]{1,32}",
        "row 3: name is empty; a profile needs a name",
    ]
    as_json = run_cli("girls_import", str(bad_json), "--json", env=cli_env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["errors"] == refused.stderr.splitlines()[1:]

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,bio,visible\nGood,fine,true\nAlso good,,\nMaybe,bio,perhaps\n", encoding="utf-8")
    refused_csv = run_cli("girls_import", str(bad_csv), env=cli_env)
    assert refused_csv.returncode == 1
    assert refused_csv.stderr.splitlines()[1:] == ["row 3: visible: 'perhaps' must be true or false"]
    assert [(p.name, p.bio) for p in roster.all_profiles()] == [("Keep", "as it was")]


def test_a_csv_import_whose_tags_cell_has_a_space_exits_1_naming_the_row_and_imports_nothing(cli_env, roster,
                                                                                            tmp_path):
    roster.add("Keep", tags="tea")
    path = tmp_path / "spaced.csv"
    path.write_text("name,tags\nAnn,\"walks, tea\"\nBea,Bad Tag\nKeep,new\n", encoding="utf-8")
    refused = run_cli("girls_import", str(path), env=cli_env)
    assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
    assert refused.stderr.splitlines() == ["girls_import: 1 bad row, nothing imported:",
                                           "row 2: tags: 'Bad Tag' must match [a-z0-9_-]{1,32}"]
    assert [(p.name, p.tags) for p in roster.all_profiles()] == [("Keep", ("tea",))]


@pytest.mark.parametrize("file_name, content, reason", [
    ("missing.json", None, "cannot read {path}: No such file or directory"),
    ("broken.json", '[{"name": "Ann"', "{path}: not valid JSON: Expecting ',' delimiter: line 1 column 16"),
    ("object.json", '{"name": "Ann"}', "{path}: expected a JSON array of profiles"),
    ("header.csv", "nmae,bio\nAnn,x\n", "{path}: the CSV header must have a name column and only these: "
                                        "name, bio, tags, photo, visible, created_at, updated_at (it has: nmae, bio)"),
])
def test_import_of_a_missing_or_unparsable_file_exits_2_naming_the_file(cli_env, roster, tmp_path,
                                                                        file_name, content, reason):
    path = tmp_path / file_name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run_cli("girls_import", str(path), env=cli_env)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"girls_import: {reason.format(path=path)}"), result.stderr
    assert roster.all_profiles() == []
