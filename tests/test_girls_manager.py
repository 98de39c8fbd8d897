"""The roster against a real PostgreSQL: validation, admin writes, what each bot presents, paging,
search, favourites, users, import/export, the per-process cache, and cross-process invalidation
with real processes (a write elsewhere, a lost LISTEN connection)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import re
import threading

import psycopg2
import pytest

import roster_cache
from backoff import Backoff
from control import CACHE_FIELDS
from girls_manager import GirlsManager, ImportRejected, ProfileNotFound, RosterError
from multiprocess_connection_manager import ConnectionManager, DatabaseError, Migrator
from roster_cache import RosterCache

FILE_ID = "AgACAgIAAxkBAAIBY2Zk3_file-id_0123456789"


@pytest.fixture
def migrated(db):
    Migrator(db).migrate()
    return db


def listening(db: ConnectionManager, bot: str = "alpha", **options) -> GirlsManager:
    manager = GirlsManager(db, bot, **options)
    manager.start_listener()
    assert manager.wait_listening(10), "the listener did not connect"
    return manager


@pytest.fixture
def roster(migrated):
    manager = listening(migrated)
    yield manager
    manager.close()


def names(profiles) -> list[str]:
    return [profile.name for profile in profiles]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields, message", [
    ({"name": "   "}, "name is empty; a profile needs a name"),
    ({"name": "x" * 65}, "name is 65 characters; the limit is 64"),
    ({"name": "Ann\nBea"}, "name contains a control character (such as a line break); use plain text"),
    ({"bio": "b" * 1240}, "bio is 1240 characters; the limit is 1000"),
    ({"bio": "bell \x07"}, "bio contains a control character; only line breaks and tabs are allowed"),
    ({"tags": [f"t{i}" for i in range(11)]}, "tags: 11 given; the limit is 10"),
    ({"tags": ["Bad Tag"]}, "tags: 'Bad Tag' must match [a-z0-9_-]{1,32}"),
    ({"tags": "ok," + "x" * 33}, "tags: '" + "x" * 33 + "' must match [a-z0-9_-]{1,32}"),
    ({"tags": ["ok", 7]}, "tags: expected a list of tags or text like 'a,b'"),
    ({"photo": "ftp://example.com/a.jpg"},
     "photo: 'ftp://example.com/a.jpg' must be an http(s) URL or a Telegram file id"),
    ({"photo": "my photo"}, "photo: 'my photo' must be an http(s) URL or a Telegram file id"),
])
def test_each_limit_is_refused_with_a_message_that_says_what_to_change(fields, message):
    unreachable = ConnectionManager("host=/nonexistent dbname=never_reached", role="unused")
    with pytest.raises(RosterError) as refused:  # a DatabaseError if it got as far as the database
        GirlsManager(unreachable, "alpha").add(**{"name": "Ann", **fields})
    assert str(refused.value) == message


def test_values_at_the_limits_are_accepted_trimmed_and_normalised(roster):
    longest = roster.add("  " + "N" * 64 + "  ", bio="b" * 1000, tags=[f"t{i}" for i in range(10)], photo=FILE_ID)
    assert (longest.name, len(longest.bio), len(longest.tags), longest.photo) == ("N" * 64, 1000, 10, FILE_ID)
    tagged = roster.add("Ann", bio="line one\r\nline two", tags="Red, blue,red ,  GREEN", photo="https://x.example/a.jpg")
    assert tagged.tags == ("red", "blue", "green")
    assert roster.add("Bea", tags=(t for t in ["X", "y"])).tags == ("x", "y")
    assert tagged.bio == "line one\nline two"
    assert tagged.visible is True and tagged.created_at == tagged.updated_at


BAD_TAG = "tags: 'Bad Tag' must match [a-z0-9_-]{1,32}"


def test_tags_given_as_text_are_separated_by_commas_only_each_piece_trimmed(roster):
    assert roster.add("Ann", tags="a, b").tags == ("a", "b")
    assert roster.add("Bea", tags=" , Tea,,walks , ").tags == ("tea", "walks")  # empty pieces are ignored
    assert roster.edit("Bea", "tags", "x,  y").tags == ("x", "y")


def test_a_tag_with_a_space_is_refused_by_add_and_edit_not_split_in_two(roster):
    with pytest.raises(RosterError) as refused:
        roster.add("Ann", tags="ok, Bad Tag")
    assert str(refused.value) == BAD_TAG
    assert roster.all_profiles() == []
    roster.add("Bea", tags="tea")
    with pytest.raises(RosterError) as refused:
        roster.edit("Bea", "tags", "Bad Tag")
    assert str(refused.value) == BAD_TAG
    assert roster.get_any("Bea").tags == ("tea",)


def test_an_import_row_whose_tags_text_has_a_space_is_refused_and_nothing_changes(roster):
    roster.add("Keep", tags="tea")
    with pytest.raises(ImportRejected) as rejected:
        roster.import_profiles([{"name": "Ann", "tags": "ok"}, {"name": "Bea", "tags": "Bad Tag"},
                                {"name": "Keep", "tags": "new"}])
    assert rejected.value.problems == [f"row 2: {BAD_TAG}"]
    assert [(p.name, p.tags) for p in roster.all_profiles()] == [("Keep", ("tea",))]


def test_a_duplicate_name_is_refused_case_insensitively_naming_the_existing_profile(roster):
    roster.add("Ann")
    with pytest.raises(RosterError, match=r"^a profile named 'Ann' already exists$"):
        roster.add(" ANN ")
    roster.add("Bea")
    with pytest.raises(RosterError, match=r"^a profile named 'Ann' already exists$"):
        roster.edit("Bea", "name", "ann")
    assert names(roster.all_profiles()) == ["Ann", "Bea"]


# --------------------------------------------------------------------------- admin writes


def test_edit_changes_each_field_and_refuses_the_rest(roster):
    roster.add("Ann", bio="old", tags="a", photo=FILE_ID)
    assert roster.edit("ann", "bio", " new bio ").bio == "new bio"
    assert roster.edit("Ann", "tags", "x,y, z").tags == ("x", "y", "z")
    assert roster.edit("Ann", "photo", "https://example.com/p.png").photo == "https://example.com/p.png"
    assert roster.edit("Ann", "photo", "-").photo is None
    roster.edit("Ann", "photo", FILE_ID)
    assert roster.edit("Ann", "photo", "").photo is None
    renamed = roster.edit("Ann", "NAME", "Anna")
    assert renamed.name == "Anna" and renamed.updated_at > renamed.created_at
    with pytest.raises(RosterError, match=r"^cannot edit 'age'; editable fields: name, bio, tags, photo$"):
        roster.edit("Anna", "age", "21")
    with pytest.raises(ProfileNotFound, match=r"^no profile named 'Zed'$"):
        roster.edit("Zed", "bio", "x")


def test_hidden_profile_is_not_presented_but_admins_still_reach_it_by_name(roster):
    ann = roster.add("Ann", bio="tea")
    roster.add("Bea")
    assert roster.hide("ann").visible is False
    assert roster.count() == 1 and names(roster.page(0).items) == ["Bea"]
    assert roster.search("tea") == []
    with pytest.raises(ProfileNotFound, match=rf"^no profile with id {ann.id}$"):
        roster.get(ann.id)
    with pytest.raises(ProfileNotFound, match=r"^no profile named 'Ann'$"):
        roster.find_by_name("Ann")
    assert roster.get_any("ANN").visible is False
    assert roster.edit("Ann", "bio", "coffee").bio == "coffee"
    assert roster.show("Ann").visible is True
    assert roster.get(ann.id).bio == "coffee" and roster.find_by_name(" aNN ").id == ann.id


def test_delete_returns_the_profile_and_takes_its_favourites_with_it(roster, migrated):
    ann = roster.add("Ann")
    roster.toggle_favourite(7, "Ann")
    assert roster.delete("ANN") == ann
    assert migrated.fetchval("SELECT count(*) FROM dims_favourites") == 0
    with pytest.raises(ProfileNotFound, match=r"^no profile named 'Ann'$"):
        roster.get_any("Ann")
    with pytest.raises(ProfileNotFound, match=r"^no profile named 'Ann'$"):
        roster.delete("Ann")


def test_unknown_ids_and_impossible_names_are_not_found_rather_than_a_database_error(roster):
    roster.add("Ann")
    for profile_id in (0, -1, 2 ** 63, 999):
        with pytest.raises(ProfileNotFound):
            roster.get(profile_id)
    for name in ("Ann\x00", "\ud800"):
        for lookup in (roster.find_by_name, roster.get_any, roster.hide, roster.delete,
                       lambda n: roster.toggle_favourite(1, n), lambda n: roster.edit(n, "bio", "x")):
            with pytest.raises(ProfileNotFound):
                lookup(name)
    assert names(roster.all_profiles()) == ["Ann"]


# --------------------------------------------------------------------------- what a bot presents


def test_a_bot_with_roster_tags_presents_only_visible_profiles_carrying_one_of_them(roster, migrated):
    roster.add("Ann", tags="blonde,tall")
    roster.add("Bea", tags="tall")
    roster.add("Cat", tags="short")
    roster.add("Dee", tags="blonde")
    roster.hide("Dee")
    beta = GirlsManager(migrated, "beta", roster_tags=("blonde", "tall"))
    assert beta.count() == 2
    assert names(beta.page(0).items) == ["Ann", "Bea"]
    assert names(beta.search("a")) == ["Ann", "Bea"]
    assert beta.find_by_name("bea").name == "Bea"
    for name in ("Cat", "Dee"):
        with pytest.raises(ProfileNotFound):
            beta.find_by_name(name)
        with pytest.raises(ProfileNotFound):
            beta.toggle_favourite(1, name)
    assert roster.count() == 3  # alpha has no roster_tags: every visible profile


def test_pages_follow_lower_name_order_and_clamp_the_page_number(roster):
    for name in ["delta", "Alpha", "charlie", "Bravo", "echo", "Foxtrot", "golf", "Hotel", "india", "Juliet"]:
        roster.add(name)
    first, middle, last = roster.page(0, per_page=4), roster.page(1, per_page=4), roster.page(2, per_page=4)
    assert [(p.number, p.pages, p.total) for p in (first, middle, last)] == [(0, 3, 10), (1, 3, 10), (2, 3, 10)]
    assert names(first.items + middle.items + last.items) == [
        "Alpha", "Bravo", "charlie", "delta", "echo", "Foxtrot", "golf", "Hotel", "india", "Juliet"]
    assert roster.page(99, per_page=4) == last
    assert roster.page(-3, per_page=4) == first


def test_an_empty_roster_has_one_empty_page(roster):
    empty = roster.page(5)
    assert (empty.items, empty.number, empty.pages, empty.total) == ((), 0, 1, 0)


# --------------------------------------------------------------------------- search


def test_search_matches_name_bio_or_a_tag_case_insensitively_in_any_script(roster):
    roster.add("Анна", bio="Любит ЧАЙ")
    roster.add("🌸 Sakura", bio="spring", tags="flower")
    roster.add("Bea", tags="tea-lover")
    assert names(roster.search("анн")) == ["Анна"]
    assert names(roster.search("чай")) == ["Анна"]
    assert names(roster.search("🌸")) == ["🌸 Sakura"]
    assert names(roster.search("SPRING")) == ["🌸 Sakura"]
    assert names(roster.search("FLOW")) == ["🌸 Sakura"]
    assert names(roster.search("tea-lo")) == ["Bea"]
    assert names(roster.search("a")) == ["Bea", "🌸 Sakura"]  # Latin a: not in Анна
    assert names(roster.search("a", limit=1)) == ["Bea"]
    assert roster.search("nobody") == []


def test_search_finds_text_within_one_tag_never_across_two(roster):
    roster.add("Ann", tags="hip,hop")
    roster.add("Bea", bio="loves hip hop")
    roster.add("Cat", tags="hip-hop")
    assert names(roster.search("HIP")) == ["Ann", "Bea", "Cat"]
    assert names(roster.search("hip hop")) == ["Bea"]
    assert names(roster.search("p h")) == ["Bea"]
    assert names(roster.search("p-h")) == ["Cat"]
    assert roster.search("hip,hop") == [] and roster.search("hiphop") == []


def test_search_takes_like_wildcards_literally(roster):
    roster.add("Ann", bio="100% real")
    roster.add("Bea", bio="snake_case and back\\slash")
    roster.add("Cat", bio="plain")
    assert names(roster.search("%")) == ["Ann"]
    assert names(roster.search("_")) == ["Bea"]
    assert names(roster.search("\\")) == ["Bea"]
    assert names(roster.search("e_c")) == ["Bea"]
    assert roster.search("p%n") == [] and roster.search("pl_in") == []


def test_any_search_input_is_harmless(roster):
    roster.add("Ann", bio="tea")
    for text in ["'; DROP TABLE dims_girls; --", "Ann' OR '1'='1", "%' OR name ILIKE '%", "x" * 5000,
                 "nul\x00byte", "lone \ud800 surrogate", "😀" * 100, "$$; SELECT pg_sleep(10); $$"]:
        assert roster.search(text) == [], text[:40]
    assert names(roster.search("TEA")) == ["Ann"]
    assert names(roster.all_profiles()) == ["Ann"]


def test_empty_search_text_says_what_to_do(roster):
    with pytest.raises(RosterError, match=r"^give some text to search for$"):
        roster.search("   ")


# --------------------------------------------------------------------------- favourites and users


def test_favourite_toggles_and_lists_only_what_the_bot_still_presents(roster):
    ann = roster.add("Ann")
    roster.add("Bea")
    assert roster.toggle_favourite(7, "ann") == (ann, True)
    roster.toggle_favourite(7, "Bea")
    assert names(roster.favourites(7)) == ["Ann", "Bea"]
    assert roster.is_favourite(7, ann.id) and not roster.is_favourite(8, ann.id)
    roster.hide("Ann")
    assert names(roster.favourites(7)) == ["Bea"] and not roster.is_favourite(7, ann.id)
    roster.show("Ann")
    assert names(roster.favourites(7)) == ["Ann", "Bea"]
    profile, now_favourite = roster.toggle_favourite(7, "Ann")
    assert (profile.name, now_favourite) == ("Ann", False)
    assert names(roster.favourites(7)) == ["Bea"]
    with pytest.raises(ProfileNotFound, match=r"^no profile named 'Zed'$"):
        roster.toggle_favourite(7, "Zed")


def test_favourites_are_kept_per_bot(roster, migrated):
    roster.add("Ann")
    beta = GirlsManager(migrated, "beta")
    roster.toggle_favourite(7, "Ann")
    assert beta.favourites(7) == []
    assert beta.toggle_favourite(7, "Ann")[1] is True
    assert roster.toggle_favourite(7, "Ann")[1] is False
    assert names(beta.favourites(7)) == ["Ann"] and roster.favourites(7) == []


def test_touch_user_keeps_first_seen_and_moves_last_seen(roster, migrated):
    roster.touch_user(42, "ann_fan", "Ann")
    (first_seen, last_seen), = migrated.fetchall(
        "SELECT first_seen, last_seen FROM dims_users WHERE bot = 'alpha' AND user_id = 42")
    assert first_seen == last_seen
    roster.touch_user(42, None, "Annie")
    GirlsManager(migrated, "beta").touch_user(42, "other", "Other")
    row = migrated.fetchone("SELECT username, first_name, first_seen, last_seen FROM dims_users "
                            "WHERE bot = 'alpha' AND user_id = 42")
    assert row[:3] == (None, "Annie", first_seen) and row[3] > last_seen
    assert migrated.fetchval("SELECT count(*) FROM dims_users") == 2


# --------------------------------------------------------------------------- import and export


def test_import_reports_every_bad_row_and_changes_nothing(roster):
    roster.add("Keep", bio="as it was")
    rows = [{"name": "Ann"}, {"name": "Bea", "tags": ["Bad Tag"]}, {"name": "x" * 70}, "Cat",
            {"name": "Dee", "age": 21}, {"name": "ann"}, {"name": "Keep", "bio": "changed"}]
    with pytest.raises(ImportRejected) as rejected:
        roster.import_profiles(rows, replace=True)
    assert rejected.value.problems == [
        "row 2: tags: 'Bad Tag' must match [a-z0-9_-]{1,32}",
        "row 3: name is 70 characters; the limit is 64",
        "row 4: expected an object with a name, got str",
        "row 5: unknown field 'age' (known: name, bio, tags, photo, visible, created_at, updated_at)",
        "row 6: name 'ann' is already used by row 1",
    ]
    assert str(rejected.value).startswith("5 bad rows, nothing imported:\nrow 2: ")
    assert [(p.name, p.bio) for p in roster.all_profiles()] == [("Keep", "as it was")]


def test_import_upserts_by_name_and_counts_what_it_did(roster):
    roster.add("Ann", bio="old", tags="a")
    roster.add("Bea", bio="same")
    roster.add("Cat")
    counts = roster.import_profiles([{"name": "ANN", "bio": "new"}, {"name": "Bea", "bio": "same"},
                                     {"name": "Dee", "tags": "x, y", "visible": "false"}])
    assert counts == {"added": 1, "updated": 1, "unchanged": 1, "deleted": 0}
    ann = roster.get_any("Ann")
    assert (ann.name, ann.bio, ann.tags) == ("ANN", "new", ("a",))  # fields not in the row are kept
    assert roster.get_any("Dee").visible is False and roster.get_any("Dee").tags == ("x", "y")
    assert roster.import_profiles([{"name": "Bea", "bio": "same"}], replace=True) == \
        {"added": 0, "updated": 0, "unchanged": 1, "deleted": 3}
    assert names(roster.all_profiles()) == ["Bea"]


def test_export_then_import_into_a_fresh_database_round_trips_exactly(roster, pg_admin_dsn):
    from tests.conftest import create_database, drop_database
    roster.add("Анна", bio="многострочный\nбио, с запятой", tags="ru,tea",
               photo="https://example.com/a.jpg")
    roster.add("🌸 Sakura", photo=FILE_ID)
    roster.add("Hidden")
    roster.hide("Hidden")
    exported = roster.export()
    fresh_dsn = create_database(pg_admin_dsn)
    fresh = ConnectionManager(fresh_dsn, role="fresh", maxconn=1)
    try:
        Migrator(fresh).migrate()
        other = GirlsManager(fresh, "cli")
        assert other.import_profiles(exported) == {"added": 3, "updated": 0, "unchanged": 0, "deleted": 0}
        assert other.export() == exported
        assert other.import_profiles(exported) == {"added": 0, "updated": 0, "unchanged": 3, "deleted": 0}
    finally:
        fresh.close()
        drop_database(pg_admin_dsn, fresh_dsn)


# --------------------------------------------------------------------------- the cache


def test_a_repeated_read_is_served_from_the_cache(roster):
    roster.add("Ann")
    before = roster.cache_stats()
    assert (before["hits"], before["misses"], before["hit_rate"]) == (0, 0, None)   # no lookups: no rate
    assert roster.count() == 1 and roster.count() == 1
    after = roster.cache_stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"], after["entries"]) == (1, 1, 1)
    assert after["hit_rate"] == round(after["hits"] / (after["hits"] + after["misses"]), 3)
    assert set(after) == {"hits", "misses", "hit_rate", "entries", "evictions", "invalidations"} == set(CACHE_FIELDS)


def test_the_least_recently_used_entry_is_evicted_beyond_cache_size(migrated):
    manager = listening(migrated, cache_size=2)
    try:
        a, b, c = (manager.add(name) for name in ("A", "B", "C"))
        for profile in (a, b, c):
            manager.get(profile.id)
        assert (manager.cache_stats()["evictions"], manager.cache_stats()["entries"]) == (1, 2)
        hits = manager.cache_stats()["hits"]
        manager.get(b.id)
        assert manager.cache_stats()["hits"] == hits + 1
        manager.get(a.id)  # evicted: read again, and now C (least recently used) goes
        assert manager.cache_stats()["hits"] == hits + 1
        assert manager.cache_stats()["evictions"] == 2
    finally:
        manager.close()


def test_a_cached_entry_expires_after_the_ttl(migrated, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(roster_cache, "monotonic", lambda: now[0])
    manager = listening(migrated, cache_ttl=30)
    try:
        manager.count()
        now[0] += 29.9
        manager.count()
        assert manager.cache_stats()["hits"] == 1
        now[0] += 0.2
        manager.count()
        assert (manager.cache_stats()["hits"], manager.cache_stats()["misses"]) == (1, 2)
    finally:
        manager.close()


def test_a_write_invalidates_the_writers_cache_before_it_returns(roster):
    roster.add("Ann")
    assert roster.count() == 1 and roster.count() == 1
    invalidations = roster.cache_stats()["invalidations"]
    roster.add("Bea")
    assert roster.cache_stats()["invalidations"] == invalidations + 1
    assert roster.count() == 2 and names(roster.page(0).items) == ["Ann", "Bea"]


def test_a_favourite_change_drops_only_that_users_entry(roster):
    roster.add("Ann")
    roster.favourites(1), roster.favourites(2), roster.count()
    assert roster.cache_stats()["entries"] == 3
    roster.toggle_favourite(1, "Ann")
    assert roster.cache_stats()["entries"] == 2
    hits = roster.cache_stats()["hits"]
    roster.favourites(2), roster.count()
    assert roster.cache_stats()["hits"] == hits + 2
    assert names(roster.favourites(1)) == ["Ann"]
    assert roster.cache_stats()["hits"] == hits + 2


def test_without_a_listener_reads_bypass_the_cache_and_see_changes_made_behind_its_back(migrated):
    manager = GirlsManager(migrated, "alpha")
    manager.add("Ann", bio="old")
    assert manager.find_by_name("Ann").bio == "old"
    migrated.execute("UPDATE dims_girls SET bio = 'changed directly'")
    assert manager.find_by_name("Ann").bio == "changed directly"
    assert (manager.cache_stats()["hits"], manager.cache_stats()["entries"]) == (0, 0)


def test_a_stopped_listener_switches_the_cache_off(roster, migrated):
    roster.add("Ann", bio="old")
    roster.find_by_name("Ann")
    roster.stop_listener()
    migrated.execute("UPDATE dims_girls SET bio = 'changed directly'")
    assert roster.find_by_name("Ann").bio == "changed directly"
    assert roster.cache_stats()["entries"] == 0
    roster.start_listener()
    roster.start_listener()  # idempotent: still one listener
    assert roster.wait_listening(10)
    assert len(listener_pids(migrated.dsn, "test")) == 1


def test_a_read_racing_a_write_does_not_cache_what_the_write_replaced(roster, migrated, monkeypatch):
    roster.add("Ann", bio="old")
    writer = GirlsManager(migrated, "alpha")  # another manager: invalidates this one by NOTIFY only
    real_load = roster._load_search

    def load_then_let_a_write_land(text, limit):
        result = real_load(text, limit)
        seen = roster.cache_stats()["invalidations"]
        writer.edit("Ann", "bio", "new")
        assert roster.wait_invalidations(seen + 1, 10)
        return result

    monkeypatch.setattr(roster, "_load_search", load_then_let_a_write_land)
    assert roster.search("Ann")[0].bio == "old"
    monkeypatch.undo()
    assert roster.search("Ann")[0].bio == "new"


def test_threads_reading_while_another_writes_end_up_seeing_every_write(roster):
    stop, failures = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            try:
                roster.page(0, per_page=50), roster.count(), roster.search("girl", limit=50)
            except Exception as exc:  # reported below
                failures.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        for number in range(30):
            roster.add(f"girl {number:02d}")
    finally:
        stop.set()
        for thread in readers:
            thread.join(10)
    assert failures == []
    assert roster.count() == 30
    assert len(roster.page(0, per_page=50).items) == 30 and len(roster.search("girl", limit=50)) == 30
    stats = roster.cache_stats()
    assert stats["hits"] > 0 and stats["invalidations"] >= 30


# --------------------------------------------------------------------------- other processes


def listener_pids(dsn: str, role: str) -> list[int]:
    """Server pids of the LISTEN connections of the managers on pools with this role."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = %s", (f"dims:{role}:listen",))
        return [row[0] for row in cur.fetchall()]


