"""The workspace index (watch -> chunk -> embed -> store -> retrieve).

Modules (nothing heavy is imported here):

- `config`: `IndexConfig`, the ``index`` section of the settings;
- `service`: `WorkspaceIndex`, the worker that keeps a folder's index current,
  and its `ProgressEvent` / `IndexStats`;
- `retrieve`: `WorkspaceRetriever`, the engine's `ContextSource`;
- `cli`: `run_index` / `run_search` for ``exlsp index`` and ``exlsp search``;
- `files`, `watch`, `chunk`, `lexical`, `embed`, `store`, `search`: the parts;
  `store`'s `ChunkStore` is built in layers: `storage` (the database's place),
  `table` (schema and rows), `table_indexes`, `table_search`.
"""
