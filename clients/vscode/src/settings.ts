// Pure mapping between the extension's settings and what the server receives.
// This module must not import `vscode`, so node's test runner can load it.

/** The server's configuration tree as sent on the wire (camelCase, nested). */
export type WireConfig = { [section: string]: { [key: string]: unknown } };

/** Reads one setting below `exlsp.` (e.g. `"model.path"`); undefined when unknown. */
export type SettingReader = (key: string) => unknown;

/** Settings that configure the client itself and are never sent to the server. */
const CLIENT_ONLY_SECTIONS = new Set(["server", "trace"]);

const PREFIX = "exlsp.";

/**
 * The settings that belong to the server's configuration tree, as keys below
 * `exlsp.` (`"model.path"`, `"completion.maxTokens"`, ...), in the order
 * package.json declares them.
 */
export function wireSettingKeys(packageJson: unknown): string[] {
  const properties = (packageJson as {
    contributes?: { configuration?: { properties?: Record<string, unknown> } };
  })?.contributes?.configuration?.properties;
  if (!properties) {
    return [];
  }
  const keys: string[] = [];
  for (const name of Object.keys(properties)) {
    if (!name.startsWith(PREFIX)) {
      continue;
    }
    const key = name.slice(PREFIX.length);
    const parts = key.split(".");
    if (parts.length !== 2 || CLIENT_ONLY_SECTIONS.has(parts[0])) {
      continue;
    }
    keys.push(key);
  }
  return keys;
}

/**
 * Builds the nested configuration tree from flat settings:
 * `model.path = "/m"` becomes `{ model: { path: "/m" } }`. Every key is
 * present (VS Code returns the default for a setting the user left alone),
 * so the server always receives the complete tree.
 */
export function buildWireConfig(keys: readonly string[], read: SettingReader): WireConfig {
  const tree: WireConfig = {};
  for (const key of keys) {
    const dot = key.indexOf(".");
    const section = key.slice(0, dot);
    const leaf = key.slice(dot + 1);
    const value = read(key);
    if (value === undefined) {
      continue;
    }
    (tree[section] ??= {})[leaf] = value;
  }
  return tree;
}

/** Settings that decide how the server process is started. */
export interface ServerSettings {
  command?: string;
  args?: readonly string[];
  python?: string;
}

export interface ServerLaunch {
  command: string;
  args: string[];
}

/**
 * How to start the server:
 * - `server.command` set: that command with `server.args` (default `serve`);
 * - else `server.python` set: `<python> -m exlsp.server <server.args> serve`;
 * - else `exlsp <server.args> serve` from PATH.
 * The CLI's options (`--log-file`, `--log-level`) come before the subcommand.
 */
export function resolveServerLaunch(settings: ServerSettings): ServerLaunch {
  const command = (settings.command ?? "").trim();
  const python = (settings.python ?? "").trim();
  const args = [...(settings.args ?? [])].map(String);
  if (command) {
    return { command, args: args.length > 0 ? args : ["serve"] };
  }
  if (python) {
    return { command: python, args: ["-m", "exlsp.server", ...args, "serve"] };
  }
  return { command: "exlsp", args: [...args, "serve"] };
}

/** Payload of the server's `exlsp/status` notification. */
export interface ServerStatus {
  state: "loading" | "ready" | "error" | "disabled" | string;
  message?: string;
  model?: string;
  backend?: string;
  lastLatencyMs?: number | null;
}

export interface StatusBarView {
  text: string;
  tooltip: string;
}

/** Where the server process is, as the language client sees it. */
export type ServerProcess = "starting" | "running" | "stopped";

/** A `$/progress` value (WorkDoneProgressBegin / Report / End). */
export interface ProgressValue {
  kind: "begin" | "report" | "end";
  title?: string;
  message?: string;
  percentage?: number;
}

/** A work-done progress the server is running (indexing, a refactor). */
export interface ActiveProgress {
  title: string;
  message?: string;
  percentage?: number;
}

/**
 * Folds one `$/progress` value into the map of running progresses (by
 * token): `begin` adds, `report` updates, `end` removes. Returns the map.
 */
export function trackProgress(
  running: Map<string, ActiveProgress>,
  token: string | number,
  value: ProgressValue,
): Map<string, ActiveProgress> {
  const key = String(token);
  if (value.kind === "begin") {
    running.set(key, { title: value.title ?? "", message: value.message, percentage: value.percentage });
  } else if (value.kind === "report") {
    const known = running.get(key);
    if (known) {
      running.set(key, {
        title: known.title,
        message: value.message ?? known.message,
        percentage: value.percentage ?? known.percentage,
      });
    }
  } else {
    running.delete(key);
  }
  return running;
}

