"""Configuration: initializationOptions, workspace/configuration, didChangeConfiguration."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from typing import Any

from lsprotocol import types

from exlsp.completion.host import uses_host
from exlsp.server.config import drop_user_only, merge
from exlsp.server.features.indexing import restart_index, start_index, stop_index
from exlsp.server.lsp import ExlspServer
from exlsp.server.user_config import user_config_path, user_settings

log = logging.getLogger(__name__)

SECTION = "exlsp"


def apply_settings(ls: ExlspServer, settings: Any, origin: str, from_user: bool = False) -> bool:
    """Merge client settings; report problems once. True if the model section changed.

    Only settings `from_user` (initializationOptions) may choose a model, a host, a
    credential or a path to write: what comes later may come from a repository.
    """
    if settings is None:
        return False
    if isinstance(settings, dict) and SECTION in settings and isinstance(settings[SECTION], dict):
        settings = settings[SECTION]  # didChangeConfiguration often wraps the section
    if not from_user:
        settings, dropped = drop_user_only(ls.config, settings)
        if dropped:
            ls.show_once(
                f"exlsp: ignored {', '.join(dropped)} from the workspace settings: a model, a host,"
                " a credential or a path to write is taken only from your user settings"
                " (initializationOptions or the user configuration file); restart exlsp"
                " after changing them there",
                types.MessageType.Warning,
            )
    new, errors = merge(ls.config, settings)
    for error in errors:
        ls.show_once(f"exlsp: bad setting in {origin}: {error}", types.MessageType.Warning)
    model_changed = new.model != ls.config.model or new.assist != ls.config.assist
    ls.index_changed = new.index != ls.config.index
    ls.config = new
    ls.apply_logging()
    if ls.service is not None and not model_changed:
        ls.service.reconfigure(new.completion)
    return model_changed


async def fetch_workspace_settings(ls: ExlspServer) -> Any:
    caps = ls.client_capabilities.workspace
    if caps is None or not caps.configuration:
        return None
    try:
        # Shielded: cancelling a task that awaits a client request upsets pygls.
        result = await asyncio.shield(
            ls.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)])
            )
        )
    except Exception as e:
        log.warning("workspace/configuration failed: %s", e)
        return None
    return result[0] if result else None


def register(server: ExlspServer) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: ExlspServer, params: types.InitializeParams) -> None:
        ls.event_loop = asyncio.get_running_loop()
        ls.loop_thread = threading.get_ident()
        apply_settings(ls, user_settings(ls.show_once), str(user_config_path()), from_user=True)
        apply_settings(ls, params.initialization_options, "initializationOptions", from_user=True)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: ExlspServer, params: types.InitializedParams) -> None:
        ls.initialized = True
        ls.apply_logging()
        apply_settings(ls, await fetch_workspace_settings(ls), "workspace configuration")
        # The model loads on the backend thread while the index loads its embedder on
        # its own: a first `import transformers` in two threads at once fails in one
        # of them ("cannot import name 'AutoConfig'"). Import it once, first.
        # With the model in a model host, nothing here loads it: no race, no import.
        if not uses_host(ls.config.model):
            await asyncio.to_thread(importlib.import_module, "transformers")
        await start_index(ls)
        ls.start_model()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def did_change_configuration(
        ls: ExlspServer, params: types.DidChangeConfigurationParams
    ) -> None:
        settings = params.settings
        if not settings:
            # Pull model: the notification only says something changed.
            settings = await fetch_workspace_settings(ls)
        model_changed = apply_settings(ls, settings, "settings")
        if not ls.initialized:
            return
        if ls.index_changed:
            log.info("index settings changed: restarting the index")
            await restart_index(ls)
        if model_changed:
            log.info("model settings changed: reloading")
            ls.start_model()

    @server.feature(types.SHUTDOWN)
    async def shutdown(ls: ExlspServer, params: Any) -> None:
        # The answer is owed within a second or two (VS Code kills the server after
        # 2 s): a model load is abandoned; joining threads happens off the loop.
        try:
            await ls.stop_model()
            await stop_index(ls)
        except Exception:
            log.exception("shutdown: stopping the model or the index failed")
