import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import {
  answerConfiguration,
  buildWireConfig,
  enabledSettingTarget,
  IgnoredSettingsNotice,
  ignoredWorkspaceKeys,
  initializationOptions,
  type InspectedSetting,
  machineFingerprint,
  machineSettingKeys,
  resolveServerLaunch,
  statusBarView,
  trackProgress,
  type ActiveProgress,
  userServerLaunch,
  wireSettingKeys,
  workspaceWireConfig,
} from "../settings";

// out/test/settings.test.js -> clients/vscode/package.json
const packageJson = JSON.parse(readFileSync(join(__dirname, "..", "..", "package.json"), "utf8"));
const properties: Record<string, { default: unknown; scope?: string }> =
  packageJson.contributes.configuration.properties;

/** What VS Code's getConfiguration("exlsp").get(key) returns: user value or default. */
function reader(userValues: Record<string, unknown> = {}) {
  return (key: string): unknown =>
    key in userValues ? userValues[key] : properties[`exlsp.${key}`]?.default;
}

test("wire keys are the server's sections, never the client-only ones", () => {
  const keys = wireSettingKeys(packageJson);
  assert.ok(keys.includes("model.path"));
  assert.ok(keys.includes("completion.maxTokens"));
  assert.ok(keys.includes("logging.level"));
  for (const key of keys) {
    assert.ok(!key.startsWith("server."), key);
    assert.ok(!key.startsWith("trace."), key);
    assert.equal(key.split(".").length, 2, key);
  }
  const declared = Object.keys(properties).filter(
    (name) => !name.startsWith("exlsp.server.") && !name.startsWith("exlsp.trace."),
  );
  assert.equal(keys.length, declared.length);
});

test("defaults map to the full nested tree", () => {
  const tree = buildWireConfig(wireSettingKeys(packageJson), reader());
  assert.deepEqual(Object.keys(tree).sort(), [
    "assist",
    "codeActions",
    "completion",
    "hover",
    "index",
    "logging",
    "model",
  ]);
  assert.equal(tree.model.path, "");
  assert.equal(tree.model.backend, "transformers");
  assert.equal(tree.model.maxSeqLen, 8192);
  assert.equal(tree.completion.enabled, true);
  assert.equal(tree.completion.maxTokens, 128);
  assert.equal(tree.completion.multiline, "auto");
  assert.equal(tree.logging.level, "info");
  assert.equal(tree.hover.deadlineMs, 2000);
  assert.equal(tree.index.maxFileBytes, 1000000);
  // Every declared setting of a section, and nothing else, lands in it.
  const declaredIn = (section: string): number =>
    Object.keys(properties).filter((name) => name.startsWith(`exlsp.${section}.`)).length;
  for (const section of Object.keys(tree)) {
    assert.equal(Object.keys(tree[section]).length, declaredIn(section), section);
  }
  assert.ok(Object.keys(tree.completion).length >= 15);
  assert.ok(Object.keys(tree.model).length >= 10);
});

test("user values land under their section, camelCase kept", () => {
  const tree = buildWireConfig(
    wireSettingKeys(packageJson),
    reader({ "model.path": "/models/qwen", "completion.maxTokensSingleLine": 7, "completion.kvReuse": false }),
  );
  assert.equal(tree.model.path, "/models/qwen");
  assert.equal(tree.completion.maxTokensSingleLine, 7);
  assert.equal(tree.completion.kvReuse, false);
  assert.equal(tree.completion.maxTokens, 128);
});

test("unknown settings are left out rather than sent as undefined", () => {
  const tree = buildWireConfig(["model.path", "model.gone"], (key) =>
    key === "model.path" ? "/m" : undefined,
  );
  assert.deepEqual(tree, { model: { path: "/m" } });
  assert.deepEqual(wireSettingKeys({}), []);
});

test("server launch: command, python, or exlsp on PATH", () => {
  assert.deepEqual(resolveServerLaunch({}), { command: "exlsp", args: ["serve"] });
  assert.deepEqual(resolveServerLaunch({ command: "", python: "", args: [] }), {
    command: "exlsp",
    args: ["serve"],
  });
  assert.deepEqual(resolveServerLaunch({ python: "/venv/bin/python" }), {
    command: "/venv/bin/python",
    args: ["-m", "exlsp.server", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ python: "/venv/bin/python", args: ["--log-level", "debug"] }), {
    command: "/venv/bin/python",
    args: ["-m", "exlsp.server", "--log-level", "debug", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ command: "/opt/exlsp", python: "/ignored" }), {
    command: "/opt/exlsp",
    args: ["serve"],
  });
  assert.deepEqual(resolveServerLaunch({ command: " ssh ", args: ["gpu-box", "exlsp", "serve"] }), {
    command: "ssh",
    args: ["gpu-box", "exlsp", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ args: ["--log-file", "/tmp/x"] }), {
    command: "exlsp",
    args: ["--log-file", "/tmp/x", "serve"],
  });
});