_READER_REQUESTS = {
    "names": lambda roster: names(roster.page(0).items),
    "favourites": lambda roster, user: names(roster.favourites(user)),
    "stats": lambda roster: roster.cache_stats(),
    "invalidated": lambda roster, count: roster.wait_invalidations(count, 10),
    "listening": lambda roster: roster.wait_listening(10),
}


def _reader_process(dsn: str, requests, replies) -> None:
    """A bot-like process: bot alpha's roster with its listener, answering the test's requests."""
    db = ConnectionManager(dsn, role="reader", maxconn=2)
    roster = GirlsManager(db, "alpha")
    roster.start_listener()
    try:
        replies.put(roster.wait_listening(10))
        for kind, *args in iter(lambda: requests.get(timeout=60), None):
            replies.put(_READER_REQUESTS[kind](roster, *args))
    except Exception as exc:  # reported to the test, which fails on it
        replies.put(f"reader failed: {exc!r}")
    finally:
        roster.close()
        db.close()


class Reader:
    """The test's side of `_reader_process`: every request waits at most 20 s for its answer."""

    def __init__(self, dsn: str):
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_reader_process, args=(dsn, self.requests, self.replies))

    def __enter__(self) -> Reader:
        self.process.start()
        assert self.replies.get(timeout=30) is True, "the reader's listener did not connect"
        return self

    def ask(self, kind: str, *args):
        self.requests.put((kind, *args))
        reply = self.replies.get(timeout=20)
        assert not (isinstance(reply, str) and reply.startswith("reader failed")), reply
        return reply

    def __exit__(self, *exc_info) -> None:
        self.requests.put(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def test_a_write_in_one_process_is_seen_by_another_processes_next_read(roster, migrated, database_url):
    roster.add("Ann")
    with Reader(database_url) as reader:
        assert reader.ask("names") == ["Ann"]
        assert reader.ask("names") == ["Ann"]
        assert reader.ask("favourites", 7) == []
        stats = reader.ask("stats")
        assert (stats["hits"], stats["entries"]) == (1, 2)

        roster.add("Bea")
        assert reader.ask("invalidated", stats["invalidations"] + 1), "the reader saw no notification"
        assert reader.ask("names") == ["Ann", "Bea"]

        GirlsManager(migrated, "beta").toggle_favourite(7, "Ann")  # another bot's: the reader ignores it
        roster.toggle_favourite(7, "Bea")
        assert reader.ask("invalidated", stats["invalidations"] + 2)
        assert reader.ask("favourites", 7) == ["Bea"]
        after = reader.ask("stats")
        assert after["invalidations"] == stats["invalidations"] + 2
        assert reader.ask("names") == ["Ann", "Bea"] and reader.ask("stats")["hits"] == after["hits"] + 1


def test_a_lost_notification_connection_flushes_the_cache_and_the_listener_reconnects(roster, database_url):
    roster.add("Ann")
    with Reader(database_url) as reader:
        reader.ask("names"), reader.ask("names")
        before = reader.ask("stats")
        assert (before["hits"], before["entries"]) == (1, 1)
        [old_pid] = listener_pids(database_url, "reader")

        with contextlib.closing(psycopg2.connect(database_url)) as admin, admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s, 5000)", (old_pid,))
            assert cur.fetchone() == (True,)

        assert reader.ask("invalidated", before["invalidations"] + 1), "the lost connection was not noticed"
        assert reader.ask("listening"), "the listener did not reconnect"
        flushed = reader.ask("stats")
        assert (flushed["invalidations"], flushed["entries"]) == (before["invalidations"] + 1, 0)
        [new_pid] = listener_pids(database_url, "reader")
        assert new_pid != old_pid

        reader.ask("names"), reader.ask("names")
        assert reader.ask("stats")["hits"] == before["hits"] + 1  # caching again
        roster.add("Bea")
        assert reader.ask("invalidated", before["invalidations"] + 2)
        assert reader.ask("names") == ["Ann", "Bea"]


