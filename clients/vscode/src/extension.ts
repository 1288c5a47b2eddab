import * as vscode from "vscode";
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  type LanguageClientOptions,
  type ServerOptions,
  State,
} from "vscode-languageclient/node";

import {
  answerConfiguration,
  enabledSettingTarget,
  IgnoredSettingsNotice,
  ignoredWorkspaceKeys,
  initializationOptions,
  machineFingerprint,
  machineSettingKeys,
  type SettingInspector,
  userServerLaunch,
  workspaceWireConfig,
  type ServerProcess,
  type ServerStatus,
  statusBarView,
  trackProgress,
  type ActiveProgress,
  type ProgressValue,
  type WireConfig,
  wireSettingKeys,
} from "./settings";

const SECTION = "exlsp";

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
let outputChannel: vscode.LogOutputChannel;
let lastStatus: ServerStatus | undefined;
let running = new Map<string, ActiveProgress>();
let wireKeys: string[] = [];
let machineKeys: string[] = [];
// The machine-scoped values the running server was started with.
let startedWith: string | undefined;
const ignoredNotice = new IgnoredSettingsNotice();

function inspector(scope?: vscode.Uri): SettingInspector {
  const settings = vscode.workspace.getConfiguration(SECTION, scope);
  return (key) => settings.inspect(key);
}

/** The tree for `workspace/configuration` and `didChangeConfiguration`. */
function wireConfig(scope?: vscode.Uri): WireConfig {
  const settings = vscode.workspace.getConfiguration(SECTION, scope);
  return workspaceWireConfig(wireKeys, machineKeys, (key) => settings.get(key));
}

/** The whole tree, machine-scoped keys from the user level only. */
function initialConfig(): WireConfig {
  const settings = vscode.workspace.getConfiguration(SECTION);
  return initializationOptions(wireKeys, machineKeys, (key) => settings.get(key), inspector());
}

/** Tells the user once which workspace values of machine-scoped settings are ignored. */
function reportIgnoredWorkspaceSettings(): void {
  const scopes = [inspector(), ...(vscode.workspace.workspaceFolders ?? []).map((f) => inspector(f.uri))];
  const message = ignoredNotice.message(ignoredWorkspaceKeys(machineKeys, scopes));
  if (message) {
    outputChannel.warn(message);
    void vscode.window.showInformationMessage(message);
  }
}

function completionsEnabled(): boolean {
  return vscode.workspace.getConfiguration(SECTION).get<boolean>("completion.enabled", true);
}

function serverProcess(): ServerProcess {
  if (client?.state === State.Running) return "running";
  if (client?.state === State.Starting) return "starting";
  return "stopped";
}

function refreshStatusBar(): void {
  const view = statusBarView(lastStatus, serverProcess(), completionsEnabled(), [...running.values()]);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
}

function createClient(): LanguageClient {
  // A repository never chooses the program: only user-level values count.
  const launch = userServerLaunch(inspector());
  outputChannel.info(`starting server: ${launch.command} ${launch.args.join(" ")}`);
  const serverOptions: ServerOptions = { command: launch.command, args: launch.args };
  const clientOptions: LanguageClientOptions = {
    // Completions are useful in any file the user edits, whatever its language.
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    outputChannel,
    initializationOptions: () => initialConfig(),
    middleware: {
      // Every $/progress value passes here on its way to VS Code's own
      // progress UI: the status bar item shows indexing as it goes.
      handleWorkDoneProgress: (token, params, next) => {
        trackProgress(running, token, params as ProgressValue);
        refreshStatusBar();
        next(token, params);
      },
      workspace: {
        configuration: async (params, token, next) => {
          const defaults = await next(params, token);
          if (!Array.isArray(defaults)) {
            return defaults;
          }
          return answerConfiguration(
            params.items,
            (scopeUri) => wireConfig(scopeUri ? vscode.Uri.parse(scopeUri) : undefined),
            defaults,
          );
        },
      },
    },
  };
  const created = new LanguageClient("exlsp", "exlsp", serverOptions, clientOptions);
  created.onNotification("exlsp/status", (status: ServerStatus) => {
    lastStatus = status;
    refreshStatusBar();
  });
  // VS Code cannot update a ghost text it is already showing, and the final
  // text arrives in the inlineCompletion response anyway.
  created.onNotification("exlsp/partialCompletion", () => undefined);
  created.onDidChangeState(() => {
    if (created.state !== State.Running) {
      lastStatus = undefined;
      running = new Map();
    }
    refreshStatusBar();
  });
  return created;
}