function progressLine(p: ActiveProgress): string {
  const parts = [p.title || "working"];
  if (p.message) parts.push(p.message);
  if (p.percentage !== undefined) parts.push(`(${Math.round(p.percentage)}%)`);
  return parts.join(" ");
}

/**
 * Text and tooltip of the status bar item. `status` is undefined until the
 * server has reported; `progress` lists what the server is working on
 * (indexing the workspace, computing a refactor), most recent last.
 */
export function statusBarView(
  status: ServerStatus | undefined,
  process: ServerProcess,
  enabled: boolean,
  progress: ActiveProgress[] = [],
): StatusBarView {
  const details = (s: ServerStatus): string[] => {
    const lines: string[] = [];
    if (s.model) lines.push(`Model: ${s.model}`);
    if (s.backend) lines.push(`Backend: ${s.backend}`);
    if (s.lastLatencyMs !== undefined && s.lastLatencyMs !== null) {
      lines.push(`Last suggestion: ${Math.round(s.lastLatencyMs)} ms`);
    }
    if (s.message) lines.push(s.message);
    return lines;
  };
  const menuHint = "Click for exlsp commands";
  if (process === "stopped") {
    return { text: "$(circle-slash) exlsp", tooltip: `exlsp: server not running\n${menuHint}` };
  }
  if (process === "starting" || !status) {
    return { text: "$(loading~spin) exlsp", tooltip: `exlsp: starting\n${menuHint}` };
  }
  const lines = [...details(status), ...progress.map(progressLine)];
  const tooltip = (head: string): string => [head, ...lines, menuHint].join("\n");
  if (!enabled || status.state === "disabled") {
    return { text: "$(circle-slash) exlsp off", tooltip: tooltip("exlsp: completions disabled") };
  }
  const current = progress[progress.length - 1];
  if (status.state === "ready" && current) {
    const percent = current.percentage !== undefined ? ` ${Math.round(current.percentage)}%` : "";
    return { text: `$(sync~spin) exlsp${percent}`, tooltip: tooltip("exlsp: model loaded") };
  }
  switch (status.state) {
    case "loading":
      return { text: "$(loading~spin) exlsp loading", tooltip: tooltip("exlsp: loading the model") };
    case "error":
      return { text: "$(error) exlsp", tooltip: tooltip("exlsp: error") };
    case "ready": {
      const latency =
        status.lastLatencyMs !== undefined && status.lastLatencyMs !== null
          ? ` ${Math.round(status.lastLatencyMs)} ms`
          : "";
      return { text: `$(sparkle) exlsp${latency}`, tooltip: tooltip("exlsp: model loaded") };
    }
    default:
      return { text: `$(question) exlsp`, tooltip: tooltip(`exlsp: ${status.state}`) };
  }
}

/**
 * Answers the server's `workspace/configuration` request: items for the
 * `exlsp` section get the mapped tree (never the client-only settings), a
 * sub-section such as `exlsp.completion` gets that part of it, and other
 * sections keep what VS Code's default handler found.
 */
export function answerConfiguration(
  items: readonly { section?: string; scopeUri?: string }[],
  wireFor: (scopeUri: string | undefined) => WireConfig,
  defaults: readonly unknown[],
): unknown[] {
  return items.map((item, i) => {
    const section = item.section ?? "";
    if (section === "exlsp") {
      return wireFor(item.scopeUri);
    }
    if (section.startsWith(PREFIX)) {
      const sub = section.slice(PREFIX.length);
      const tree = wireFor(item.scopeUri);
      if (!CLIENT_ONLY_SECTIONS.has(sub.split(".")[0])) {
        return sub.split(".").reduce<unknown>(
          (node, part) =>
            node !== null && typeof node === "object"
              ? (node as Record<string, unknown>)[part] ?? null
              : null,
          tree,
        );
      }
    }
    return defaults[i] ?? null;
  });
}

/**
 * Which settings scope the Enable/Disable commands should write: the most
 * specific one where `exlsp.completion.enabled` is set, so the command wins.
 */
export function enabledSettingTarget(inspected: {
  workspaceFolderValue?: unknown;
  workspaceValue?: unknown;
}): "workspaceFolder" | "workspace" | "global" {
  if (inspected.workspaceFolderValue !== undefined) return "workspaceFolder";
  if (inspected.workspaceValue !== undefined) return "workspace";
  return "global";
}

/**
 * The settings a repository must never choose: those that name a program, an
 * interpreter, a model, a host, a credential or a path to write. package.json
 * declares them `"scope": "machine"` (VS Code ignores their workspace values)
 * and lists them in `capabilities.untrustedWorkspaces.restrictedConfigurations`.
 * Returned as keys below `exlsp.` (`"server.command"`, `"model.path"`, ...).
 */
