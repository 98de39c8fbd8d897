"""The offline demo that `python main.py` runs when no bot is configured: two demo bots on the
local Telegram sandbox, a small neutral roster, and instructions for talking to them.

Called by `main.py` only. Writes `{data_dir}/demo.toml` (so the operator CLI finds the demo
bots) and seeds the roster when it is empty. Imports `config` and the database layers.
"""

from __future__ import annotations

from pathlib import Path

from config import Config
from girls_manager import GirlsManager
from multiprocess_connection_manager import DatabaseIntegrationManager

DEMO_USER = 1000   # the sandbox user `chat` talks as; an admin of the alpha bot
DEMO_BOTS = (
    # name, token (sandbox-only, not a real Telegram token), display name, roster tags
    ("alpha", "1000001:DEMO-alpha-sandbox-only", "Demo Alpha", ()),
    ("beta", "1000002:DEMO-beta-sandbox-only", "Demo Beta", ("music",)),
)
DEMO_ROSTER = (
    ("Ada", "Mathematician at heart; plays chess on Sundays.", ("chess", "science")),
    ("Bianca", "Jazz singer who collects old vinyl records.", ("music", "jazz")),
    ("Chiara", "Trail runner and amateur astronomer.", ("running", "science")),
    ("Dana", "Paints watercolours of harbour towns.", ("art",)),
    ("Elena", "Cellist in a string quartet; loves long walks.", ("music", "classical")),
    ("Farah", "Bakes sourdough and restores old bicycles.", ("cooking", "cycling")),
    ("Greta", "Marine biologist, free diver, bad at karaoke.", ("science", "diving")),
    ("Hana", "Writes short stories on the morning train.", ("books",)),
    ("Ines", "Salsa teacher who speaks four languages.", ("music", "dance")),
    ("Jade", "Rock climber and weekend photographer.", ("climbing", "art")),
    ("Kira", "Builds tiny robots and plays the drums.", ("science", "music")),
    ("Lena", "Gardener growing forty kinds of tomatoes.", ("cooking", "garden")),
)


def write_config(config: Config, api_url: str) -> Path:
    """The demo's configuration file, in the data directory; returns its path."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    path = config.data_dir / "demo.toml"
    lines = [f"data_dir = {_toml_string(str(config.data_dir))}", "", "[telegram]", f"api_url = {_toml_string(api_url)}", ""]
    if config.database.url:
        lines += ["[database]", f"url = {_toml_string(config.database.url)}", ""]
    if config.supervisor.socket:
        lines += ["[supervisor]", f"socket = {_toml_string(config.supervisor.socket)}", ""]
    for name, token, display, tags in DEMO_BOTS:
        lines += ["[[bots]]", f'name = "{name}"', f'token = "{token}"', f'display_name = "{display}"',
                  f"admins = [{DEMO_USER}]" if name == "alpha" else "admins = []",
                  "roster_tags = [" + ", ".join(f'"{t}"' for t in tags) + "]", ""]
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def seed_roster(config: Config) -> int:
    """Add the demo profiles when the roster is empty; returns how many were added."""
    manager = DatabaseIntegrationManager(config, role="demo", pool_max=1)
    try:
        girls = GirlsManager(manager.initialize_database_coordination(), "demo")
        if girls.all_profiles():
            return 0
        for name, bio, tags in DEMO_ROSTER:
            girls.add(name, bio, tags)
        return len(DEMO_ROSTER)
    finally:
        manager.shutdown()


def instructions(config: Config, sandbox_url: str) -> str:
    names = ", ".join(f"{b.name} ({b.display_name})" for b in config.bots)
    dims = _launcher()
    return f"""
DIMS demo: {len(config.bots)} bots ({names}) on a local Telegram sandbox at {sandbox_url}
  talk to a bot:   {dims} chat alpha      (you are user {DEMO_USER}, an admin of alpha)
                   then try /start, /girls, /find music, /help; #N presses button N
                   (the same: python3 enhanced_ipc_commands.py chat alpha)
  see the fleet:   {dims} bot_list
  check health:    {dims} system_health
  stop the demo:   Ctrl-C here (the embedded PostgreSQL stays up for the next run;
                   {dims} db_stop stops it)
""".rstrip("\n")


def _launcher() -> str:
    """The `dims` launcher as the operator can type it from here."""
    launcher = Path(__file__).resolve().parent / "dims"
    try:
        return f"./{launcher.relative_to(Path.cwd().resolve())}"
    except ValueError:
        return str(launcher)