async function startClient(): Promise<void> {
  lastStatus = undefined;
  startedWith = machineFingerprint(machineKeys, inspector());
  client = createClient();
  refreshStatusBar();
  try {
    await client.start();
  } catch (error) {
    outputChannel.error(`the server failed to start: ${String(error)}`);
    void vscode.window
      .showErrorMessage(
        "exlsp: the server failed to start. Check exlsp.server.command / exlsp.server.python.",
        "Show Log",
      )
      .then((choice) => {
        if (choice === "Show Log") outputChannel.show();
      });
  }
  refreshStatusBar();
}

async function stopClient(): Promise<void> {
  const running = client;
  client = undefined;
  if (running) {
    try {
      await running.stop();
    } catch (error) {
      outputChannel.warn(`stopping the server: ${String(error)}`);
    }
    await running.dispose();
  }
}

async function restartServer(): Promise<void> {
  await stopClient();
  await startClient();
}

async function setEnabled(enabled: boolean): Promise<void> {
  const settings = vscode.workspace.getConfiguration(SECTION);
  const inspected = settings.inspect<boolean>("completion.enabled") ?? { key: "" };
  const target = {
    workspaceFolder: vscode.ConfigurationTarget.WorkspaceFolder,
    workspace: vscode.ConfigurationTarget.Workspace,
    global: vscode.ConfigurationTarget.Global,
  }[enabledSettingTarget(inspected)];
  await settings.update("completion.enabled", enabled, target);
}

async function showStats(): Promise<void> {
  if (client?.state !== State.Running) {
    void vscode.window.showWarningMessage("exlsp: the server is not running.");
    return;
  }
  const stats = await client.sendRequest("exlsp/stats", {});
  outputChannel.info(`stats of the last completion: ${JSON.stringify(stats)}`);
  outputChannel.show(true);
}

async function showMenu(): Promise<void> {
  const enabled = completionsEnabled();
  const picks: (vscode.QuickPickItem & { command: string })[] = [
    enabled
      ? { label: "$(circle-slash) Disable completions", command: "exlsp.disable" }
      : { label: "$(check) Enable completions", command: "exlsp.enable" },
    { label: "$(debug-restart) Restart server", command: "exlsp.restartServer" },
    { label: "$(output) Show log", command: "exlsp.showLog" },
    { label: "$(graph) Show stats of the last completion", command: "exlsp.showStats" },
  ];
  const choice = await vscode.window.showQuickPick(picks, { title: "exlsp" });
  if (choice) {
    await vscode.commands.executeCommand(choice.command);
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  wireKeys = wireSettingKeys(context.extension.packageJSON);
  machineKeys = machineSettingKeys(context.extension.packageJSON);
  outputChannel = vscode.window.createOutputChannel("exlsp", { log: true });
  statusItem = vscode.window.createStatusBarItem("exlsp.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "exlsp";
  statusItem.command = "exlsp.showMenu";
  statusItem.show();

  context.subscriptions.push(
    outputChannel,
    statusItem,
    vscode.commands.registerCommand("exlsp.restartServer", restartServer),
    vscode.commands.registerCommand("exlsp.showLog", () => outputChannel.show()),
    vscode.commands.registerCommand("exlsp.enable", () => setEnabled(true)),
    vscode.commands.registerCommand("exlsp.disable", () => setEnabled(false)),
    vscode.commands.registerCommand("exlsp.toggle", () => setEnabled(!completionsEnabled())),
    vscode.commands.registerCommand("exlsp.showStats", showStats),
    vscode.commands.registerCommand("exlsp.showMenu", showMenu),
    vscode.workspace.onDidChangeConfiguration(async (event) => {
      if (!event.affectsConfiguration(SECTION)) {
        return;
      }
      refreshStatusBar();
      reportIgnoredWorkspaceSettings();
      // The server takes the machine-scoped settings only at start.
      if (client && machineFingerprint(machineKeys, inspector()) !== startedWith) {
        outputChannel.info("a server or model setting changed: restarting the server");
        await restartServer();
        return;
      }
      if (client?.state === State.Running) {
        await client.sendNotification(DidChangeConfigurationNotification.type, {
          settings: { [SECTION]: wireConfig() },
        });
      }
    }),
  );
  reportIgnoredWorkspaceSettings();
  await startClient();
}

export async function deactivate(): Promise<void> {
  await stopClient();
}