export function machineSettingKeys(packageJson: unknown): string[] {
  const properties = (packageJson as {
    contributes?: { configuration?: { properties?: Record<string, { scope?: string }> } };
  })?.contributes?.configuration?.properties;
  if (!properties) {
    return [];
  }
  return Object.entries(properties)
    .filter(([name, schema]) => name.startsWith(PREFIX) && schema?.scope === "machine")
    .map(([name]) => name.slice(PREFIX.length));
}

/** What `WorkspaceConfiguration.inspect(key)` reports (the levels read here). */
export interface InspectedSetting {
  defaultValue?: unknown;
  /** User settings; in a remote window, merged with the remote machine's settings. */
  globalValue?: unknown;
  workspaceValue?: unknown;
  workspaceFolderValue?: unknown;
}

/** Inspects one setting below `exlsp.`; undefined when unknown. */
export type SettingInspector = (key: string) => InspectedSetting | undefined;

/** The user-level value of a setting: user (or remote machine) settings, else the default. */
export function userLevelValue(inspected: InspectedSetting | undefined): unknown {
  if (!inspected) return undefined;
  return inspected.globalValue !== undefined ? inspected.globalValue : inspected.defaultValue;
}

/**
 * The machine-scoped keys that a workspace or workspace folder tries to set;
 * these values are ignored. `inspectors` holds one inspector per scope looked
 * at (the window, each workspace folder). Sorted, each key once.
 */
export function ignoredWorkspaceKeys(
  machineKeys: readonly string[],
  inspectors: readonly SettingInspector[],
): string[] {
  const ignored = new Set<string>();
  for (const inspect of inspectors) {
    for (const key of machineKeys) {
      const inspected = inspect(key);
      if (inspected?.workspaceValue !== undefined || inspected?.workspaceFolderValue !== undefined) {
        ignored.add(key);
      }
    }
  }
  return [...ignored].sort();
}

/** The server launch from the user-level `server.*` settings only. */
export function userServerLaunch(inspect: SettingInspector): ServerLaunch {
  return resolveServerLaunch({
    command: userLevelValue(inspect("server.command")) as string | undefined,
    args: userLevelValue(inspect("server.args")) as string[] | undefined,
    python: userLevelValue(inspect("server.python")) as string | undefined,
  });
}

/**
 * `initializationOptions`: the whole tree; the machine-scoped keys from the
 * user level only (`inspect`), the others as VS Code resolves them (`read`).
 * The server accepts the machine-scoped keys only from here.
 */
export function initializationOptions(
  wireKeys: readonly string[],
  machineKeys: readonly string[],
  read: SettingReader,
  inspect: SettingInspector,
): WireConfig {
  const machine = new Set(machineKeys);
  return buildWireConfig(wireKeys, (key) => (machine.has(key) ? userLevelValue(inspect(key)) : read(key)));
}

/**
 * The tree for `workspace/configuration` and `didChangeConfiguration`: every
 * key but the machine-scoped ones, which the server takes only from
 * `initializationOptions` (a change to them restarts the server).
 */
export function workspaceWireConfig(
  wireKeys: readonly string[],
  machineKeys: readonly string[],
  read: SettingReader,
): WireConfig {
  const machine = new Set(machineKeys);
  return buildWireConfig(
    wireKeys.filter((key) => !machine.has(key)),
    read,
  );
}

/**
 * What the server was started with, as one comparable string: the launch and
 * the user-level machine-scoped values. A change means a restart.
 */
export function machineFingerprint(machineKeys: readonly string[], inspect: SettingInspector): string {
  return JSON.stringify([
    userServerLaunch(inspect),
    machineKeys.map((key) => [key, userLevelValue(inspect(key)) ?? null]),
  ]);
}

/**
 * Tells the user once about workspace values that are ignored: `message`
 * returns the text for the keys not told before, or undefined.
 */
export class IgnoredSettingsNotice {
  private readonly told = new Set<string>();

  message(ignored: readonly string[]): string | undefined {
    const fresh = ignored.filter((key) => !this.told.has(key));
    if (fresh.length === 0) {
      return undefined;
    }
    for (const key of fresh) this.told.add(key);
    const names = fresh.map((key) => `${PREFIX}${key}`).join(", ");
    return (
      `exlsp: ignoring the workspace's value of ${names}. These settings choose a program, ` +
      "a model, a host, a credential or a path, so exlsp reads them only from your user (or remote) settings."
    );
  }
}
