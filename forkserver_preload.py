"""The module the supervisor's forkserver preloads, and nothing else imports: importing it
prepares the forkserver for the bot processes forked from it (`bot_process.prepare_forkserver`).

multiprocessing can only preload modules, not call a function, so this module's import is that
call; it is named in `host.PRELOAD`. Imports `bot_process`.
"""

import bot_process

bot_process.prepare_forkserver()
