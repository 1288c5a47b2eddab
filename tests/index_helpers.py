"""Shared pieces of the index tests: a generated workspace, a fake embedder, waiting."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from exlsp.index.config import IndexConfig
from exlsp.index.lexical import search_text
from exlsp.index.service import WorkspaceIndex

# One file per language, each with definitions whose names appear nowhere else.
SAMPLES: dict[str, str] = {
    "src/geometry.py": '''import math


def area_of_zorbling(radius):
    """Area of a circle."""
    return math.pi * radius * radius


class QuixoticShape:
    def __init__(self, sides):
        self.sides = sides

    def perimeter(self, length):
        return self.sides * length
''',
    "web/app.js": """// entry point
function renderWidgetPanel(root) {
  return root.appendChild(document.createElement("div"));
}

class PanelStore {
  constructor() { this.items = []; }
  addItem(item) { this.items.push(item); }
}

const computeLayoutGrid = (cells) => cells.map((c) => c * 2);
""",
    "web/types.ts": """export interface ShapeContract {
  area(): number;
}

export class HexagonTile implements ShapeContract {
  constructor(private side: number) {}
  area(): number { return 2.598 * this.side * this.side; }
}

export function tileCount(tiles: HexagonTile[]): number {
  return tiles.length;
}
""",
    "cmd/main.go": """package main

import "fmt"

// GopherPoint is a point.
type GopherPoint struct {
	X, Y int
}

func (p GopherPoint) Manhattan() int {
	return p.X + p.Y
}

func main() {
	fmt.Println(GopherPoint{1, 2}.Manhattan())
}
""",
    "crates/lib.rs": """/// A crab.
pub struct CrustaceanShell {
    pub weight: u32,
}

impl CrustaceanShell {
    pub fn heavier(&self, other: &CrustaceanShell) -> bool {
        self.weight > other.weight
    }
}

pub trait Molting {
    fn molt(&mut self);
}

pub fn shell_sum(shells: &[CrustaceanShell]) -> u32 {
    shells.iter().map(|s| s.weight).sum()
}
""",
    "java/Ledger.java": """package demo;

public class Ledger {
    private long balanceCents;

    public Ledger(long start) {
        this.balanceCents = start;
    }

    public long depositFunds(long amount) {
        balanceCents += amount;
        return balanceCents;
    }
}
""",
    "native/ring.c": """#include <stdlib.h>

struct ring_buffer {
    int *data;
    int size;
};

static int ring_push(struct ring_buffer *r, int v)
{
    r->data[r->size++] = v;
    return r->size;
}
""",
    "native/matrix.cpp": """#include <vector>

namespace linalg {

class SparseMatrix {
 public:
  int rows() const { return rows_; }
 private:
  int rows_ = 0;
};

double frobenius_norm(const SparseMatrix& m) {
  return static_cast<double>(m.rows());
}

}  // namespace linalg
""",
    "docs/guide.md": """# Guide

The velociraptor configuration lives in `settings.toml`.