test("workspace/configuration answers the mapped tree for exlsp", () => {
  const tree = { model: { path: "/m" }, completion: { maxTokens: 9 } };
  const answers = answerConfiguration(
    [
      { section: "exlsp" },
      { section: "exlsp.completion" },
      { section: "exlsp.completion.maxTokens" },
      { section: "exlsp.server" },
      { section: "python" },
      {},
    ],
    () => tree,
    ["raw", "raw", "raw", "raw-server", { x: 1 }, null],
  );
  assert.deepEqual(answers, [tree, { maxTokens: 9 }, 9, "raw-server", { x: 1 }, null]);
});

test("workspace/configuration passes the scope through", () => {
  const seen: (string | undefined)[] = [];
  answerConfiguration([{ section: "exlsp", scopeUri: "file:///a.py" }, { section: "exlsp" }], (s) => {
    seen.push(s);
    return {};
  }, [null, null]);
  assert.deepEqual(seen, ["file:///a.py", undefined]);
});

test("status bar: loading, ready with latency, error, disabled, down", () => {
  const down = statusBarView(undefined, "stopped", true);
  assert.equal(down.text, "$(circle-slash) exlsp");
  assert.match(down.tooltip, /server not running/);
  const starting = statusBarView(undefined, "starting", true);
  assert.equal(starting.text, "$(loading~spin) exlsp");
  assert.match(starting.tooltip, /starting/);
  assert.equal(statusBarView({ state: "ready" }, "starting", true).text, "$(loading~spin) exlsp");
  assert.equal(statusBarView(undefined, "running", true).text, "$(loading~spin) exlsp");
  const loading = statusBarView({ state: "loading", message: "", model: "qwen", backend: "exllamav2" }, "running", true);
  assert.equal(loading.text, "$(loading~spin) exlsp loading");
  assert.match(loading.tooltip, /Model: qwen/);
  const ready = statusBarView(
    { state: "ready", message: "", model: "qwen", backend: "exllamav2", lastLatencyMs: 41.6 },
    "running",
    true,
  );
  assert.equal(ready.text, "$(sparkle) exlsp 42 ms");
  assert.match(ready.tooltip, /model loaded/);
  assert.match(ready.tooltip, /Backend: exllamav2/);
  assert.match(ready.tooltip, /Last suggestion: 42 ms/);
  const noLatency = statusBarView({ state: "ready", lastLatencyMs: null }, "running", true);
  assert.equal(noLatency.text, "$(sparkle) exlsp");
  const error = statusBarView({ state: "error", message: "CUDA out of memory" }, "running", true);
  assert.equal(error.text, "$(error) exlsp");
  assert.match(error.tooltip, /CUDA out of memory/);
  assert.equal(statusBarView({ state: "disabled" }, "running", true).text, "$(circle-slash) exlsp off");
  assert.equal(statusBarView({ state: "ready" }, "running", false).text, "$(circle-slash) exlsp off");
});

test("progress: begin adds, report updates, end removes, per token", () => {
  const running = new Map<string, ActiveProgress>();
  trackProgress(running, "exlsp-scan-1", { kind: "begin", title: "Indexing", message: "0/6 files", percentage: 0 });
  trackProgress(running, 7, { kind: "begin", title: "Embedding chunks" });
  trackProgress(running, "exlsp-scan-1", { kind: "report", percentage: 50 });
  assert.deepEqual(running.get("exlsp-scan-1"), { title: "Indexing", message: "0/6 files", percentage: 50 });
  assert.deepEqual(running.get("7"), { title: "Embedding chunks", message: undefined, percentage: undefined });
  // A report for a token never begun is ignored.
  trackProgress(running, "unknown", { kind: "report", message: "x" });
  assert.equal(running.has("unknown"), false);
  trackProgress(running, "exlsp-scan-1", { kind: "end", message: "6 files" });
  assert.deepEqual([...running.keys()], ["7"]);
});