class FlakyDb:
    """A connection manager whose next `refusals` new connections are refused, as in an outage."""

    def __init__(self, db: ConnectionManager, refusals: int = 0):
        self.db, self.refusals = db, refusals

    def connect(self, **options):
        if self.refusals > 0:
            self.refusals -= 1
            raise DatabaseError("cannot connect to the test server: refused")
        return self.db.connect(**options)


def listener_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "roster_cache"]


REFUSED = "alpha: roster listener cannot connect to the test server: refused; cache off"


def test_a_refused_listener_logs_once_per_doubling_of_its_delay_and_once_when_it_connects(migrated, caplog):
    caplog.set_level(logging.INFO, logger="roster_cache")
    cache = RosterCache(FlakyDb(migrated, refusals=12), "alpha", 16, 60, reconnect=Backoff(0.01, 0.04, jitter=0.0))
    cache.start()
    try:
        assert cache.wait_listening(10), "the listener did not connect after the refusals"
    finally:
        cache.stop()
    lines = listener_lines(caplog)
    assert lines[:3] == [f"{REFUSED}, attempt 1, next in 0.01 s",
                         f"{REFUSED}, attempt 2, next in 0.02 s",
                         f"{REFUSED}, attempt 3, next in 0.04 s, then every 0.04 s without logging"]
    assert len(lines) == 4 and re.fullmatch(
        r"alpha: roster listener connected after \d+\.\d\d s \(12 failed attempts\); cache on", lines[3]), lines


