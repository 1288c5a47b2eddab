"""A process that indexes a workspace and keeps rewriting it until it is killed.

Used by tests/test_index_kill.py: `python tests/index_kill_helper.py ROOT DB SEED`.
Prints "ready" once the index worker runs, then "commit N" after each batch.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exlsp.index import upkeep  # noqa: E402
from exlsp.index.config import IndexConfig  # noqa: E402
from exlsp.index.service import WorkspaceIndex  # noqa: E402
from exlsp.index.watch import ChangeKind  # noqa: E402
from tests.index_helpers import FakeEmbedder  # noqa: E402


def module_text(n: int, version: int) -> str:
    return "".join(
        f"def func_{n}_{k}_v{version}(x):\n    return x * {k} + {version}\n\n" for k in range(6)
    )


def main() -> None:
    root, db, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    # Compaction, index updates and cleanup often, to be killed in them too.
    upkeep.OPTIMIZE_AFTER_COMMITS = 3
    upkeep.OPTIMIZE_AFTER_ROWS = 16
    upkeep.OPTIMIZE_BACKLOG_S = 0.0
    upkeep.EMBED_BATCH = upkeep.MAX_EMBED_BATCH = 8
    config = IndexConfig(embeddingModel="none", databaseDir=db, debounceMs=0)
    index = WorkspaceIndex(root, config, use_watchdog=False, embedder=FakeEmbedder(16))
    index.start()
    print("ready", flush=True)
    files = sorted((root / "pkg").glob("*.py"))
    commits = 0
    while True:
        index.wait_idle(30, embeddings=False)
        events = []
        for path in rng.sample(files, min(8, len(files))):
            n = int(path.stem.split("_")[1])
            path.write_text(module_text(n, rng.randrange(1000)))
            events.append((str(path), ChangeKind.CHANGED))
        if rng.random() < 0.2:
            victim = rng.choice(files)
            victim.unlink(missing_ok=True)
            events.append((str(victim), ChangeKind.DELETED))
            files.remove(victim)
        index.file_events(events)
        commits += 1
        print(f"commit {commits}", flush=True)


if __name__ == "__main__":
    main()