test("status bar: indexing progress while the model is loaded", () => {
  const ready = { state: "ready", model: "qwen", lastLatencyMs: 40 };
  const indexing = statusBarView(ready, "running", true, [
    { title: "Indexing", message: "3/6 files", percentage: 49.6 },
  ]);
  assert.equal(indexing.text, "$(sync~spin) exlsp 50%");
  assert.match(indexing.tooltip, /model loaded/);
  assert.match(indexing.tooltip, /Last suggestion: 40 ms/);
  assert.match(indexing.tooltip, /Indexing 3\/6 files \(50%\)/);
  // No percentage: the spinner alone; the most recent progress wins the text.
  const two = statusBarView(ready, "running", true, [
    { title: "Indexing", percentage: 10 },
    { title: "Embedding chunks" },
  ]);
  assert.equal(two.text, "$(sync~spin) exlsp");
  assert.match(two.tooltip, /Indexing \(10%\)\nEmbedding chunks/);
  // Done: back to the latency.
  assert.equal(statusBarView(ready, "running", true, []).text, "$(sparkle) exlsp 40 ms");
  // Loading the model and disabled completions keep their own text.
  assert.equal(
    statusBarView({ state: "loading" }, "running", true, [{ title: "Indexing" }]).text,
    "$(loading~spin) exlsp loading",
  );
  assert.equal(statusBarView(ready, "running", false, [{ title: "Indexing" }]).text, "$(circle-slash) exlsp off");
});

test("enable/disable writes the most specific scope that is set", () => {
  assert.equal(enabledSettingTarget({}), "global");
  assert.equal(enabledSettingTarget({ workspaceValue: false }), "workspace");
  assert.equal(enabledSettingTarget({ workspaceValue: false, workspaceFolderValue: true }), "workspaceFolder");
});

// Settings that name a program, an interpreter, a model, a host, a credential
// or a path to write: a repository's .vscode/settings.json must not set them.
const MACHINE_ONLY = [
  "server.command",
  "server.args",
  "server.python",
  "model.path",
  "model.backend",
  "model.baseUrl",
  "model.remoteModel",
  "model.apiKey",
  "model.apiKeyEnv",
  "model.caFile",
  "model.verifyTls",
  "model.fallback",
  "model.pageCacheDir",
  "assist.backend",
  "assist.path",
  "assist.baseUrl",
  "assist.remoteModel",
  "assist.apiKey",
  "assist.apiKeyEnv",
  "assist.caFile",
  "assist.verifyTls",
  "index.databaseDir",
  "index.sharedIndex",
  "index.storageEndpoint",
  "index.storageRegion",
  "index.storageAccessKeyId",
  "index.storageSecretAccessKey",
  "index.embeddingModel",
  "logging.file",
];

/** A value of the right JSON type for `key`, marked with where it came from. */
function valueFrom(level: string, key: string): unknown {
  const fallback = properties[`exlsp.${key}`].default;
  if (Array.isArray(fallback)) return [`${level}-${key}`];
  if (typeof fallback === "boolean") return level === "user" ? true : false;
  return `${level}-${key}`;
}

/**
 * A VS Code that would hand out every level: `inspect` reports them all and
 * `get` resolves folder > workspace > user > default, as it does for the
 * other settings. The extension must not rely on VS Code dropping them.
 */
function levels(values: Record<string, InspectedSetting>) {
  const inspect = (key: string): InspectedSetting | undefined => {
    const schema = properties[`exlsp.${key}`];
    return schema ? { defaultValue: schema.default, ...values[key] } : undefined;
  };
  const read = (key: string): unknown => {
    const i = inspect(key);
    if (!i) return undefined;
    for (const v of [i.workspaceFolderValue, i.workspaceValue, i.globalValue]) {
      if (v !== undefined) return v;
    }
    return i.defaultValue;
  };
  return { inspect, read };
}

function hostileWorkspace(withUser: boolean): Record<string, InspectedSetting> {
  const values: Record<string, InspectedSetting> = {};
  for (const key of MACHINE_ONLY) {
    values[key] = {
      workspaceValue: valueFrom("workspace", key),
      workspaceFolderValue: valueFrom("folder", key),
      ...(withUser ? { globalValue: valueFrom("user", key) } : {}),
    };
  }
  return values;
}