def test_a_listener_that_loses_its_connection_logs_the_loss_and_its_return_once_each(migrated, caplog):
    caplog.set_level(logging.INFO, logger="roster_cache")
    flaky = FlakyDb(migrated)
    cache = RosterCache(flaky, "alpha", 16, 60, reconnect=Backoff(0.01, 0.04, jitter=0.0))
    cache.start()
    try:
        assert cache.wait_listening(10)
        assert listener_lines(caplog) == ["alpha: roster listener connected"]
        caplog.clear()
        flaky.refusals = 5
        [pid] = listener_pids(migrated.dsn, "test")
        with contextlib.closing(psycopg2.connect(migrated.dsn)) as admin, admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        assert cache.wait_invalidations(1, 10), "the lost connection was not noticed"
        assert cache.wait_listening(10), "the listener did not reconnect"
    finally:
        cache.stop()
    lost, *refused, back = listener_lines(caplog)
    assert lost.startswith("alpha: roster listener lost its connection (")
    assert lost.endswith("); cache flushed, reconnecting")
    assert refused == [f"{REFUSED}, attempt 1, next in 0.01 s",
                       f"{REFUSED}, attempt 2, next in 0.02 s",
                       f"{REFUSED}, attempt 3, next in 0.04 s, then every 0.04 s without logging"]
    assert re.fullmatch(r"alpha: roster listener reconnected after \d+\.\d\d s \(5 failed attempts\); cache on", back)