Run the tool with `--fast` to skip the slow checks.
""",
}

# (path, symbol, kind, start_line, end_line) that the chunker must find.
EXPECTED_DEFINITIONS: list[tuple[str, str, str, int, int]] = [
    ("src/geometry.py", "area_of_zorbling", "function", 3, 6),
    ("src/geometry.py", "QuixoticShape", "class", 8, 14),
    ("web/app.js", "renderWidgetPanel", "function", 0, 4),
    ("web/app.js", "PanelStore", "class", 5, 9),
    ("web/app.js", "computeLayoutGrid", "function", 10, 11),
    ("web/types.ts", "ShapeContract", "interface", 0, 3),
    ("web/types.ts", "HexagonTile", "class", 4, 8),
    ("web/types.ts", "tileCount", "function", 9, 12),
    ("cmd/main.go", "GopherPoint", "type", 4, 8),
    ("cmd/main.go", "GopherPoint.Manhattan", "method", 9, 12),
    ("cmd/main.go", "main", "function", 13, 16),
    ("crates/lib.rs", "CrustaceanShell", "struct", 0, 4),
    ("crates/lib.rs", "CrustaceanShell", "impl", 5, 10),
    ("crates/lib.rs", "Molting", "trait", 11, 14),
    ("crates/lib.rs", "shell_sum", "function", 15, 18),
    ("java/Ledger.java", "Ledger", "class", 2, 14),
    ("native/ring.c", "ring_buffer", "struct", 2, 6),
    ("native/ring.c", "ring_push", "function", 7, 12),
    ("native/matrix.cpp", "linalg", "namespace", 2, 16),
]

SECRET_MARKER = "sekrit_zx81_do_not_index"
IGNORED_MARKER = "ignored_qq17_marker"


def write_workspace(root: Path) -> None:
    """The sample sources plus files the index must not read."""
    for rel, text in SAMPLES.items():
        write(root / rel, text)
    # Nested .gitignore files and the exclude list.
    write(root / ".gitignore", "*.log\n/generated/\n")
    write(root / "src" / ".gitignore", "local_*.py\n!local_keep.py\n")
    write(root / "src" / "local_scratch.py", f"X = '{IGNORED_MARKER}_a'\n")
    write(root / "src" / "local_keep.py", "KEEP_ME_TOO = 'kept_zz42'\n")
    write(root / "generated" / "out.py", f"Y = '{IGNORED_MARKER}_b'\n")
    write(root / "debug.log", f"{IGNORED_MARKER}_c\n")
    write(root / "node_modules" / "pkg" / "index.js", f"var z = '{IGNORED_MARKER}_d';\n")
    # Secrets: the deny-list, whatever .gitignore says.
    for rel in (
        ".env",
        "config/.env.production",
        "certs/server.pem",
        "certs/server.key",
        "home/.ssh/id_rsa",
        "id_ed25519.pub",
        "config/credentials.json",
        ".netrc",
        ".npmrc",
        "secrets.yaml",
        "keys/store.p12",
    ):
        write(root / rel, f"token = {SECRET_MARKER}_{rel.replace('/', '_')}\n")
    # Binary, oversized.
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "assets" / "blob.dat").write_bytes(b"binary_marker_qq\x00\x01\x02" * 10)
    write(root / "assets" / "huge.txt", ("oversized_marker_qq " * 10 + "\n") * 1000)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def config_for(tmp_path: Path, **overrides: object) -> IndexConfig:
    """A lexical-only configuration with its database under `tmp_path`."""
    cfg = IndexConfig(
        embeddingModel="none",
        databaseDir=str(tmp_path / "db"),
        debounceMs=50,
        maxFileBytes=100_000,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def all_rows(index: WorkspaceIndex) -> list[dict[str, object]]:
    store = index._store
    assert store is not None
    return list(store.table.search().limit(None).to_arrow().to_pylist())


def indexed_paths(index: WorkspaceIndex) -> set[str]:
    return {str(r["path"]) for r in all_rows(index)}


def touch_later(path: Path, text: str) -> None:
    """Rewrite a file so that its mtime surely changes."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


class FakeEmbedder:
    """A hashing-trick bag of identifier terms: deterministic, instant, no model."""

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim
        self.batch_sizes: list[int] = []  # one entry per `embed` call

    @property
    def name(self) -> str:
        return f"fake-hash-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _one(self, text: str) -> np.ndarray:
        vec = np.zeros(self._dim, dtype=np.float32)
        for term in search_text(text).split():
            h = int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")
            vec[h % self._dim] += 1.0 if (h >> 16) & 1 else -1.0
        norm = float(np.linalg.norm(vec))
        if norm == 0:
            vec[0] = 1.0
            return vec
        return vec / norm

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batch_sizes.append(len(texts))
        return np.stack([self._one(t) for t in texts]) if texts else np.zeros((0, self._dim))

    def embed_query(self, text: str) -> np.ndarray:
        return self._one(text)