test("settings that choose a program, model, host, credential or path are machine-scoped", () => {
  for (const key of MACHINE_ONLY) {
    assert.equal(properties[`exlsp.${key}`]?.scope, "machine", key);
  }
  assert.deepEqual(machineSettingKeys(packageJson).sort(), [...MACHINE_ONLY].sort());
  const untrusted = packageJson.capabilities?.untrustedWorkspaces;
  assert.equal(untrusted?.supported, "limited");
  assert.ok(typeof untrusted?.description === "string" && untrusted.description.length > 0);
  assert.deepEqual(
    [...(untrusted?.restrictedConfigurations ?? [])].sort(),
    MACHINE_ONLY.map((key) => `exlsp.${key}`).sort(),
  );
});

test("a workspace value of a machine-scoped setting is ignored, a user value works", () => {
  const machineKeys = machineSettingKeys(packageJson);
  const wireKeys = wireSettingKeys(packageJson);
  const { inspect, read } = levels(hostileWorkspace(true));

  // The program started is the user's.
  assert.deepEqual(userServerLaunch(inspect), {
    command: "user-server.command",
    args: ["user-server.args"],
  });
  // initializationOptions carry the user's values of every machine-scoped key.
  const init = initializationOptions(wireKeys, machineKeys, read, inspect);
  for (const key of MACHINE_ONLY.filter((k) => !k.startsWith("server."))) {
    const [section, leaf] = key.split(".");
    assert.deepEqual(init[section][leaf], valueFrom("user", key), key);
  }
  // Other settings keep VS Code's resolution (a workspace may set them).
  const other = levels({ "completion.maxTokens": { workspaceValue: 7, globalValue: 9 } });
  assert.equal(initializationOptions(wireKeys, machineKeys, other.read, other.inspect).completion.maxTokens, 7);
  // workspace/configuration and didChangeConfiguration never carry them.
  const later = workspaceWireConfig(wireKeys, machineKeys, read);
  for (const key of MACHINE_ONLY) {
    const [section, leaf] = key.split(".");
    assert.equal(later[section]?.[leaf], undefined, key);
  }
  assert.equal(later.completion.maxTokens, 128);

  // Without user values: the defaults, never the workspace's.
  const bare = levels(hostileWorkspace(false));
  assert.deepEqual(userServerLaunch(bare.inspect), { command: "exlsp", args: ["serve"] });
  const defaults = initializationOptions(wireKeys, machineKeys, bare.read, bare.inspect);
  assert.equal(defaults.model.path, "");
  assert.equal(defaults.model.backend, "transformers");
  assert.equal(defaults.model.verifyTls, true);
  assert.equal(defaults.logging.file, "");
  assert.equal(defaults.index.databaseDir, "");
});

test("ignored workspace values are reported once, in one message", () => {
  const machineKeys = machineSettingKeys(packageJson);
  const window = levels(hostileWorkspace(true)).inspect;
  const folder = levels({ "model.path": { workspaceFolderValue: "/repo/model" } }).inspect;
  const ignored = ignoredWorkspaceKeys(machineKeys, [window, folder]);
  assert.deepEqual(ignored, [...MACHINE_ONLY].sort());
  // User-level values alone are not reported.
  const userOnly = levels({ "model.path": { globalValue: "/m" } }).inspect;
  assert.deepEqual(ignoredWorkspaceKeys(machineKeys, [userOnly]), []);

  const notice = new IgnoredSettingsNotice();
  const message = notice.message(ignored);
  assert.ok(message);
  for (const key of MACHINE_ONLY) {
    assert.ok(message.includes(`exlsp.${key}`), key);
  }
  assert.equal(notice.message(ignored), undefined);
  assert.equal(notice.message([]), undefined);
  // A key the workspace sets later is told, alone.
  const more = notice.message([...ignored, "model.extra"]);
  assert.ok(more?.includes("exlsp.model.extra"));
  assert.ok(!more?.includes("exlsp.model.path"));
});

test("a changed user value of a machine-scoped setting restarts; a workspace value does not", () => {
  const machineKeys = machineSettingKeys(packageJson);
  const before = machineFingerprint(machineKeys, levels({}).inspect);
  assert.equal(machineFingerprint(machineKeys, levels({}).inspect), before);
  assert.equal(machineFingerprint(machineKeys, levels(hostileWorkspace(false)).inspect), before);
  assert.notEqual(
    machineFingerprint(machineKeys, levels({ "model.path": { globalValue: "/other" } }).inspect),
    before,
  );
  assert.notEqual(
    machineFingerprint(machineKeys, levels({ "server.python": { globalValue: "/venv/bin/python" } }).inspect),
    before,
  );
});
