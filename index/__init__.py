"""The workspace index (watch -> chunk -> embed -> store -> retrieve).

Modules (nothing heavy is imported here):

- `config`: `IndexConfig`, the ``index`` section of the settings;
- `service`: `WorkspaceIndex`, the worker that keeps a folder's index current;
  its parts, by concern: `state` (shared attributes), `status` (`stats()`,
  waits, `ProgressEvent` / `IndexStats`), `events` (file events, unsaved
  edits), `scan` (scans and batches), `upkeep` (embeddings, maintenance),
  `query` (search);
- `retrieve`: `WorkspaceRetriever`, the engine's `ContextSource`;
- `cli`: `run_index` / `run_search` for ``exlsp index`` and ``exlsp search``;
- `files`, `watch`, `chunk`, `lexical`, `embed`, `store`, `search`: the parts;
  `store`'s `ChunkStore` is built in layers: `storage` (the database's place),
  `table` (schema and rows), `table_indexes`, `table_search`.
"""
